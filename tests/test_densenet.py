"""The ISNet DenseNet: layout, parameter counts and state-dict compatibility."""

import importlib.util
import re
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from helpers import original_reference_folder
from isnet_fast.models.densenet import (DenseNet, convert_torchvision_state_dict, densenet121, densenet161,
                                 densenet169, densenet201)

TINY = dict(growth_rate=4, block_config=(2, 2), num_init_features=8, bn_size=2)

# name: (constructor, torchvision's parameter count at 1000 classes,
#        channels out of each transition and into norm5)
ARCHS = {
    "densenet121": (densenet121, 7_978_856, (128, 256, 512, 1024)),
    "densenet161": (densenet161, 28_681_000, (192, 384, 1056, 2208)),
    "densenet169": (densenet169, 14_149_480, (128, 256, 640, 1664)),
    "densenet201": (densenet201, 20_013_928, (128, 256, 896, 1920)),
}


def _randomize(model: nn.Module, seed: int = 0) -> nn.Module:
    """Gives BatchNorm affine parameters and statistics, and the classifier, non-trivial values."""
    g = torch.Generator().manual_seed(seed)

    def rand(t, scale, shift=0.0):
        t.copy_(torch.randn(t.shape, generator=g, dtype=t.dtype) * scale + shift)

    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                rand(m.weight, 0.2, 1.0)
                rand(m.bias, 0.2)
                rand(m.running_mean, 0.2)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
            elif isinstance(m, nn.Linear):
                rand(m.weight, 0.1)
                rand(m.bias, 0.1)
    return model


def _tiny(seed: int = 0, num_classes: int = 5) -> DenseNet:
    torch.manual_seed(seed)
    return _randomize(DenseNet(**TINY, num_classes=num_classes), seed).eval()


def _to_old_style(state_dict):
    """torchvision's first checkpoints: ``denselayerL.norm.1.weight`` keys, no num_batches_tracked."""
    old = OrderedDict()
    for key, value in state_dict.items():
        if key.endswith("num_batches_tracked"):
            continue
        old[re.sub(r"(denselayer\d+\.(?:norm|conv))([12])\.", r"\1.\2.", key)] = value
    return old


@pytest.mark.parametrize("arch", list(ARCHS))
def test_parameter_count_matches_torchvision(arch):
    ctor, n_params, _ = ARCHS[arch]
    assert sum(p.numel() for p in ctor().parameters()) == n_params
    assert sum(p.numel() for p in ctor(dropout=0.3).parameters()) == n_params


@pytest.mark.parametrize("arch", list(ARCHS))
def test_channel_counts(arch):
    ctor, _, channels = ARCHS[arch]
    model = ctor(num_classes=7).eval()
    feats = model.features
    seen = {}
    hooks = [getattr(feats, name).register_forward_hook(lambda m, i, o, name=name: seen.__setitem__(name, o.shape))
             for name in ("transition1", "transition2", "transition3", "denseblock4", "AdaptPool")]
    with torch.no_grad():
        out = model(torch.randn(2, 3, 64, 64))
    for h in hooks:
        h.remove()
    assert tuple(seen[f"transition{t}"][1] for t in (1, 2, 3)) + (seen["denseblock4"][1],) == channels
    assert [seen[f"transition{t}"][2] for t in (1, 2, 3)] == [8, 4, 2]
    assert seen["AdaptPool"] == (2, channels[-1], 1, 1)
    assert feats.norm5.num_features == model.classifier.in_features == channels[-1]
    assert out.shape == (2, 7)


def test_module_names_match_original():
    keys = set(densenet121().state_dict())
    for key in ("features.conv0.weight", "features.norm0.running_mean",
                "features.denseblock1.denselayer1.norm1.weight", "features.denseblock1.denselayer6.conv2.weight",
                "features.denseblock4.denselayer16.norm2.num_batches_tracked",
                "features.transition1.conv.weight", "features.transition3.norm.bias",
                "features.norm5.running_var", "classifier.weight", "classifier.bias"):
        assert key in keys, key
    assert not any(".norm.1." in k or ".conv.2." in k for k in keys)
    names = list(dict(densenet121().features.named_children()))
    assert names[:5] == ["conv0", "norm0", "relu0", "pool0", "special"]
    assert names[-3:] == ["norm5", "fReLU", "AdaptPool"]
    assert list(dict(densenet121().features.transition2.named_children())) == ["norm", "relu", "conv", "relu2", "pool"]


def test_no_inplace_relu():
    model = _tiny()
    relus = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.ReLU)]
    # relu0, 2 per dense layer, 2 per transition, fReLU
    assert len(relus) == 1 + 2 * sum(TINY["block_config"]) + 2 * (len(TINY["block_config"]) - 1) + 1
    assert [n for n, m in relus if m.inplace] == []
    aliased = []
    hooks = [m.register_forward_hook(lambda m, i, o, n=n: aliased.append(n) if o.data_ptr() == i[0].data_ptr() else None)
             for n, m in relus]
    with torch.no_grad():
        model(torch.randn(2, 3, 32, 32))
    for h in hooks:
        h.remove()
    assert aliased == []


def test_pool0_returns_indices():
    model = _tiny()
    assert model.features.pool0.return_indices
    x = torch.randn(2, TINY["num_init_features"], 16, 16)
    values, indices = model.features.pool0(x)
    assert indices.dtype == torch.int64 and indices.shape == values.shape
    assert torch.equal(model.features.special((values, indices)), values)


def test_dropout_classifier():
    model = densenet121(num_classes=10, dropout=0.3)
    assert isinstance(model.classifier, nn.Sequential) and len(model.classifier) == 2
    assert isinstance(model.classifier[0], nn.Dropout) and model.classifier[0].p == 0.3
    assert isinstance(model.classifier[1], nn.Linear) and model.classifier[1].out_features == 10
    keys = set(model.state_dict())
    assert {"classifier.1.weight", "classifier.1.bias"} <= keys
    assert "classifier.weight" not in keys
    assert isinstance(densenet121().classifier, nn.Linear)


@pytest.mark.parametrize("style", ["ours", "old_norm.1_keys"])
def test_state_dict_round_trip_reproduces_outputs(style):
    src = _tiny(seed=1)
    sd = src.state_dict()
    if style != "ours":
        sd = _to_old_style(sd)
        assert "features.denseblock1.denselayer1.norm.1.weight" in sd
        assert "features.denseblock2.denselayer2.conv.2.weight" in sd
    dst = _tiny(seed=2)
    x = torch.randn(3, 3, 40, 36)
    with torch.no_grad():
        assert not torch.equal(dst(x), src(x))
        result = dst.load_state_dict(sd)
        assert not result.missing_keys and not result.unexpected_keys
        assert torch.equal(dst(x), src(x))


def test_plain_classifier_dict_loads_into_dropout_model_and_back():
    plain = _tiny(seed=3)
    torch.manual_seed(4)
    dropped = DenseNet(**TINY, num_classes=5)
    dropped.classifier = nn.Sequential(nn.Dropout(0.3), dropped.classifier)
    dropped.load_state_dict(plain.state_dict())
    dropped.eval()
    x = torch.randn(2, 3, 33, 31)
    with torch.no_grad():
        assert torch.equal(dropped(x), plain(x))
        assert torch.equal(dropped.classifier[1].weight, plain.classifier.weight)
        back = _tiny(seed=5)
        back.load_state_dict(dropped.state_dict())
        assert torch.equal(back(x), plain(x))


def test_convert_torchvision_state_dict():
    t = {k: torch.full((1,), float(i)) for i, k in enumerate([
        "features.conv0.weight",
        "features.denseblock1.denselayer1.norm.1.weight",
        "features.denseblock1.denselayer1.norm.1.running_var",
        "features.denseblock3.denselayer12.conv.2.weight",
        "features.denseblock1.denselayer2.norm2.bias",
        "features.transition1.norm.weight",
        "features.transition1.conv.weight",
        "classifier.weight",
        "classifier.bias",
    ])}
    expected = [
        "features.conv0.weight",
        "features.denseblock1.denselayer1.norm1.weight",
        "features.denseblock1.denselayer1.norm1.running_var",
        "features.denseblock3.denselayer12.conv2.weight",
        "features.denseblock1.denselayer2.norm2.bias",
        "features.transition1.norm.weight",
        "features.transition1.conv.weight",
    ]
    plain = convert_torchvision_state_dict(t)
    assert list(plain) == expected + ["classifier.weight", "classifier.bias"]
    assert all(a is b for a, b in zip(plain.values(), t.values()))
    dropped = convert_torchvision_state_dict(t, dropout_classifier=True)
    assert list(dropped) == expected + ["classifier.1.weight", "classifier.1.bias"]
    assert list(convert_torchvision_state_dict(dropped)) == list(plain)
    assert list(convert_torchvision_state_dict(dropped, dropout_classifier=True)) == list(dropped)
    assert "features.denseblock1.denselayer1.norm.1.weight" in t  # input untouched


@pytest.mark.parametrize("hw", [(45, 53), (32, 32), (17, 9), (8, 8)], ids=lambda hw: "%dx%d" % hw)
def test_awkward_input_sizes(hw):
    model = _tiny()
    x = torch.randn(2, 3, *hw)
    with torch.no_grad():
        out = model(x)
        assert out.shape == (2, 5)
        assert torch.isfinite(out).all()
        assert torch.allclose(model(x[:1]), out[:1], rtol=1e-5, atol=1e-6)


def test_torchvision_weights_give_same_logits():
    tvm = pytest.importorskip("torchvision.models")
    torch.manual_seed(0)
    tv = _randomize(tvm.densenet121(weights=None, num_classes=10)).double().eval()
    ours = densenet121(num_classes=10).double().eval()
    result = ours.load_state_dict(tv.state_dict())
    assert not result.missing_keys and not result.unexpected_keys
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    with torch.no_grad():
        # The ISNet layout adds a ReLU after each transition's conv, which torchvision lacks.
        assert not torch.allclose(ours(x), tv(x))
        for t in (1, 2, 3):
            trans = getattr(tv.features, "transition%d" % t)
            trans.pool = nn.Sequential(nn.ReLU(), trans.pool)
        torch.testing.assert_close(ours(x), tv(x))


def _reference_module():
    folder = original_reference_folder()
    if folder is None:
        pytest.skip("set ISNET_REFERENCE to a checkout of ISNet (or its backup/ folder, with LRPDenseNet.py)")
    spec = importlib.util.spec_from_file_location("isnet_reference_LRPDenseNet", Path(folder) / "LRPDenseNet.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("mode", ["eval", "train"])
@pytest.mark.parametrize("hw", [(45, 53), (64, 64)], ids=lambda hw: "%dx%d" % hw)
def test_matches_original_isnet_densenet(mode, hw):
    ref_mod = _reference_module()
    ours = _tiny(seed=7).double()
    ref = ref_mod.DenseNet(**TINY, num_classes=5).double()
    result = ref.load_state_dict(ours.state_dict())
    assert not result.missing_keys and not result.unexpected_keys
    ours.train(mode == "train")
    ref.train(mode == "train")
    x = torch.randn(3, 3, *hw, dtype=torch.float64)
    with torch.no_grad():
        assert torch.equal(ours(x), ref(x))
    for (name, a), b in zip(ours.state_dict().items(), ref.state_dict().values()):
        assert torch.equal(a, b), name
