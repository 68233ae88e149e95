"""torch module <-> (architecture JSON, safetensors bytes), the upload format of models.

The architecture format is the engine's ({"layers": [...]}); conversion goes through
`engine.spec` so the client and the server read a model the same way. Tensor names are
the module's state-dict names ("0.weight", "0.bias", ...).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

logger = logging.getLogger(__name__)


def architecture_of(
    module: torch.nn.Module, input_shape: Sequence[int] | None = None
) -> dict[str, Any]:
    """The engine's architecture dict for a `torch.nn.Sequential` of supported layers.

    `input_shape` is one input row's shape without the batch dimension, e.g. (1, 8, 8).

    Raises `engine.errors.SpecError` naming the first unsupported layer.
    """
    from engine.spec import architecture_of as engine_architecture_of

    if not isinstance(module, torch.nn.Sequential):
        raise TypeError(
            f"only torch.nn.Sequential models can be uploaded, got {type(module).__name__}"
        )
    shape = tuple(int(n) for n in input_shape) if input_shape is not None else None
    return dict(engine_architecture_of(module, shape))


def state_tensors(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The module's state dict as contiguous CPU tensors that own their memory."""
    # clone(): safetensors refuses tensors that share storage (e.g. views, tied weights).
    return {k: v.detach().cpu().contiguous().clone() for k, v in module.state_dict().items()}


def module_bytes(module: torch.nn.Module) -> bytes:
    """The module's weights serialized as safetensors."""
    return bytes(st_save(state_tensors(module)))


def weights_bytes(weights: Mapping[str, torch.Tensor] | bytes | str | Path) -> bytes:
    """Safetensors bytes from a tensor dict, raw bytes, or a file path."""
    if isinstance(weights, bytes | bytearray):
        return bytes(weights)
    if isinstance(weights, str | Path):
        return Path(weights).read_bytes()
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in weights.items()}
    return bytes(st_save(tensors))


def load_tensors(blob: bytes) -> dict[str, torch.Tensor]:
    """Parse safetensors bytes (no pickle involved)."""
    return dict(st_load(blob))


def build(architecture: Mapping[str, Any], weights: Mapping[str, torch.Tensor] | bytes
          ) -> torch.nn.Sequential:
    """Rebuild a module from its architecture and weights (strict: every tensor must fit)."""
    from engine.spec import build_model, load_weights

    model = build_model(dict(architecture))
    tensors = load_tensors(weights) if isinstance(weights, bytes | bytearray) else dict(weights)
    load_weights(model, tensors)
    model.eval()
    return model


def round_trip(module: torch.nn.Sequential) -> torch.nn.Sequential:
    """module -> (architecture, safetensors) -> module; what an upload then download does."""
    return build(architecture_of(module), module_bytes(module))
