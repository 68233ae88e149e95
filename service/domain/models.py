"""Models: register (spec + safetensors weights), list, get, download; fit checks vs data.

Weights are parsed with safetensors only (never torch.load / pickle) and checked against
the architecture by the engine before anything is stored.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
from sqlalchemy import select
from sqlalchemy.orm import Session

from models_store import Store
from service import schemas
from service.domain.pagination import page as split_page
from service.domain.pagination import paginate
from service.errors import InvalidInput, NotFound
from service.models import Model, Tenant, new_id

logger = logging.getLogger(__name__)


def _spec_error(exc: Exception, field: str) -> InvalidInput:
    return InvalidInput(f"{field}: {exc}", field=field)


def parse_weights(data: bytes) -> dict[str, Any]:
    """safetensors bytes -> {name: Tensor}; anything else (a pickle, junk) is a 422."""
    from safetensors.torch import load

    if not data:
        raise InvalidInput("weights: the file is empty", field="weights")
    try:
        tensors = load(data)
    except Exception as exc:
        raise InvalidInput(
            f"weights: not a safetensors file ({type(exc).__name__}: {exc})", field="weights"
        ) from None
    if not tensors:
        raise InvalidInput("weights: the safetensors file holds no tensors", field="weights")
    return tensors


def validate_model(spec: schemas.ModelCreate, tensors: dict[str, Any]) -> int:
    """Check architecture, weights, family and regularizer together; return n_parameters."""
    from engine.errors import SpecError
    from engine.families import get_family
    from engine.regularizers import make_regularizer
    from engine.spec import build_model, load_weights, output_dim, parameter_count

    # The weights bound the size, so a tiny file cannot make us allocate a giant architecture;
    # the slack lets a near miss reach load_weights, whose message names the tensors.
    supplied = sum(int(t.numel()) for t in tensors.values())
    try:
        module = build_model(spec.architecture, max_parameters=max(2 * supplied, 100_000))
    except SpecError as exc:
        raise _spec_error(exc, "spec.architecture") from None
    try:
        load_weights(module, tensors)
    except SpecError as exc:
        raise _spec_error(exc, "weights") from None

    try:
        out_dim = output_dim(spec.architecture)
    except SpecError:
        out_dim = None
    # Label-free family check: only the output width matters here (gaussian takes any).
    if out_dim is not None and spec.family != "gaussian":
        import torch

        try:
            get_family(spec.family).check_labels(torch.zeros(0), out_dim)
        except SpecError as exc:
            raise _spec_error(exc, "spec.family") from None

    names = {name for name, _ in module.named_parameters()}
    _check_regularizer_names(spec.regularizer, names)
    if spec.scope is not None:
        unknown = [n for n in spec.scope if n not in names]
        if unknown or not spec.scope:
            raise InvalidInput(
                f"spec.scope: {unknown[0]!r} is not a parameter of the model"
                if unknown else "spec.scope: give at least one parameter name (or omit it)",
                field="spec.scope",
            )
    try:
        make_regularizer(**regularizer_arguments(spec.regularizer.model_dump()))
    except SpecError as exc:
        raise _spec_error(exc, "spec.regularizer") from None
    return int(parameter_count(module))


def regularizer_arguments(regularizer: dict[str, Any]) -> dict[str, Any]:
    """Keyword arguments of engine.regularizers.make_regularizer from a stored regularizer
    dict (a RegularizerSpec dump); unset options keep the engine's defaults."""
    arguments: dict[str, Any] = {
        "kind": regularizer.get("kind", "none"),
        "strength": regularizer.get("strength", 0.0),
        "exclude": tuple(regularizer.get("exclude") or ()),
    }
    if regularizer.get("l1_ratio") is not None:
        arguments["l1_ratio"] = float(regularizer["l1_ratio"])
    if regularizer.get("groups") is not None:
        arguments["groups"] = [list(group) for group in regularizer["groups"]]
    return arguments


def _check_regularizer_names(regularizer: schemas.RegularizerSpec, names: set[str]) -> None:
    """`exclude` and `groups` must name parameters of the model; options must suit the kind."""
    known = f"(parameters: {', '.join(sorted(names))})"
    unknown = [n for n in regularizer.exclude if n not in names]
    if unknown:
        raise InvalidInput(
            f"spec.regularizer.exclude: {', '.join(map(repr, unknown))} "
            f"{'is not a parameter' if len(unknown) == 1 else 'are not parameters'} of the "
            f"model {known}",
            field="spec.regularizer.exclude",
        )
    if regularizer.l1_ratio is not None and regularizer.kind != "elastic_net":
        raise InvalidInput(
            f"spec.regularizer.l1_ratio: applies to elastic_net only, not {regularizer.kind!r}",
            field="spec.regularizer.l1_ratio",
        )
    if regularizer.groups is None:
        return
    if regularizer.kind != "group_lasso":
        raise InvalidInput(
            f"spec.regularizer.groups: applies to group_lasso only, not {regularizer.kind!r}",
            field="spec.regularizer.groups",
        )
    listed = [n for group in regularizer.groups for n in group]
    unknown = sorted({n for n in listed if n not in names})
    if unknown:
        raise InvalidInput(
            f"spec.regularizer.groups: {', '.join(map(repr, unknown))} "
            f"{'is not a parameter' if len(unknown) == 1 else 'are not parameters'} of the "
            f"model {known}",
            field="spec.regularizer.groups",
        )
    repeated = sorted({n for n in listed if listed.count(n) > 1})
    if repeated:
        # A tensor in two groups would be penalized twice; almost surely a mistake.
        raise InvalidInput(
            f"spec.regularizer.groups: {', '.join(map(repr, repeated))} appear in more than "
            "one group",
            field="spec.regularizer.groups",
        )


def register_model(
    session: Session, tenant: Tenant, spec: schemas.ModelCreate, weights: bytes, store: Store
) -> Model:
    """Validate spec + weights, store the weights, write the row; a failure leaves neither."""
    tensors = parse_weights(weights)
    n_parameters = validate_model(spec, tensors)

    blob = store.put(weights)
    model = Model(
        id=new_id(),
        tenant_id=tenant.id,
        name=spec.name,
        family=spec.family,
        architecture=spec.architecture,
        regularizer=spec.regularizer.model_dump(mode="json", exclude_none=True),
        scope=spec.scope,
        n_parameters=n_parameters,
        sha256=blob.sha256,
        size_bytes=blob.size,
        parent_id=None,
    )
    session.add(model)
    try:
        session.commit()
    except Exception:
        session.rollback()
        if blob.created and not _referenced(session, blob.sha256):
            store.delete(blob.sha256)
        raise
    logger.info("model %s registered (%s, %d parameters)", model.id, model.family, n_parameters)
    return model


def _referenced(session: Session, digest: str) -> bool:
    return session.scalar(select(Model.id).where(Model.sha256 == digest).limit(1)) is not None


def get_model(session: Session, tenant_id: str, model_id: str) -> Model:
    """The tenant's model; another tenant's or an unknown id is NotFound."""
    model = session.get(Model, model_id)
    if model is None or model.tenant_id != tenant_id:
        raise NotFound(f"model {model_id} not found", field="model_id")
    return model


def list_models(
    session: Session, tenant_id: str, *, limit: int = 50, cursor: str | None = None
) -> tuple[list[Model], str | None]:
    """A page of the tenant's models, newest first; (items, next_cursor)."""
    stmt = select(Model).where(Model.tenant_id == tenant_id)
    rows = list(session.scalars(paginate(stmt, Model, limit, cursor)))
    return split_page(rows, limit)


def model_public(model: Model) -> schemas.ModelPublic:
    """The API view of a model row."""
    return schemas.ModelPublic.model_validate(model, from_attributes=True)


def check_dataset_against_model(
    model: Model, feature_shape: Sequence[int], y: np.ndarray, *, field: str
) -> None:
    """Rows of shape `feature_shape` must be the model's input; y must suit its family."""
    import torch

    from engine.errors import SpecError
    from engine.families import get_family
    from engine.spec import input_shape, output_dim

    expected = input_shape(model.architecture)
    if expected is not None and tuple(feature_shape) != tuple(expected):
        raise InvalidInput(
            f"{field}: rows have shape {list(feature_shape)} ({int(np.prod(feature_shape))} "
            f"features) but model {model.id} expects {list(expected)}",
            field=field,
        )
    try:
        get_family(model.family).check_labels(torch.from_numpy(np.asarray(y)),
                                              output_dim(model.architecture))
    except SpecError as exc:
        raise InvalidInput(
            f"{field}: labels do not fit the model's family {model.family!r}: {exc}", field=field
        ) from None
