"""Declarative model specs: JSON architecture <-> `torch.nn.Sequential`, strict weights.

An architecture is ``{"layers": [...], "input_shape": [...]?}``; each layer is
``{"type": <torch.nn class name lower-cased>, <constructor kwargs>}`` or
``{"type": "residual", "layers": [...]}`` (y = x + body(x)). Parameter names are
PyTorch's, e.g. ``"0.weight"`` or ``"3.body.0.weight"``.
"""

from __future__ import annotations

import inspect
import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from engine.errors import SpecError

logger = logging.getLogger(__name__)

DEFAULT_MAX_PARAMETERS = 200_000_000  # refuse specs that would not fit a worker's memory


class Residual(nn.Module):
    """y = x + body(x); the body is an `nn.Sequential` so names read ``"<i>.body.<j>.*"``."""

    def __init__(self, body: nn.Sequential) -> None:
        super().__init__()
        self.body = body

    def forward(self, x: Tensor) -> Tensor:
        return x + self.body(x)


# Kinds of keyword values, checked before any module is built so errors name the key.
_INT, _POS_INT, _BOOL, _FLOAT, _STR = "int", "positive int", "bool", "number", "string"
_INTS = "int or list of ints"
_OPT_INT = "int or null"
_OPT_INTS = "int, list of ints or null"


@dataclass(frozen=True)
class _LayerKind:
    cls: type[nn.Module]
    kwargs: Mapping[str, str]
    choices: Mapping[str, tuple[str, ...]] | None = None


_CONV = {
    "in_channels": _POS_INT, "out_channels": _POS_INT, "kernel_size": _INTS, "stride": _INTS,
    "padding": _INTS, "dilation": _INTS, "groups": _POS_INT, "bias": _BOOL,
    "padding_mode": _STR,
}
_CONV_CHOICES = {"padding_mode": ("zeros", "reflect", "replicate", "circular")}
_BN = {
    "num_features": _POS_INT, "eps": _FLOAT, "momentum": _FLOAT, "affine": _BOOL,
    "track_running_stats": _BOOL,
}

LAYER_KINDS: dict[str, _LayerKind] = {
    "linear": _LayerKind(nn.Linear, {"in_features": _POS_INT, "out_features": _POS_INT,
                                     "bias": _BOOL}),
    "conv1d": _LayerKind(nn.Conv1d, _CONV, _CONV_CHOICES),
    "conv2d": _LayerKind(nn.Conv2d, _CONV, _CONV_CHOICES),
    "maxpool2d": _LayerKind(nn.MaxPool2d, {"kernel_size": _INTS, "stride": _OPT_INTS,
                                           "padding": _INTS, "dilation": _INTS,
                                           "ceil_mode": _BOOL}),
    "avgpool2d": _LayerKind(nn.AvgPool2d, {"kernel_size": _INTS, "stride": _OPT_INTS,
                                           "padding": _INTS, "ceil_mode": _BOOL,
                                           "count_include_pad": _BOOL,
                                           "divisor_override": _OPT_INT}),
    "adaptiveavgpool2d": _LayerKind(nn.AdaptiveAvgPool2d, {"output_size": _INTS}),
    "flatten": _LayerKind(nn.Flatten, {"start_dim": _INT, "end_dim": _INT}),
    "identity": _LayerKind(nn.Identity, {}),
    "relu": _LayerKind(nn.ReLU, {}),
    "selu": _LayerKind(nn.SELU, {}),
    "elu": _LayerKind(nn.ELU, {"alpha": _FLOAT}),
    "leakyrelu": _LayerKind(nn.LeakyReLU, {"negative_slope": _FLOAT}),
    "softplus": _LayerKind(nn.Softplus, {"beta": _FLOAT, "threshold": _FLOAT}),
    "tanh": _LayerKind(nn.Tanh, {}),
    "gelu": _LayerKind(nn.GELU, {"approximate": _STR}, {"approximate": ("none", "tanh")}),
    "sigmoid": _LayerKind(nn.Sigmoid, {}),
    "dropout": _LayerKind(nn.Dropout, {"p": _FLOAT}),
    "batchnorm1d": _LayerKind(nn.BatchNorm1d, _BN),
    "batchnorm2d": _LayerKind(nn.BatchNorm2d, _BN),
    "layernorm": _LayerKind(nn.LayerNorm, {"normalized_shape": _INTS, "eps": _FLOAT,
                                           "elementwise_affine": _BOOL, "bias": _BOOL}),
    "embedding": _LayerKind(nn.Embedding, {"num_embeddings": _POS_INT,
                                           "embedding_dim": _POS_INT,
                                           "padding_idx": _OPT_INT}),
}
_TYPE_OF_CLASS = {kind.cls: name for name, kind in LAYER_KINDS.items()}


def _check_value(where: str, key: str, kind: str, value: Any) -> Any:
    """Validate one JSON value against its kind; lists become tuples for torch."""
    def is_int(v: Any) -> bool:
        return isinstance(v, int) and not isinstance(v, bool)

    ok: bool
    if kind == _INT:
        ok = is_int(value)
    elif kind == _POS_INT:
        ok = is_int(value) and value > 0
    elif kind == _BOOL:
        ok = isinstance(value, bool)
    elif kind == _FLOAT:
        ok = (is_int(value) or isinstance(value, float)) and math.isfinite(value)
    elif kind == _STR:
        ok = isinstance(value, str)
    elif kind in (_INTS, _OPT_INTS):
        if value is None and kind == _OPT_INTS:
            return None
        if isinstance(value, list | tuple):
            ok = len(value) > 0 and all(is_int(v) and v >= 0 for v in value)
            value = tuple(value)
        else:
            ok = is_int(value) and value >= 0
    elif kind == _OPT_INT:
        ok = value is None or is_int(value)
    else:  # pragma: no cover - table above is closed
        raise AssertionError(kind)
    if not ok:
        raise SpecError(f"{where}: key {key!r} must be a {kind}, got {value!r}")
    return value


def _build_layers(layers: Any, prefix: str, meta: bool) -> nn.Sequential:
    if not isinstance(layers, list) or not layers:
        raise SpecError(f"{prefix or 'architecture'}: 'layers' must be a non-empty list")
    modules: list[nn.Module] = []
    for index, layer in enumerate(layers):
        where = f"layer {prefix}{index}"
        if not isinstance(layer, dict):
            raise SpecError(f"{where}: must be an object with a 'type' key")
        kind_name = layer.get("type")
        if kind_name == "residual":
            extra = sorted(set(layer) - {"type", "layers"})
            if extra:
                raise SpecError(f"{where}: unknown key {extra[0]!r} for residual")
            body = _build_layers(layer.get("layers"), f"{prefix}{index}.body.", meta)
            modules.append(Residual(body))
            continue
        if not isinstance(kind_name, str) or kind_name not in LAYER_KINDS:
            known = ", ".join(sorted([*LAYER_KINDS, "residual"]))
            raise SpecError(f"{where}: unknown layer type {kind_name!r} (known: {known})")
        kind = LAYER_KINDS[kind_name]
        kwargs: dict[str, Any] = {}
        for key, value in layer.items():
            if key == "type":
                continue
            if key not in kind.kwargs:
                allowed = ", ".join(kind.kwargs) or "none"
                raise SpecError(
                    f"{where} ({kind_name}): unknown key {key!r} (allowed: {allowed})")
            kwargs[key] = _check_value(f"{where} ({kind_name})", key, kind.kwargs[key], value)
            choices = (kind.choices or {}).get(key)
            if choices is not None and value not in choices:
                raise SpecError(f"{where} ({kind_name}): key {key!r} must be one of {choices}")
        try:
            if meta:
                with torch.device("meta"):
                    module = kind.cls(**kwargs)
            else:
                module = kind.cls(**kwargs)
        except (TypeError, ValueError, RuntimeError) as exc:
            raise SpecError(f"{where} ({kind_name}): {exc}") from exc
        modules.append(module)
    return nn.Sequential(*modules)


def _check_architecture(architecture: Any) -> None:
    if not isinstance(architecture, dict):
        raise SpecError("architecture must be an object with a 'layers' list")
    extra = sorted(set(architecture) - {"layers", "input_shape"})
    if extra:
        raise SpecError(f"architecture: unknown key {extra[0]!r} (allowed: layers, input_shape)")
    shape = architecture.get("input_shape")
    if shape is not None and (
        not isinstance(shape, list | tuple) or not shape
        or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in shape)
    ):
        raise SpecError(f"architecture: 'input_shape' must be a list of positive ints, got "
                        f"{shape!r}")


def build_model(
    architecture: dict[str, Any],
    dtype: torch.dtype = torch.float32,
    max_parameters: int = DEFAULT_MAX_PARAMETERS,
) -> nn.Sequential:
    """Build the `nn.Sequential` an architecture describes, in eval mode.

    Checked on the meta device first (kwargs, parameter count, and a forward pass when
    the input shape is known), so a bad spec fails fast without allocating memory.
    """
    _check_architecture(architecture)
    meta_model = _build_layers(architecture["layers"] if "layers" in architecture else None,
                               "", meta=True)
    count = sum(p.numel() for p in meta_model.parameters())
    if count > max_parameters:
        raise SpecError(f"architecture has {count} parameters, more than the limit "
                        f"{max_parameters}")
    shape = input_shape(architecture)
    if shape is not None:
        _meta_forward(meta_model, shape, architecture)

    model = _build_layers(architecture["layers"], "", meta=False).to(dtype)
    model.eval()
    return model


def _meta_forward(model: nn.Module, shape: tuple[int, ...], arch: dict[str, Any]) -> Tensor:
    first = arch["layers"][0]
    dtype = torch.long if first.get("type") == "embedding" else torch.float32
    x = torch.zeros((2, *shape), device="meta", dtype=dtype)
    model.eval()
    try:
        return model(x)
    except (RuntimeError, ValueError, IndexError) as exc:
        raise SpecError(f"architecture: a batch of input shape {list(shape)} does not go "
                        f"through the layers: {exc}") from exc


def input_shape(architecture: dict[str, Any]) -> tuple[int, ...] | None:
    """Shape of one input row (no batch dim): declared ``input_shape`` or inferred from a
    leading linear / batchnorm1d layer; None when unknown (e.g. a conv net without it)."""
    _check_architecture(architecture)
    if architecture.get("input_shape") is not None:
        return tuple(architecture["input_shape"])
    for layer in architecture.get("layers") or []:
        kind = layer.get("type") if isinstance(layer, dict) else None
        if kind == "linear" and isinstance(layer.get("in_features"), int):
            return (layer["in_features"],)
        if kind == "batchnorm1d" and isinstance(layer.get("num_features"), int):
            return (layer["num_features"],)
        if kind in ("flatten", "identity", "dropout"):
            continue
        return None
    return None


def output_dim(architecture: dict[str, Any]) -> int:
    """Number of model outputs K per row (the size of the last dimension)."""
    shape = input_shape(architecture)
    meta_model = _build_layers(architecture.get("layers"), "", meta=True)
    if shape is not None:
        return int(_meta_forward(meta_model, shape, architecture).shape[-1])
    for module in reversed(list(meta_model.modules())):
        for attr in ("out_features", "embedding_dim", "num_features", "out_channels"):
            if isinstance(getattr(module, attr, None), int):
                return int(getattr(module, attr))
    raise SpecError("architecture: cannot tell the output size; give 'input_shape'")


def _json_value(value: Any) -> Any:
    """Tuples become lists, and a list of equal sizes collapses to one int (as torch takes)."""
    if isinstance(value, tuple | list):
        value = list(value)
        if value and all(v == value[0] for v in value):
            return value[0]
    return value


def _layer_of(module: nn.Module, where: str) -> dict[str, Any]:
    if isinstance(module, Residual):
        return {"type": "residual", "layers": _layers_of(module.body, f"{where}.body.")}
    name = _TYPE_OF_CLASS.get(type(module))
    if name is None:
        raise SpecError(f"layer {where}: module {type(module).__name__} has no spec type")
    kind = LAYER_KINDS[name]
    defaults = {k: p.default for k, p in inspect.signature(kind.cls.__init__).parameters.items()}
    layer: dict[str, Any] = {"type": name}
    for key in kind.kwargs:
        if key == "bias":
            value: Any = getattr(module, "bias", None) is not None
        else:
            value = getattr(module, key)
        value = _json_value(value)
        default = defaults.get(key, inspect.Parameter.empty)
        if default is inspect.Parameter.empty or _json_value(default) != value:
            layer[key] = value
    return layer


def _layers_of(model: nn.Sequential, prefix: str) -> list[dict[str, Any]]:
    return [_layer_of(m, f"{prefix}{i}") for i, m in enumerate(model)]


def architecture_of(model: nn.Sequential, input_shape: tuple[int, ...] | None = None
                    ) -> dict[str, Any]:
    """Inverse of `build_model`: the JSON architecture (non-default kwargs only)."""
    if not isinstance(model, nn.Sequential):
        raise SpecError("architecture_of needs an nn.Sequential")
    arch: dict[str, Any] = {"layers": _layers_of(model, "")}
    if input_shape is not None:
        arch["input_shape"] = list(input_shape)
    return arch


_OPTIONAL_BUFFERS = ("num_batches_tracked",)  # bookkeeping only; unused in eval mode


def load_weights(model: nn.Module, tensors: Mapping[str, Tensor]) -> None:
    """Copy `tensors` into the model's parameters and buffers; names must match exactly.

    Raises `SpecError` naming missing, unexpected, mis-shaped and non-finite tensors;
    nothing is written unless everything checks.
    """
    expected = model.state_dict()
    missing = [k for k in expected if k not in tensors
               and not k.endswith(_OPTIONAL_BUFFERS)]
    unexpected = [k for k in tensors if k not in expected]
    misshaped = [f"{k} (expected {list(expected[k].shape)}, got {list(tensors[k].shape)})"
                 for k in tensors if k in expected and tensors[k].shape != expected[k].shape]
    problems = []
    if missing:
        problems.append("missing: " + ", ".join(missing))
    if unexpected:
        problems.append("unexpected: " + ", ".join(unexpected))
    if misshaped:
        problems.append("wrong shape: " + "; ".join(misshaped))
    if problems:
        raise SpecError("weights do not match the architecture; " + "; ".join(problems))
    nonfinite = [k for k, t in tensors.items()
                 if t.is_floating_point() and not bool(torch.isfinite(t).all())]
    if nonfinite:
        raise SpecError("weights contain NaN or inf: " + ", ".join(nonfinite))

    with torch.no_grad():
        for key, target in expected.items():
            if key in tensors:
                target.copy_(tensors[key].to(dtype=target.dtype, device=target.device))
    logger.debug("loaded %d tensors", len(tensors))


def parameter_count(model: nn.Module) -> int:
    """Number of scalar parameters (buffers excluded)."""
    return sum(p.numel() for p in model.parameters())

