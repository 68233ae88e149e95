"""Synchronous Python SDK for the afif HTTP API (httpx underneath).

Resources come back as the server's own pydantic schemas (`service.schemas`); a job is
wrapped in `Job`, which adds `refresh`, `wait`, `result` and `cancel`.
"""

from __future__ import annotations

import io
import json
import logging
import os
import random
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import numpy as np

from client import errors

if TYPE_CHECKING:
    import pandas as pd
    import torch

logger = logging.getLogger(__name__)

TERMINAL = frozenset({"succeeded", "failed", "cancelled"})
DEFAULT_URL = "http://127.0.0.1:8000"

# Statuses worth retrying: the server (or a proxy in front of it) did no work.
_RETRY_STATUS = frozenset({429, 502, 503, 504})
_IDEMPOTENT_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE"})


def _schemas() -> Any:
    # Imported on first use: service/__init__.py is empty, so this costs pydantic only.
    import service.schemas

    return service.schemas


def _id_of(obj: Any, what: str) -> str:
    """Accept an id string or anything with an `id` attribute (a schema, a Job)."""
    if isinstance(obj, str):
        return obj
    ident = getattr(obj, "id", None)
    if ident is None:
        raise TypeError(f"{what}: expected an id string or an object with .id, got {obj!r}")
    return str(ident)


def _jsonable(value: Any) -> Any:
    """Turn numpy scalars/arrays and nested containers into plain JSON values."""
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    return value


def _numeric_array(value: list[Any]) -> np.ndarray | None:
    """A rectangular list of numbers as an ndarray, else None (mixed or ragged lists)."""
    try:
        arr = np.asarray(value)
    except ValueError:
        return None
    if arr.dtype.kind in "biuf" and arr.size > 0:
        return arr
    return None


class Client:
    """A connection to one afif server, authenticated as one tenant.

    `url` and `key` default to the AFIF_URL and AFIF_API_KEY environment variables.
    Connection failures and 429/502/503/504 answers are retried `retries` times with
    exponential backoff starting at `backoff` seconds (Retry-After is honoured).
    """

    def __init__(
        self,
        url: str | None = None,
        key: str | None = None,
        *,
        timeout: float = 60.0,
        retries: int = 5,
        backoff: float = 0.25,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self.url = (url or os.environ.get("AFIF_URL") or DEFAULT_URL).rstrip("/")
        key = key or os.environ.get("AFIF_API_KEY")
        headers = {"Accept": "application/json, application/problem+json"}
        if key:
            headers["Authorization"] = f"Bearer {key}"
        self.retries = retries
        self.backoff = backoff
        self._http = httpx.Client(
            base_url=self.url, headers=headers, timeout=timeout, transport=transport
        )

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---------------------------------------------------------------- transport

    def request(
        self,
        method: str,
        path: str,
        *,
        expect: str = "json",
        **kwargs: Any,
    ) -> Any:
        """Send one request with retries; return parsed JSON (or bytes if expect="bytes").

        Raises the typed `ApiError` subclass for an error answer.
        """
        method = method.upper()
        headers = kwargs.get("headers") or {}
        replay_safe = method in _IDEMPOTENT_METHODS or "Idempotency-Key" in headers
        attempt = 0
        while True:
            try:
                response = self._http.request(method, path, **kwargs)
            except (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout) as exc:
                # Nothing reached the server: always safe to send again.
                self._pause_or_raise(attempt, None, f"{method} {path}: {exc}")
            except httpx.TransportError as exc:
                # The request may have been processed; only replay what is idempotent.
                # Limitation: uploads (POST /v1/models, /v1/datasets) carry no
                # Idempotency-Key in the v1 contract, so a lost answer to one is raised
                # rather than replayed, which could register a duplicate.
                if not replay_safe:
                    raise errors.ServiceUnavailable(503, "connection lost", str(exc)) from exc
                self._pause_or_raise(attempt, None, f"{method} {path}: {exc}")
            else:
                if response.status_code in _RETRY_STATUS and (
                    replay_safe or response.status_code in (429, 503)
                ):
                    if attempt < self.retries:
                        self._pause_or_raise(attempt, response, f"{method} {path}")
                        attempt += 1
                        continue
                return self._decode(response, expect)
            attempt += 1

    def _pause_or_raise(self, attempt: int, response: httpx.Response | None, what: str) -> None:
        if attempt >= self.retries:
            if response is not None:
                raise self._error(response)
            raise errors.ServiceUnavailable(
                503, "server unreachable", f"{what} (after {attempt + 1} attempts)"
            )
        delay = self.backoff * (2**attempt) * (1 + 0.25 * random.random())
        if response is not None:
            retry_after = response.headers.get("Retry-After", "")
            if retry_after.replace(".", "", 1).isdigit():
                delay = max(delay, float(retry_after))
        delay = min(delay, 10.0)
        logger.info("retrying %s in %.2fs (attempt %d of %d)", what, delay, attempt + 1,
                    self.retries)
        time.sleep(delay)

    @staticmethod
    def _error(response: httpx.Response) -> errors.ApiError:
        try:
            body: Any = response.json()
        except ValueError:
            body = response.text
        return errors.error_from_response(response.status_code, body, response.reason_phrase)

    def _decode(self, response: httpx.Response, expect: str) -> Any:
        if response.is_error:
            raise self._error(response)
        if expect == "bytes":
            return response.content
        if expect == "response":
            return response
        if not response.content:
            return None
        return response.json()

    def _paginate(self, path: str, params: dict[str, Any]) -> Iterator[dict[str, Any]]:
        """Yield items of a list endpoint, following `next_cursor` until it is null."""
        query = {k: v for k, v in params.items() if v is not None}
        while True:
            page = self.request("GET", path, params=query)
            yield from page["items"]
            cursor = page.get("next_cursor")
            if not cursor:
                return
            query["cursor"] = cursor

    # ------------------------------------------------------------------ health

    def healthy(self) -> bool:
        """True when GET /healthz answers 200 (no retries)."""
        try:
            return self._http.get("/healthz").status_code == 200
        except httpx.TransportError:
            return False

    def ready(self) -> bool:
        """True when GET /readyz answers 200: database and Redis reachable."""
        try:
            return self._http.get("/readyz").status_code == 200
        except httpx.TransportError:
            return False

    # ------------------------------------------------------------------ models

    def register_model(
        self,
        module_or_spec: torch.nn.Module | Mapping[str, Any],
        *,
        family: str,
        regularizer: Mapping[str, Any] | None = None,
        name: str | None = None,
        scope: Sequence[str] | None = None,
        weights: Mapping[str, torch.Tensor] | bytes | str | Path | None = None,
        input_shape: Sequence[int] | None = None,
    ) -> Any:
        """Upload a model; return its `ModelPublic`.

        `module_or_spec` is a `torch.nn.Sequential` of supported layers (converted here
        to the engine's architecture JSON and safetensors), or an architecture dict
        {"layers": [...]} together with `weights` (tensors, safetensors bytes or a path).
        `regularizer` is {"kind": "l2", "strength": λ, "exclude": [...]}; λ multiplies
        the penalty in L(θ) = mean loss + λ π(θ). `input_shape` (one row, no batch
        dim) is recorded in the architecture when the layers cannot imply it (CNNs).
        """
        from client import convert

        if isinstance(module_or_spec, Mapping):
            if weights is None:
                raise TypeError("register_model: an architecture dict needs weights=")
            architecture = dict(module_or_spec)
            blob = convert.weights_bytes(weights)
        else:
            architecture = convert.architecture_of(module_or_spec, input_shape)
            blob = convert.module_bytes(module_or_spec)
        spec: dict[str, Any] = {
            "name": name or "model",
            "architecture": architecture,
            "family": family,
            "regularizer": dict(regularizer or {"kind": "none", "strength": 0.0}),
        }
        if scope is not None:
            spec["scope"] = list(scope)
        body = self.request(
            "POST",
            "/v1/models",
            data={"spec": json.dumps(_jsonable(spec))},
            files={"weights": ("weights.safetensors", blob, "application/octet-stream")},
        )
        return _schemas().ModelPublic.model_validate(body)

    def get_model(self, model: Any) -> Any:
        """`ModelPublic` of one model (id or object)."""
        body = self.request("GET", f"/v1/models/{_id_of(model, 'model')}")
        return _schemas().ModelPublic.model_validate(body)

    def list_models(self, **filters: Any) -> list[Any]:
        """All models of this tenant, newest first as the server orders them."""
        schema = _schemas().ModelPublic
        return [schema.model_validate(m) for m in self._paginate("/v1/models", filters)]

    def download_weights(self, model: Any) -> dict[str, torch.Tensor]:
        """The model's tensors (state-dict names), loaded from safetensors."""
        from client import convert

        blob = self.request("GET", f"/v1/models/{_id_of(model, 'model')}/weights",
                            expect="bytes")
        return convert.load_tensors(blob)

    def download_model(self, model: Any) -> torch.nn.Module:
        """Rebuild the model as a `torch.nn.Sequential` with its stored weights."""
        from client import convert

        info = self.request("GET", f"/v1/models/{_id_of(model, 'model')}")
        architecture = info.get("architecture")
        if architecture is None:
            raise errors.AfifError("server did not send the model's architecture")
        return convert.build(architecture, self.download_weights(info["id"]))

    # ---------------------------------------------------------------- datasets

    def register_dataset(
        self,
        X: np.ndarray | pd.DataFrame,
        y: np.ndarray | Sequence[Any] | str | None = None,
        sensitive: np.ndarray | Sequence[Any] | str | None = None,
        *,
        name: str | None = None,
        features: Sequence[str] | None = None,
    ) -> Any:
        """Upload a dataset as .npz; return its `DatasetPublic`.

        `X` is (n, d) or (n, ...) for images, stored as float32. With a pandas frame,
        `y` and `sensitive` may name columns; the features are `features` or every
        other column. `y` is 0/1 (bernoulli), class indices (categorical), reals
        (gaussian) or counts (poisson).
        """
        X_arr, y_arr, s_arr = _dataset_arrays(X, y, sensitive, features)
        buf = io.BytesIO()
        arrays: dict[str, np.ndarray] = {"X": X_arr, "y": y_arr}
        if s_arr is not None:
            arrays["sensitive"] = s_arr
        np.savez_compressed(buf, **arrays)  # type: ignore[arg-type]
        data = {"meta": json.dumps({"name": name})} if name else {}
        body = self.request(
            "POST",
            "/v1/datasets",
            data=data,
            files={"file": ("data.npz", buf.getvalue(), "application/octet-stream")},
        )
        return _schemas().DatasetPublic.model_validate(body)

    def upload_dataset_file(
        self,
        path: str | Path,
        *,
        name: str | None = None,
        features: Sequence[str] | None = None,
        target: str | None = None,
        sensitive: str | None = None,
    ) -> Any:
        """Upload a .npz, .csv or .parquet file as is (tables need `features`/`target`)."""
        path = Path(path)
        meta: dict[str, Any] = {}
        if name:
            meta["name"] = name
        if features is not None:
            meta["features"] = list(features)
        if target is not None:
            meta["target"] = target
        if sensitive is not None:
            meta["sensitive"] = sensitive
        data = {"meta": json.dumps(meta)} if meta else {}
        body = self.request(
            "POST",
            "/v1/datasets",
            data=data,
            files={"file": (path.name, path.read_bytes(), "application/octet-stream")},
        )
        return _schemas().DatasetPublic.model_validate(body)

    def get_dataset(self, dataset: Any) -> Any:
        body = self.request("GET", f"/v1/datasets/{_id_of(dataset, 'dataset')}")
        return _schemas().DatasetPublic.model_validate(body)

    def list_datasets(self, **filters: Any) -> list[Any]:
        schema = _schemas().DatasetPublic
        return [schema.model_validate(d) for d in self._paginate("/v1/datasets", filters)]

    # -------------------------------------------------------------------- jobs

    def submit(
        self,
        kind: str,
        *,
        model: Any,
        dataset: Any,
        idempotency_key: str | None = None,
        **params: Any,
    ) -> Job:
        """Submit a job of `kind` (unlearning, attribution, fairness, cv); return it queued.

        Every call sends an Idempotency-Key (a fresh uuid4 unless given), so the
        client's own retries can never create a second job. `test_dataset=` may be
        given instead of `test_dataset_id=`.
        """
        if "test_dataset" in params:
            params["test_dataset_id"] = _id_of(params.pop("test_dataset"), "test_dataset")
        body = {
            "kind": kind,
            "model_id": _id_of(model, "model"),
            "dataset_id": _id_of(dataset, "dataset"),
            "params": _jsonable(params),
        }
        key = idempotency_key or str(uuid.uuid4())
        data = self.request("POST", "/v1/jobs", json=body, headers={"Idempotency-Key": key})
        return Job(self, data)

    def job(self, job: Any) -> Job:
        """Fetch one job by id."""
        return Job(self, self.request("GET", f"/v1/jobs/{_id_of(job, 'job')}"))

    def list_jobs(
        self, *, status: str | None = None, kind: str | None = None, limit: int | None = None
    ) -> list[Job]:
        """Jobs of this tenant, optionally filtered; follows the cursor through all pages."""
        params = {"status": status, "kind": kind, "limit": limit}
        return [Job(self, item) for item in self._paginate("/v1/jobs", params)]

    def cancel(self, job: Any) -> Job:
        data = self.request("POST", f"/v1/jobs/{_id_of(job, 'job')}/cancel")
        return Job(self, data) if isinstance(data, dict) and "id" in data else self.job(job)

    def raw_result(self, job: Any) -> dict[str, Any]:
        """The job's result JSON exactly as the server sent it (409 until succeeded)."""
        data: dict[str, Any] = self.request("GET", f"/v1/jobs/{_id_of(job, 'job')}/result")
        return data

    def result(self, job: Any) -> dict[str, Any]:
        """The job's result with artifacts downloaded and numeric lists as numpy arrays.

        Artifact references ({"artifact", "shape", "dtype"}) anywhere in the result, e.g.
        a cv fold's `indices`, are replaced by the downloaded array.
        """
        result: dict[str, Any] = self._materialize(self.raw_result(job))
        return result

    def artifact(self, url: str) -> np.ndarray:
        """Download one .npy artifact (URL as given in a result) without pickle."""
        blob = self.request("GET", url, expect="bytes")
        return np.load(io.BytesIO(blob), allow_pickle=False)

    def _materialize(self, value: Any) -> Any:
        if isinstance(value, dict):
            if "artifact" in value and "shape" in value:
                arr = self.artifact(str(value["artifact"]))
                if list(arr.shape) != list(value["shape"]):
                    raise errors.AfifError(
                        f"artifact {value['artifact']}: shape {arr.shape} != {value['shape']}"
                    )
                return arr
            return {k: self._materialize(v) for k, v in value.items()}
        if isinstance(value, list):
            numeric = _numeric_array(value)
            if numeric is not None:
                return numeric
            return [self._materialize(v) for v in value]
        return value


class Job:
    """A job on the server; attributes (`id`, `kind`, `status`, `progress`, ...) mirror
    the last fetched `JobPublic`."""

    def __init__(self, client: Client, data: Mapping[str, Any]) -> None:
        self._client = client
        self.info = _schemas().JobPublic.model_validate(dict(data))

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_") or name == "info":
            raise AttributeError(name)
        return getattr(self.info, name)

    def __repr__(self) -> str:
        return f"Job(id={self.info.id!r}, kind={self.info.kind!r}, status={self.info.status!r})"

    @property
    def done(self) -> bool:
        return str(self.info.status) in TERMINAL

    def refresh(self) -> Job:
        self.info = self._client.job(self.info.id).info
        return self

    def cancel(self) -> Job:
        self.info = self._client.cancel(self.info.id).info
        return self

    def wait(
        self,
        *,
        progress: bool = False,
        timeout: float | None = None,
        poll: float = 0.5,
        raise_on_failure: bool = True,
    ) -> Job:
        """Poll until the job is terminal; optionally draw a tqdm bar from its `progress`.

        Raises `JobFailed` / `JobCancelled` (unless `raise_on_failure=False`) and
        `WaitTimeout` after `timeout` seconds.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        bar = _ProgressBar(self.info.id, self.info.kind) if progress else None
        interval = min(0.1, poll)
        try:
            while True:
                if bar is not None:
                    bar.update(self.info)
                if self.done:
                    break
                if deadline is not None and time.monotonic() > deadline:
                    raise errors.WaitTimeout(
                        f"job {self.info.id} still {self.info.status} after {timeout}s"
                    )
                time.sleep(interval)
                interval = min(interval * 1.5, poll)
                self.refresh()
        finally:
            if bar is not None:
                bar.close()
        if raise_on_failure:
            self.raise_for_status()
        return self

    def raise_for_status(self) -> None:
        """Raise `JobFailed` or `JobCancelled` when the job ended that way."""
        status = str(self.info.status)
        if status == "failed":
            err = _as_dict(self.info.error)
            raise errors.JobFailed(
                str(self.info.id), str(err.get("code", "unknown")),
                str(err.get("message", "")),
            )
        if status == "cancelled":
            raise errors.JobCancelled(str(self.info.id))

    def result(self) -> dict[str, Any]:
        """The result (artifacts downloaded, numeric lists as numpy); 409 until succeeded."""
        return self._client.result(self.info.id)

    def raw_result(self) -> dict[str, Any]:
        return self._client.raw_result(self.info.id)


def _as_dict(value: Any) -> dict[str, Any]:
    if value is None:
        return {}
    if hasattr(value, "model_dump"):
        dumped: dict[str, Any] = value.model_dump()
        return dumped
    return dict(value)


class _ProgressBar:
    """A tqdm bar that follows a job's `progress` {phase, done, total}, one bar per phase."""

    def __init__(self, job_id: str, kind: str) -> None:
        from tqdm.auto import tqdm

        self._tqdm = tqdm
        self._label = f"{kind} {str(job_id)[:8]}"
        self._bar: Any = None
        self._phase: str | None = None

    def update(self, info: Any) -> None:
        if str(info.status) in TERMINAL:
            self.close()
            return
        prog = _as_dict(getattr(info, "progress", None))
        phase = str(prog.get("phase") or info.status)
        total = prog.get("total") or None
        done = prog.get("done") or 0
        if self._bar is None or phase != self._phase:
            if self._bar is not None:
                self._bar.close()
            # disable=None: no bar when stderr is not a terminal (logs, CI, captured runs).
            self._bar = self._tqdm(total=total, desc=f"{self._label} {phase}", leave=False,
                                   disable=None)
            self._phase = phase
        if total is not None and self._bar.total != total:
            self._bar.total = total
        self._bar.n = done
        self._bar.set_postfix_str(str(info.status), refresh=False)
        self._bar.refresh()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


def _dataset_arrays(
    X: Any, y: Any, sensitive: Any, features: Sequence[str] | None
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Normalize (X, y, sensitive) from numpy or a pandas frame; check matching rows."""
    if hasattr(X, "columns"):
        frame = X
        named = [c for c in (y, sensitive) if isinstance(c, str)]
        y = frame[y].to_numpy() if isinstance(y, str) else y
        sensitive = frame[sensitive].to_numpy() if isinstance(sensitive, str) else sensitive
        cols = list(features) if features is not None else [
            c for c in frame.columns if c not in named
        ]
        X = frame[cols].to_numpy()
    if y is None:
        raise TypeError("register_dataset: y is required")
    X_arr = np.asarray(X, dtype=np.float32)
    y_arr = np.asarray(y)
    if y_arr.dtype.kind not in "biuf":
        raise TypeError(f"register_dataset: y must be numeric, got dtype {y_arr.dtype}")
    if X_arr.ndim < 2:
        raise ValueError(f"register_dataset: X must be at least 2-D, got shape {X_arr.shape}")
    if y_arr.shape[0] != X_arr.shape[0]:
        raise ValueError(f"register_dataset: X has {X_arr.shape[0]} rows, y {y_arr.shape[0]}")
    s_arr = None
    if sensitive is not None:
        s_arr = np.asarray(sensitive)
        if s_arr.shape[0] != X_arr.shape[0]:
            raise ValueError(
                f"register_dataset: X has {X_arr.shape[0]} rows, sensitive {s_arr.shape[0]}"
            )
    return X_arr, y_arr, s_arr

