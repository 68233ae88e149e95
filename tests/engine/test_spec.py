"""Model specs: every layer type builds, round-trips, and bad specs/weights are named."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load, save
from torch import nn

from engine.errors import SpecError
from engine.spec import (
    LAYER_KINDS,
    architecture_of,
    build_model,
    input_shape,
    load_weights,
    output_dim,
)

IMAGE_NET = {
    "input_shape": [3, 8, 8],
    "layers": [
        {"type": "conv2d", "in_channels": 3, "out_channels": 4, "kernel_size": 3,
         "padding": 1, "bias": False},
        {"type": "batchnorm2d", "num_features": 4},
        {"type": "relu"},
        {"type": "residual", "layers": [
            {"type": "conv2d", "in_channels": 4, "out_channels": 4, "kernel_size": 3,
             "padding": 1},
            {"type": "gelu", "approximate": "tanh"},
        ]},
        {"type": "maxpool2d", "kernel_size": 2},
        {"type": "avgpool2d", "kernel_size": 2, "stride": 1},
        {"type": "adaptiveavgpool2d", "output_size": 1},
        {"type": "flatten"},
        {"type": "dropout", "p": 0.3},
        {"type": "linear", "in_features": 4, "out_features": 2},
    ],
}

# One layer of every other type, with the input shape it needs.
SINGLE_LAYERS = [
    ({"type": "linear", "in_features": 5, "out_features": 3, "bias": False}, [5]),
    ({"type": "conv1d", "in_channels": 2, "out_channels": 3, "kernel_size": 2}, [2, 6]),
    ({"type": "identity"}, [5]),
    ({"type": "selu"}, [5]),
    ({"type": "elu", "alpha": 0.5}, [5]),
    ({"type": "leakyrelu", "negative_slope": 0.2}, [5]),
    ({"type": "softplus", "beta": 2.0}, [5]),
    ({"type": "tanh"}, [5]),
    ({"type": "sigmoid"}, [5]),
    ({"type": "batchnorm1d", "num_features": 5, "eps": 1e-3}, [5]),
    ({"type": "layernorm", "normalized_shape": 5}, [5]),
    ({"type": "embedding", "num_embeddings": 10, "embedding_dim": 4}, [3]),
]


def test_image_net_builds_runs_and_names_parameters() -> None:
    model = build_model(IMAGE_NET)

    names = list(model.state_dict())
    assert "3.body.0.weight" in names and "3.body.0.bias" in names
    assert "1.running_mean" in names and "0.bias" not in names
    assert not model.training
    assert model(torch.randn(5, 3, 8, 8)).shape == (5, 2)
    assert output_dim(IMAGE_NET) == 2
    assert input_shape(IMAGE_NET) == (3, 8, 8)


def test_every_layer_kind_is_covered() -> None:
    def types(layers: list[dict]) -> set[str]:
        out = set()
        for layer in layers:
            out |= types(layer["layers"]) if layer["type"] == "residual" else {layer["type"]}
        return out

    covered = {layer["type"] for layer, _ in SINGLE_LAYERS} | types(IMAGE_NET["layers"])
    assert covered == set(LAYER_KINDS)


@pytest.mark.parametrize(("layer", "shape"), SINGLE_LAYERS, ids=lambda v: str(v)[:40])
def test_single_layers_build_and_round_trip(layer: dict, shape: list[int]) -> None:
    arch = {"layers": [layer], "input_shape": shape}
    model = build_model(arch)

    again = architecture_of(model, input_shape=tuple(shape))
    assert again == arch
    dtype = torch.long if layer["type"] == "embedding" else torch.float32
    x = torch.zeros((2, *shape), dtype=dtype)
    assert model(x).shape[0] == 2


def test_architecture_of_round_trips_image_net() -> None:
    model = build_model(IMAGE_NET)
    arch = architecture_of(model, input_shape=(3, 8, 8))

    rebuilt = build_model(arch)
    assert architecture_of(rebuilt, input_shape=(3, 8, 8)) == arch
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == \
        {k: v.shape for k, v in model.state_dict().items()}
    load_weights(rebuilt, model.state_dict())
    x = torch.randn(3, 3, 8, 8)
    torch.testing.assert_close(rebuilt(x), model(x))


def test_architecture_of_hand_built_sequential() -> None:
    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 1, bias=False))
    assert architecture_of(model) == {"layers": [
        {"type": "linear", "in_features": 4, "out_features": 3},
        {"type": "relu"},
        {"type": "linear", "in_features": 3, "out_features": 1, "bias": False},
    ]}
    with pytest.raises(SpecError, match="LSTM"):
        architecture_of(nn.Sequential(nn.LSTM(3, 3)))


@pytest.mark.parametrize(("arch", "fragment"), [
    ({"layers": [{"type": "transformer"}]}, "layer 0: unknown layer type 'transformer'"),
    ({"layers": [{"type": "linear", "in_features": 3, "out_features": 2, "wieght": 1}]},
     "layer 0 (linear): unknown key 'wieght'"),
    ({"layers": [{"type": "relu"}, {"type": "residual", "layers": [
        {"type": "linear", "in_features": 3, "out_features": 3, "device": "cuda"}]}]},
     "layer 1.body.0 (linear): unknown key 'device'"),
    ({"layers": [{"type": "linear", "in_features": "30", "out_features": 2}]},
     "key 'in_features' must be a positive int"),
    ({"layers": [{"type": "linear", "in_features": 3, "out_features": 0}]},
     "'out_features' must be a positive int"),
    ({"layers": [{"type": "gelu", "approximate": "fast"}]}, "'approximate' must be one of"),
    ({"layers": []}, "non-empty list"),
    ({"layers": [{"type": "relu"}], "dtype": "float16"}, "unknown key 'dtype'"),
    ({"layers": [{"type": "residual", "layers": [{"type": "relu"}], "scale": 2}]},
     "unknown key 'scale' for residual"),
    ({"input_shape": [4], "layers": [{"type": "linear", "in_features": 3,
                                      "out_features": 2}]}, "does not go through"),
    ({"input_shape": [-1], "layers": [{"type": "relu"}]}, "input_shape"),
    ("not a dict", "architecture must be an object"),
])
def test_bad_architectures_are_named(arch: object, fragment: str) -> None:
    with pytest.raises(SpecError) as info:
        build_model(arch)  # type: ignore[arg-type]
    assert fragment in str(info.value)


def test_parameter_limit_is_checked_before_allocation() -> None:
    huge = {"layers": [{"type": "linear", "in_features": 100_000, "out_features": 100_000}]}
    with pytest.raises(SpecError, match="parameters, more than the limit"):
        build_model(huge, max_parameters=1_000_000)


def test_load_weights_names_missing_unexpected_and_misshaped() -> None:
    model = build_model(IMAGE_NET)
    good = {k: v.clone() for k, v in model.state_dict().items()}
    bad = dict(good)
    del bad["3.body.0.weight"]
    bad["9.weight"] = torch.zeros(3, 4)  # wrong shape: expected (2, 4)
    bad["10.weight"] = torch.zeros(1)
    before = model.state_dict()["0.weight"].clone()
    bad["0.weight"] = torch.ones_like(before)

    with pytest.raises(SpecError) as info:
        load_weights(model, bad)
    message = str(info.value)
    assert "missing: 3.body.0.weight" in message
    assert "unexpected: 10.weight" in message
    assert "9.weight (expected [2, 4], got [3, 4])" in message
    # Nothing was half-written.
    torch.testing.assert_close(model.state_dict()["0.weight"], before)


def test_load_weights_rejects_nan_and_loads_buffers() -> None:
    model = build_model(IMAGE_NET)
    tensors = {k: v.clone() for k, v in model.state_dict().items()}
    tensors["1.running_var"] = torch.full((4,), 4.0)
    load_weights(model, tensors)
    torch.testing.assert_close(model.state_dict()["1.running_var"], torch.full((4,), 4.0))

    tensors["9.weight"] = torch.full_like(tensors["9.weight"], float("nan"))
    with pytest.raises(SpecError, match="NaN or inf: 9.weight"):
        load_weights(model, tensors)


def test_num_batches_tracked_is_optional_and_safetensors_round_trip() -> None:
    model = build_model(IMAGE_NET)
    tensors = {k: v for k, v in model.state_dict().items() if "num_batches" not in k}
    blob = save(tensors)

    restored = build_model(IMAGE_NET)
    load_weights(restored, load(blob))
    x = torch.randn(2, 3, 8, 8)
    torch.testing.assert_close(restored(x), model(x))


def test_input_shape_and_output_dim_inferred_for_mlps() -> None:
    arch = {"layers": [{"type": "linear", "in_features": 7, "out_features": 5},
                       {"type": "selu"},
                       {"type": "linear", "in_features": 5, "out_features": 3}]}
    assert input_shape(arch) == (7,)
    assert output_dim(arch) == 3
    conv = {"layers": IMAGE_NET["layers"]}
    assert input_shape(conv) is None
    assert output_dim(conv) == 2


# ---- Problem: built from a spec, scope, data validation --------------------------------

MLP = {"layers": [{"type": "linear", "in_features": 4, "out_features": 5}, {"type": "tanh"},
                  {"type": "linear", "in_features": 5, "out_features": 3}]}


def _data(n: int = 12) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return torch.randn(n, 4, generator=gen), torch.arange(n) % 3


def test_problem_from_spec_and_flat_parameters() -> None:
    from engine.problem import Problem

    weights = {k: v.double() for k, v in build_model(MLP).state_dict().items()}
    X, y = _data()
    problem = Problem.from_spec(MLP, load(save(weights)), "categorical", None, X, y,
                                scope=["2.weight", "2.bias"], device="cpu")
    assert problem.dtype == torch.float64 and problem.d == 18 and problem.n == 12
    torch.testing.assert_close(problem.theta(), torch.cat([weights["2.weight"].ravel(),
                                                           weights["2.bias"]]))
    V = torch.randn(18, 4, dtype=torch.float64)
    torch.testing.assert_close(problem.flatten(problem.unflatten(V), batched=True), V)

    new = problem.theta() + 1.0
    state = problem.state_dict(new)
    torch.testing.assert_close(state["2.bias"], weights["2.bias"] + 1.0)
    torch.testing.assert_close(state["0.weight"], weights["0.weight"])  # frozen part
    problem.set_theta(new)
    torch.testing.assert_close(problem.model.state_dict()["2.bias"], weights["2.bias"] + 1.0)
    assert problem.clone(torch.float32).theta().dtype == torch.float32


@pytest.mark.parametrize(("change", "fragment"), [
    ({"scope": ["2.weight", "5.bias"]}, "scope names unknown parameters: 5.bias"),
    ({"scope": []}, "at least one parameter"),
    ({"y": torch.arange(11) % 3}, "X has 12 rows but y has 11"),
    ({"y": torch.arange(12)}, "labels must be integers 0..2"),
    ({"X": torch.randn(12, 5)}, "do not fit the model"),
    ({"X": torch.full((12, 4), float("nan"))}, "X contains NaN or inf"),
    ({"family": "bernoulli"}, "bernoulli needs a model with 1 output"),
    ({"batch_size": 0}, "batch_size must be a positive int"),
])
def test_problem_rejects_bad_inputs(change: dict, fragment: str) -> None:
    from engine.problem import Problem
    from engine.regularizers import make_regularizer

    X, y = _data()
    kwargs = {"model": build_model(MLP), "family": "categorical",
              "regularizer": make_regularizer("l2", 0.1, exclude=["0.bias"]), "X": X, "y": y,
              "device": "cpu", **change}
    with pytest.raises(SpecError) as info:
        Problem(**kwargs)
    assert fragment in str(info.value)


def test_problem_with_embedding_input() -> None:
    from engine.operators import fisher_operator, hessian_operator
    from engine.problem import Problem

    arch = {"layers": [{"type": "embedding", "num_embeddings": 6, "embedding_dim": 3},
                       {"type": "flatten"},
                       {"type": "linear", "in_features": 6, "out_features": 1}]}
    X = torch.randint(0, 6, (20, 2), generator=torch.Generator().manual_seed(0))
    problem = Problem(build_model(arch, dtype=torch.float64), "poisson", None, X,
                      torch.arange(20) % 4, device="cpu")
    assert problem.X.dtype == torch.long and problem.d == 18 + 7
    v = torch.randn(problem.d, dtype=torch.float64)
    # The model is linear in the head but not in (embedding, head) jointly: F ≠ H, both work.
    assert torch.isfinite(fisher_operator(problem).matvec(v)).all()
    assert torch.isfinite(hessian_operator(problem).matvec(v)).all()
