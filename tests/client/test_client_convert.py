"""module -> (architecture JSON, safetensors) -> module gives the same function."""

from __future__ import annotations

import json

import pytest
import torch

from client import convert
from engine.errors import SpecError


def _check_round_trip(module: torch.nn.Sequential, x: torch.Tensor,
                      input_shape: tuple[int, ...] | None = None) -> None:
    module.eval()
    arch = convert.architecture_of(module, input_shape)
    json.dumps(arch)  # the architecture must be plain JSON
    rebuilt = convert.build(json.loads(json.dumps(arch)), convert.module_bytes(module))
    with torch.no_grad():
        assert torch.equal(rebuilt(x), module(x))
    assert list(rebuilt.state_dict()) == list(module.state_dict())


def test_mlp_round_trip() -> None:
    torch.manual_seed(0)
    module = torch.nn.Sequential(torch.nn.Linear(7, 16), torch.nn.SELU(), torch.nn.Linear(16, 16),
                                 torch.nn.Tanh(), torch.nn.Linear(16, 3))
    _check_round_trip(module, torch.randn(5, 7))


def test_cnn_round_trip() -> None:
    torch.manual_seed(1)
    module = torch.nn.Sequential(
        torch.nn.Conv2d(1, 4, kernel_size=3, padding=1), torch.nn.ReLU(),
        torch.nn.MaxPool2d(2), torch.nn.Flatten(), torch.nn.Linear(4 * 4 * 4, 2),
    )
    _check_round_trip(module, torch.randn(3, 1, 8, 8), input_shape=(1, 8, 8))


def test_weights_bytes_accepts_tensors_bytes_and_paths(tmp_path: object) -> None:
    module = torch.nn.Sequential(torch.nn.Linear(3, 2))
    blob = convert.module_bytes(module)
    path = tmp_path / "w.safetensors"  # type: ignore[operator]
    path.write_bytes(blob)
    for source in (module.state_dict(), blob, path):
        tensors = convert.load_tensors(convert.weights_bytes(source))
        assert torch.equal(tensors["0.weight"], module[0].weight.detach())


def test_unsupported_layer_is_named() -> None:
    class Custom(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x

    with pytest.raises(SpecError, match="Custom"):
        convert.architecture_of(torch.nn.Sequential(torch.nn.Linear(2, 2), Custom()))


def test_non_sequential_is_refused() -> None:
    with pytest.raises(TypeError, match="Sequential"):
        convert.architecture_of(torch.nn.Linear(2, 2))
