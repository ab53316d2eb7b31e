"""IsDenseFast against the original's float64 outputs (tests/fixtures, see their README)."""

import pytest
import torch
import torch.nn as nn

from helpers import load_fixture, rel_err
from isnet_fast import DenseNet, IsDenseFast

MODEL_FIXTURES = ["tiny_eval_zb", "tiny_eval_eps", "tiny_train_dropout", "d121_topology_eval",
                  "single_class_64", "ten_classes"]

# Tolerances of the fixtures' README: float64 everywhere; float32 per quantity.
TOLERANCE = {
    torch.float64: dict(y=1e-6, R=1e-6, grad_x=1e-6, grad_param=1e-6, running=1e-6),
    torch.float32: dict(y=1e-4, R=1e-3, grad_x=5e-3, grad_param=1e-2, running=1e-4),
}


def build_from_fixture(data, dtype, backend="torch"):
    config = data["config"]
    net = DenseNet(growth_rate=config["growth_rate"], block_config=tuple(config["block_config"]),
                   num_init_features=config["num_init_features"], bn_size=config["bn_size"],
                   num_classes=config["num_classes"])
    if config.get("dropout_classifier"):
        net.classifier = nn.Sequential(nn.Dropout(p=0.0), net.classifier)
    net.load_state_dict(data["state_dict"])
    net = net.to(dtype)
    model = IsDenseFast(net, e=config["e"], heat=True, Zb=config["Zb"], backend=backend)
    model.train(config["mode"] == "train")
    return model


def run_fixture(name, dtype, backend="torch"):
    data = load_fixture(name)
    model = build_from_fixture(data, dtype, backend)
    x = data["x"].to(dtype).requires_grad_()
    y, R = model(x)
    ((R * data["G_R"].to(dtype)).sum() + (y * data["G_y"].to(dtype)).sum()).backward()
    return data, model, x, y, R


def assert_matches_fixture(data, model, x, y, R, dtype, tolerance=TOLERANCE):
    """y, R, the input's and every parameter's gradient and the running statistics against the
    fixture, within ``tolerance[dtype]`` (by default the original fixtures' tolerances). A
    parameter without a gradient counts as a zero gradient."""
    tol = tolerance[dtype]
    assert R.shape == data["R"].shape
    assert rel_err(y, data["y"]) <= tol["y"]
    assert rel_err(R, data["R"]) <= tol["R"]
    assert rel_err(x.grad, data["grad_x"]) <= tol["grad_x"]
    params = dict(model.DenseNet.named_parameters())
    assert set(params) == set(data["grad_params"])
    for param_name, param in params.items():
        grad = param.grad if param.grad is not None else torch.zeros_like(param)
        assert rel_err(grad, data["grad_params"][param_name]) <= tol["grad_param"], param_name
    state = model.DenseNet.state_dict()
    running = [key for key in data["state_dict_after"] if "running" in key]
    assert running
    for key in running:  # moved in train mode, unchanged in eval mode
        assert rel_err(state[key], data["state_dict_after"][key]) <= tol["running"], key


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("name", MODEL_FIXTURES)
def test_matches_reference(name, dtype):
    data, model, x, y, R = run_fixture(name, dtype)
    assert_matches_fixture(data, model, x, y, R, dtype)


@pytest.mark.parametrize("name", ["tiny_eval_zb", "tiny_train_dropout", "d121_topology_eval"])
def test_no_grad_heatmaps_match_reference(name):
    data = load_fixture(name)
    model = build_from_fixture(data, torch.float64)
    with torch.no_grad():
        y, R = model(data["x"])
    assert rel_err(y, data["y"]) <= 1e-6
    assert rel_err(R, data["R"]) <= 1e-6
