"""Bad input at the model level gets a short error that says what is wrong and how to fix it.

Every case here used to pass silently (wrong or NaN heatmaps) or fail with an unhelpful error
(AttributeError, ZeroDivisionError, torch's "expected scalar type ...").
"""

import math

import pytest
import torch
import torch.nn as nn

from isnet_fast import DenseNet, IsDenseFast
from isnet_fast.engine import UnsupportedModelError


def tiny_densenet():
    torch.manual_seed(0)
    return DenseNet(growth_rate=4, block_config=(2, 2, 2, 2), num_init_features=8, bn_size=2, num_classes=3)


@pytest.fixture
def model():
    return IsDenseFast(tiny_densenet()).eval()


def images(batch=2, size=32, dtype=torch.float32):
    torch.manual_seed(1)
    return torch.rand(batch, 3, size, size, dtype=dtype)


def assert_short(error: pytest.ExceptionInfo, *words: str) -> None:
    """The message names every word (case-insensitive) and is short: no dump."""
    message = str(error.value)
    for word in words:
        assert word.lower() in message.lower(), f"{word!r} not in {message!r}"
    assert len(message) < 300 and message.count("\n") <= 2, message


# ---- e, Zb, heat ----------------------------------------------------------------------------

BAD_SETTINGS = [
    ("e", 0, ValueError, ["e must", "0", "> 0"]),
    ("e", 0.0, ValueError, ["e must", "> 0"]),
    ("e", -1e-2, ValueError, ["e must", "-0.01", "> 0"]),
    ("e", math.nan, ValueError, ["e must", "nan", "finite"]),
    ("e", math.inf, ValueError, ["e must", "inf", "finite"]),
    ("e", "0.01", TypeError, ["e must", "'0.01'", "str"]),
    ("e", True, TypeError, ["e must", "True", "bool"]),
    ("e", None, TypeError, ["e must", "None"]),
    ("Zb", "no", TypeError, ["Zb", "'no'", "True or False"]),
    ("Zb", 1, TypeError, ["Zb", "1", "True or False"]),
    ("heat", "yes", TypeError, ["heat", "'yes'", "True or False"]),
    ("heat", None, TypeError, ["heat", "None", "True or False"]),
]
BAD_SETTING_IDS = [f"{name}={value!r}" for name, value, _, _ in BAD_SETTINGS]


@pytest.mark.parametrize("name, value, error, words", BAD_SETTINGS, ids=BAD_SETTING_IDS)
def test_bad_setting_is_refused_at_construction(name, value, error, words):
    with pytest.raises(error) as caught:
        IsDenseFast(tiny_densenet(), **{name: value})
    assert_short(caught, *words)


@pytest.mark.parametrize("name, value, error, words", BAD_SETTINGS, ids=BAD_SETTING_IDS)
def test_bad_setting_is_refused_on_the_instance_and_keeps_the_old_value(model, name, value, error, words):
    old = getattr(model, name)
    with pytest.raises(error) as caught:
        setattr(model, name, value)
    assert_short(caught, *words)
    assert getattr(model, name) == old


def test_e_zero_says_why():
    with pytest.raises(ValueError, match="divides by zero"):
        IsDenseFast(tiny_densenet(), e=0)


@pytest.mark.parametrize("settings", [dict(e=1e-9), dict(e=1), dict(e=1.0), dict(Zb=False), dict(heat=False),
                                      dict(e=1e-9, Zb=False)],
                         ids=["e=1e-9", "e=1-int", "e=1.0", "Zb=False", "heat=False", "e=1e-9,Zb=False"])
def test_valid_edge_settings_work(settings):
    model = IsDenseFast(tiny_densenet(), **settings).eval()
    with torch.no_grad():
        out = model(images())
    if settings.get("heat", True):
        y, R = out
        assert R.shape == (2, 3, 3, 32, 32) and torch.isfinite(R).all()
    else:
        y = out
    assert torch.isfinite(y).all()
    for name, value in settings.items():
        assert getattr(model, name) == value


def test_valid_changes_on_the_instance_are_kept(model):
    model.e, model.Zb, model.heat = 1e-9, False, False
    assert (model.e, model.Zb, model.heat) == (1e-9, False, False)
    assert isinstance(model.e, float)


# ---- module types the relevance pass's rules assume ------------------------------------------

def _replace(net: nn.Module, dotted: str, module: nn.Module) -> None:
    parent_name, _, name = dotted.rpartition(".")
    setattr(net.get_submodule(parent_name), name, module)


WRONG_MODULES = [
    ("features.fReLU", nn.LeakyReLU(), "nn.ReLU"),
    ("features.denseblock1.denselayer1.relu1", nn.Identity(), "nn.ReLU"),
    ("features.relu0", nn.ELU(), "nn.ReLU"),
    ("features.denseblock2.denselayer2.relu2", nn.GELU(), "nn.ReLU"),
    ("features.transition1.relu", nn.Identity(), "nn.ReLU"),
    ("features.transition3.relu2", nn.Sigmoid(), "nn.ReLU"),
    ("features.norm0", nn.GroupNorm(2, 8), "nn.BatchNorm2d"),
    ("features.denseblock1.denselayer2.norm1", nn.GroupNorm(1, 12), "nn.BatchNorm2d"),
    ("features.denseblock3.denselayer1.norm2", nn.InstanceNorm2d(8), "nn.BatchNorm2d"),
    ("features.transition2.norm", nn.Identity(), "nn.BatchNorm2d"),
    ("features.norm5", nn.LayerNorm(12), "nn.BatchNorm2d"),
    ("features.conv0", nn.Identity(), "nn.Conv2d"),
    ("features.denseblock1.denselayer1.conv1", nn.Identity(), "nn.Conv2d"),
    ("features.denseblock4.denselayer2.conv2", nn.Identity(), "nn.Conv2d"),
    ("features.transition1.conv", nn.Identity(), "nn.Conv2d"),
    ("features.pool0", nn.AvgPool2d(3, 2, 1), "nn.MaxPool2d"),
    ("features.transition1.pool", nn.MaxPool2d(2), "nn.AvgPool2d"),
]


@pytest.mark.parametrize("where, module, needed", WRONG_MODULES,
                         ids=[f"{where.replace('features.', '')}={type(module).__name__}"
                              for where, module, _ in WRONG_MODULES])
def test_wrong_module_type_is_named(where, module, needed):
    net = tiny_densenet()
    _replace(net, where, module)
    with pytest.raises(UnsupportedModelError) as caught:
        IsDenseFast(net)
    assert_short(caught, f"'{where}'", type(module).__name__, needed)
    assert str(caught.value).count("\n") == 0


def test_wrong_module_swapped_in_after_construction_is_caught_at_forward(model):
    model.DenseNet.features.fReLU = nn.LeakyReLU()
    with pytest.raises(UnsupportedModelError, match="features.fReLU"):
        model(images())


@pytest.mark.parametrize("conv", [
    nn.Conv2d(8, 4, 3, padding=1, padding_mode="reflect", bias=False),
    nn.Conv2d(8, 4, 3, padding="same", bias=False),
], ids=["padding_mode=reflect", "padding=same"])
def test_non_zero_or_string_padding_is_refused(conv):
    net = tiny_densenet()
    net.features.denseblock1.denselayer1.conv2 = conv
    with pytest.raises(UnsupportedModelError) as caught:
        IsDenseFast(net)
    assert_short(caught, "'features.denseblock1.denselayer1.conv2'", "padding")


@pytest.mark.parametrize("pool, words", [
    (nn.MaxPool2d(3, 2, 1, dilation=2), "dilation 1"),
    (nn.MaxPool2d((3, 2), 2, 1), "square kernel_size"),
    (nn.MaxPool2d(3, (2, 1), 1), "square stride"),
], ids=["dilated", "oblong-window", "oblong-stride"])
def test_a_stem_pool_the_un_pooling_cannot_read_is_refused(pool, words):
    net = tiny_densenet()
    net.features.pool0 = pool
    with pytest.raises(UnsupportedModelError) as caught:
        IsDenseFast(net)
    assert_short(caught, "'features.pool0'", words)


@pytest.mark.parametrize("thing", [DenseNet, tiny_densenet, "densenet121"], ids=["class", "function", "string"])
def test_something_that_is_not_a_module_is_refused(thing):
    with pytest.raises(TypeError) as caught:
        IsDenseFast(thing)
    assert_short(caught, "DenseNet module")


# ---- input images ----------------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf], ids=["nan", "inf", "-inf"])
def test_non_finite_image_is_named(model, mode, bad):
    model.train(mode == "train")
    x = images(batch=4)
    x[1, 0, 5, 5] = bad
    x[3, 2, 0, 0] = math.nan
    before = model.DenseNet.features.norm0.running_mean.clone()
    with pytest.raises(ValueError) as caught:
        model(x)
    assert_short(caught, "image 1", "NaN or Inf", "2 of 4", "check_finite=False")
    # refused before the forward pass: the running statistics are not poisoned
    assert torch.equal(model.DenseNet.features.norm0.running_mean, before)


def test_non_finite_image_is_refused_with_heat_off_too(model):
    model.heat = False
    x = images()
    x[0, 1, 2, 3] = math.nan
    with pytest.raises(ValueError, match="image 0"):
        model(x)


def test_check_finite_false_lets_a_nan_image_through():
    model = IsDenseFast(tiny_densenet(), check_finite=False).eval()
    x = images(batch=2)
    x[1, 0, 5, 5] = math.nan
    with torch.no_grad():
        y, R = model(x)
    assert torch.isfinite(y[0]).all() and torch.isfinite(R[0]).all()  # eval mode: the clean image is unharmed
    assert not torch.isfinite(y[1]).all()


def test_check_finite_can_be_switched_on_the_instance(model):
    x = images()
    x[0, 0, 0, 0] = math.inf
    model.check_finite = False
    with torch.no_grad():
        model(x)
    model.check_finite = True
    with pytest.raises(ValueError, match="image 0"):
        model(x)
    with pytest.raises(TypeError, match="check_finite must be True or False"):
        model.check_finite = "no"
    assert model.check_finite is True


def test_empty_batch_is_refused(model):
    with pytest.raises(ValueError) as caught:
        model(torch.rand(0, 3, 32, 32))
    assert_short(caught, "empty", "B must be at least 1")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16], ids=["float64", "half", "bf16"])
def test_input_dtype_differing_from_the_model_is_explained(model, dtype):
    with pytest.raises(TypeError) as caught:
        model(images(dtype=dtype))
    assert_short(caught, str(dtype), "torch.float32", "x.to(", "model.to(")


def test_float64_model_takes_float64_images():
    model = IsDenseFast(tiny_densenet().double()).eval()
    with torch.no_grad():
        y, R = model(images(dtype=torch.float64))
    assert y.dtype == R.dtype == torch.float64


def test_autocast_keeps_working_with_float32_images(model):
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        y, R = model(images())
    assert torch.isfinite(y.float()).all() and torch.isfinite(R.float()).all()


def test_images_on_another_device_are_explained(model):
    with pytest.raises(ValueError) as caught:
        model(torch.empty(1, 3, 32, 32, device="meta"))
    assert_short(caught, "meta", "cpu", "x.to(")
