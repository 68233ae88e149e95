"""Datasets: parse an upload (.npz / .csv / .parquet), validate, store normalized as .npz.

Stored form: X float32 with shape (n, ...) , y (int64 when integral, else float64; shape
(n,) or (n, K)), optional sensitive (n,). Files are read without pickle
(numpy.load(allow_pickle=False); pandas/pyarrow for tables).
"""

from __future__ import annotations

import io
import logging
import zipfile
from pathlib import PurePath
from typing import Any

import numpy as np
from sqlalchemy import select
from sqlalchemy.orm import Session

from models_store import Store
from service import schemas
from service.domain.pagination import page as split_page
from service.domain.pagination import paginate
from service.errors import InvalidInput, NotFound, PayloadTooLarge
from service.models import Dataset, Tenant, new_id

logger = logging.getLogger(__name__)

ARRAY_NAMES = ("X", "y", "sensitive")
FORMATS = ("npz", "csv", "parquet")


def detect_format(filename: str | None, data: bytes) -> str:
    """'npz', 'csv' or 'parquet' from the file name, else from the leading bytes."""
    suffix = PurePath(filename or "").suffix.lower().lstrip(".")
    if suffix in FORMATS:
        return suffix
    if data[:4] == b"PK\x03\x04":
        return "npz"
    if data[:4] == b"PAR1":
        return "parquet"
    raise InvalidInput(
        f"file: cannot tell the format of {filename!r}; use a .npz, .csv or .parquet file",
        field="file",
    )


def _check_expansion(data: bytes, max_array_bytes: int | None) -> None:
    # The zip directory states each member's inflated size; refuse before inflating.
    if max_array_bytes is None:
        return
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            inflated = sum(info.file_size for info in archive.infolist())
    except zipfile.BadZipFile:
        return  # np.load reports it with a better message
    if inflated > max_array_bytes:
        raise PayloadTooLarge(
            f"file: the .npz arrays expand to {inflated} bytes, more than {max_array_bytes} "
            "(8 x AFIF_MAX_UPLOAD_BYTES)",
            field="file",
        )


def _read_npz(data: bytes, max_array_bytes: int | None = None) -> dict[str, np.ndarray]:
    _check_expansion(data, max_array_bytes)
    try:
        archive = np.load(io.BytesIO(data), allow_pickle=False)
    except Exception as exc:
        raise InvalidInput(f"file: not a readable .npz archive ({exc})", field="file") from None
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise InvalidInput("file: expected an .npz archive of arrays X, y", field="file")
    arrays: dict[str, np.ndarray] = {}
    with archive:
        unknown = [name for name in archive.files if name not in ARRAY_NAMES]
        if unknown:
            raise InvalidInput(
                f"file: unexpected array {unknown[0]!r} (allowed: X, y, sensitive)", field="file"
            )
        for name in archive.files:
            try:
                arrays[name] = archive[name]
            except ValueError as exc:
                # Object arrays need pickle, which we never load from uploads.
                raise InvalidInput(
                    f"file.{name}: cannot be read without pickle ({exc}); send numeric arrays",
                    field=f"file.{name}",
                ) from None
            except Exception as exc:
                raise InvalidInput(
                    f"file.{name}: unreadable ({exc})", field=f"file.{name}"
                ) from None
    for name in ("X", "y"):
        if name not in arrays:
            raise InvalidInput(f"file: the .npz has no array {name!r}", field=f"file.{name}")
    return arrays


def _read_table(data: bytes, fmt: str, meta: schemas.DatasetMeta | None) -> dict[str, np.ndarray]:
    import pandas as pd

    if meta is None or not meta.target:
        raise InvalidInput(
            f"meta.target: a .{fmt} upload needs `meta` naming the `target` column",
            field="meta.target",
        )
    try:
        if fmt == "csv":
            frame = pd.read_csv(io.BytesIO(data))
        else:
            frame = pd.read_parquet(io.BytesIO(data))
    except Exception as exc:
        raise InvalidInput(f"file: not a readable .{fmt} table ({exc})", field="file") from None

    columns = [str(c) for c in frame.columns]
    frame.columns = columns
    wanted = {"meta.target": [meta.target]}
    if meta.sensitive:
        wanted["meta.sensitive"] = [meta.sensitive]
    if meta.features:
        wanted["meta.features"] = list(meta.features)
    for field, names in wanted.items():
        missing = [n for n in names if n not in columns]
        if missing:
            raise InvalidInput(
                f"{field}: column {missing[0]!r} is not in the file (columns: "
                f"{', '.join(columns[:20])})",
                field=field,
            )
    features = list(meta.features) if meta.features else [
        c for c in columns if c not in (meta.target, meta.sensitive)
    ]
    if not features:
        raise InvalidInput("meta.features: no feature columns left", field="meta.features")

    arrays = {"X": _numeric(frame[features], "meta.features"),
              "y": _numeric(frame[meta.target], "meta.target")}
    if meta.sensitive:
        arrays["sensitive"] = _numeric(frame[meta.sensitive], "meta.sensitive")
    return arrays


def _numeric(frame: Any, field: str) -> np.ndarray:
    try:
        return frame.to_numpy(dtype=np.float64, na_value=np.nan)
    except (TypeError, ValueError) as exc:
        raise InvalidInput(f"{field}: columns must be numeric ({exc})", field=field) from None


def _as_number_array(array: np.ndarray, field: str) -> np.ndarray:
    if array.dtype == np.bool_:
        return array.astype(np.int64)
    if not (np.issubdtype(array.dtype, np.integer) or np.issubdtype(array.dtype, np.floating)):
        raise InvalidInput(f"{field}: must be numeric, got dtype {array.dtype}", field=field)
    if np.issubdtype(array.dtype, np.floating) and not np.isfinite(array).all():
        bad = int((~np.isfinite(array)).sum())
        raise InvalidInput(f"{field}: contains {bad} NaN or infinite value(s)", field=field)
    return array


def _integral_or_float(array: np.ndarray) -> np.ndarray:
    if np.issubdtype(array.dtype, np.integer):
        return array.astype(np.int64)
    if array.size and np.array_equal(array, np.round(array)) and np.abs(array).max() < 2**53:
        return array.astype(np.int64)
    return array.astype(np.float64)


def normalize(arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Check shapes, dtypes and finiteness; return X float32, y and sensitive canonical."""
    X = _as_number_array(np.asarray(arrays["X"]), "X")
    y = _as_number_array(np.asarray(arrays["y"]), "y")
    if X.ndim < 2:
        raise InvalidInput(f"X: must have shape (n_rows, n_features...), got {list(X.shape)}",
                           field="X")
    n = X.shape[0]
    if n < 1 or int(np.prod(X.shape[1:])) < 1:
        raise InvalidInput(f"X: has no rows or no features (shape {list(X.shape)})", field="X")
    if y.ndim not in (1, 2) or y.shape[0] != n:
        raise InvalidInput(
            f"y: must have shape ({n},) or ({n}, K) to match X's {n} rows, got {list(y.shape)}",
            field="y",
        )
    X32 = X.astype(np.float32)
    if not np.isfinite(X32).all():
        raise InvalidInput("X: values overflow float32", field="X")
    out = {"X": np.ascontiguousarray(X32), "y": np.ascontiguousarray(_integral_or_float(y))}

    if "sensitive" in arrays:
        s = _as_number_array(np.asarray(arrays["sensitive"]), "sensitive")
        if s.shape != (n,):
            raise InvalidInput(f"sensitive: must have shape ({n},), got {list(s.shape)}",
                               field="sensitive")
        out["sensitive"] = np.ascontiguousarray(_integral_or_float(s))
    return out


def npz_bytes(arrays: dict[str, np.ndarray]) -> bytes:
    """A deterministic .npz (fixed zip timestamps, no pickle): same arrays, same sha256."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for name in sorted(arrays):
            info = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            with archive.open(info, "w") as handle:
                np.lib.format.write_array(handle, arrays[name], allow_pickle=False)
    return buffer.getvalue()


def parse_dataset(
    filename: str | None,
    data: bytes,
    meta: schemas.DatasetMeta | None,
    max_array_bytes: int | None = None,
) -> tuple[dict[str, np.ndarray], str]:
    """Upload bytes -> (normalized arrays, source format); errors name the field."""
    if not data:
        raise InvalidInput("file: the upload is empty", field="file")
    fmt = detect_format(filename, data)
    # Limitation: only .npz is checked for decompression bombs; a parquet file's compressed
    # columns are inflated by pyarrow without a bound beyond the upload limit.
    if fmt == "npz":
        raw = _read_npz(data, max_array_bytes)
    else:
        raw = _read_table(data, fmt, meta)
    try:
        return normalize(raw), fmt
    except InvalidInput as exc:
        # Name the part for npz uploads, the column option for tables.
        if fmt == "npz" and exc.field in ARRAY_NAMES:
            exc.field = f"file.{exc.field}"
            exc.detail = f"file.{exc.detail}"
            exc.args = (exc.detail,)
        raise


def register_dataset(
    session: Session,
    tenant: Tenant,
    filename: str | None,
    data: bytes,
    meta: schemas.DatasetMeta | None,
    store: Store,
    max_array_bytes: int | None = None,
) -> Dataset:
    """Validate and normalize an upload, store it as .npz, write the row (all or nothing)."""
    arrays, fmt = parse_dataset(filename, data, meta, max_array_bytes)
    X = arrays["X"]
    name = (meta.name if meta and meta.name else None) or PurePath(filename or "dataset").stem

    blob = store.put(npz_bytes(arrays))
    dataset = Dataset(
        id=new_id(),
        tenant_id=tenant.id,
        name=name[:200] or "dataset",
        n_rows=int(X.shape[0]),
        n_features=int(np.prod(X.shape[1:])),
        feature_shape=[int(d) for d in X.shape[1:]],
        y_dtype=str(arrays["y"].dtype),
        has_sensitive="sensitive" in arrays,
        source_format=fmt,
        sha256=blob.sha256,
        size_bytes=blob.size,
    )
    session.add(dataset)
    try:
        session.commit()
    except Exception:
        session.rollback()
        if blob.created and session.scalar(
            select(Dataset.id).where(Dataset.sha256 == blob.sha256).limit(1)
        ) is None:
            store.delete(blob.sha256)
        raise
    logger.info("dataset %s registered (%d x %s, %s)", dataset.id, dataset.n_rows,
                dataset.feature_shape, fmt)
    return dataset


def load_dataset_arrays(
    dataset: Dataset, store: Store, names: tuple[str, ...] | None = None
) -> dict[str, np.ndarray]:
    """The stored arrays of a dataset (all, or just `names`), hash-verified, no pickle."""
    data = store.get(dataset.sha256, verify=True)
    with np.load(io.BytesIO(data), allow_pickle=False) as archive:
        wanted = archive.files if names is None else [n for n in names if n in archive.files]
        return {name: archive[name] for name in wanted}


def get_dataset(session: Session, tenant_id: str, dataset_id: str) -> Dataset:
    """The tenant's dataset; another tenant's or an unknown id is NotFound."""
    dataset = session.get(Dataset, dataset_id)
    if dataset is None or dataset.tenant_id != tenant_id:
        raise NotFound(f"dataset {dataset_id} not found", field="dataset_id")
    return dataset


def list_datasets(
    session: Session, tenant_id: str, *, limit: int = 50, cursor: str | None = None
) -> tuple[list[Dataset], str | None]:
    """A page of the tenant's datasets, newest first; (items, next_cursor)."""
    stmt = select(Dataset).where(Dataset.tenant_id == tenant_id)
    rows = list(session.scalars(paginate(stmt, Dataset, limit, cursor)))
    return split_page(rows, limit)


def dataset_public(dataset: Dataset) -> schemas.DatasetPublic:
    """The API view of a dataset row."""
    return schemas.DatasetPublic.model_validate(dataset, from_attributes=True)
