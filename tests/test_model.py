"""IsDenseFast's interface: drop-in arguments, checkpoints, and errors that say what to fix."""

import copy
import importlib
import sys

import pytest
import torch
import torch.nn as nn

from helpers import load_fixture, original_reference_folder, rel_err
from isnet_fast import DenseNet, IsDenseFast
from isnet_fast.engine import UnsupportedModelError


def tiny_densenet(**overrides):
    kwargs = dict(growth_rate=4, block_config=(2, 2, 2, 2), num_init_features=8, bn_size=2, num_classes=3)
    kwargs.update(overrides)
    torch.manual_seed(0)
    return DenseNet(**kwargs)


@pytest.fixture
def model():
    return IsDenseFast(tiny_densenet()).eval()


def test_returns_logits_and_one_heatmap_per_class(model):
    y, R = model(torch.rand(2, 3, 32, 32))
    assert y.shape == (2, 3)
    assert R.shape == (2, 3, 3, 32, 32)


def test_heat_false_returns_only_logits_and_can_be_switched(model):
    x = torch.rand(1, 3, 32, 32)
    model.heat = False
    y = model(x)
    assert isinstance(y, torch.Tensor) and y.shape == (1, 3)
    model.heat = True
    y2, _ = model(x)
    assert torch.allclose(y, y2)


def test_changing_e_on_the_instance_changes_the_heatmaps(model):
    x = torch.rand(1, 3, 32, 32)
    with torch.no_grad():
        _, small = model(x)
        model.e = 1.0
        _, large = model(x)
    assert not torch.allclose(small, large)


def test_no_forward_hooks_and_no_cudnn_determinism_needed(model):
    old = torch.backends.cudnn.deterministic
    torch.backends.cudnn.deterministic = False
    try:
        model(torch.rand(1, 3, 32, 32))
    finally:
        torch.backends.cudnn.deterministic = old
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def test_classifier_swapped_for_dropout_after_construction():
    net = tiny_densenet()
    model = IsDenseFast(net)
    net.classifier = nn.Sequential(nn.Dropout(0.5), net.classifier)
    model.eval()
    y, R = model(torch.rand(1, 3, 32, 32))
    assert R.shape == (1, 3, 3, 32, 32) and torch.isfinite(R).all()


def test_train_mode_moves_running_statistics_like_the_plain_forward():
    net = tiny_densenet()
    plain = tiny_densenet()
    plain.load_state_dict(net.state_dict())
    x = torch.rand(3, 3, 32, 32)
    IsDenseFast(net).train()(x)
    # On the CPU IsDenseFast runs the network channels_last (oneDNN's fast layout); the plain
    # forward on the same layout must give bit-identical statistics, any layout the same numbers.
    plain_nchw = copy.deepcopy(plain)
    plain.train()(x.contiguous(memory_format=torch.channels_last))
    plain_nchw.train()(x)
    for (key, ours), theirs, nchw in zip(net.state_dict().items(), plain.state_dict().values(),
                                         plain_nchw.state_dict().values()):
        assert torch.equal(ours, theirs), key
        torch.testing.assert_close(ours, nchw, rtol=1e-5, atol=1e-6, msg=key)


# ---- checkpoints -----------------------------------------------------------------------------

def _original_style_state_dict(net):
    """What the original IsDense saves: DenseNet.* plus LRPBlock.* aliases of the same weights."""
    state = {f"DenseNet.{k}": v for k, v in net.state_dict().items()}
    state["LRPBlock.LRPFinalLayers.Dense.layer.weight"] = net.classifier.weight.detach()
    state["LRPBlock.LRPInitialLayers.conv.layer.weight"] = net.features.conv0.weight.detach()
    return state


@pytest.mark.parametrize("prefix", ["", "model."], ids=["isdense", "lightning"])
def test_loads_original_checkpoints(prefix, tmp_path):
    source = tiny_densenet()
    for p in source.parameters():
        p.data.normal_()
    state = {prefix + k: v for k, v in _original_style_state_dict(source).items()}
    target = IsDenseFast(tiny_densenet())
    target.load_state_dict(state)
    assert torch.equal(target.DenseNet.classifier.weight, source.classifier.weight)

    path = tmp_path / "isnet.ckpt"
    torch.save({"state_dict": state, "epoch": 3}, path)
    loaded = IsDenseFast.from_checkpoint(path, tiny_densenet(), e=0.1)
    assert loaded.e == 0.1
    assert torch.equal(loaded.DenseNet.features.conv0.weight, source.features.conv0.weight)


def test_from_checkpoint_rejects_a_file_without_a_state_dict(tmp_path):
    path = tmp_path / "bad.pt"
    torch.save([1, 2, 3], path)
    with pytest.raises(ValueError, match="no state dict"):
        IsDenseFast.from_checkpoint(path, tiny_densenet())


def test_mismatched_checkpoint_raises(tmp_path):
    state = _original_style_state_dict(tiny_densenet(num_classes=5))
    with pytest.raises(RuntimeError, match="size mismatch"):
        IsDenseFast(tiny_densenet()).load_state_dict(state)


# ---- bad input -------------------------------------------------------------------------------

@pytest.mark.parametrize("x, error, match", [
    (torch.rand(3, 32, 32), ValueError, "4-D"),
    (torch.rand(1, 1, 32, 32), ValueError, "3 input channels"),
    (torch.randint(0, 255, (1, 3, 32, 32)), TypeError, "floating-point"),
    (torch.rand(1, 3, 28, 40), ValueError, "at least 29"),
], ids=["not-4d", "wrong-channels", "integer-dtype", "too-small"])
def test_bad_input_is_explained(model, x, error, match):
    with pytest.raises(error, match=match):
        model(x)


def test_smallest_size_works(model):
    _, R = model(torch.rand(1, 3, 29, 29))
    assert torch.isfinite(R).all()


def test_missing_module_is_named():
    net = tiny_densenet()
    del net.features.norm5
    with pytest.raises(UnsupportedModelError, match="features.norm5"):
        IsDenseFast(net)


def test_in_place_relu_is_rejected():
    net = tiny_densenet()
    net.features.denseblock1.denselayer1.relu1.inplace = True
    with pytest.raises(UnsupportedModelError, match="denselayer1.relu1.*inplace=False"):
        IsDenseFast(net)


def test_unknown_backend_is_rejected():
    with pytest.raises(ValueError, match="backend"):
        IsDenseFast(tiny_densenet(), backend="cuda")


# ---- the original's own DenseNet class -------------------------------------------------------

@pytest.mark.skipif(original_reference_folder() is None,
                    reason="set ISNET_REFERENCE to a checkout of ISNet (or its backup/ folder) to run")
def test_accepts_the_original_densenet_class():
    sys.path.insert(0, str(original_reference_folder()))
    try:
        original = importlib.import_module("LRPDenseNet")
    finally:
        sys.path.pop(0)
    data = load_fixture("tiny_eval_zb")
    config = data["config"]
    net = original.DenseNet(growth_rate=config["growth_rate"], block_config=tuple(config["block_config"]),
                            num_init_features=config["num_init_features"], bn_size=config["bn_size"],
                            num_classes=config["num_classes"]).double()
    net.load_state_dict(data["state_dict"])
    with torch.no_grad():
        y, R = IsDenseFast(net, e=config["e"], Zb=config["Zb"]).eval()(data["x"])
    assert rel_err(R, data["R"]) <= 1e-6
