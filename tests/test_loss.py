"""Tests for isnet_fast.loss.heatmap_loss (ISNet's LRPLossCEValleysGWRP)."""

import importlib.util
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from helpers import load_fixture, original_reference_folder, rel_err

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures"

try:
    from isnet_fast import heatmap_loss
    from isnet_fast import loss as loss_module
except ImportError:  # the rest of the package may not import yet: load the module file alone
    _spec = importlib.util.spec_from_file_location("_isnet_fast_loss", ROOT / "isnet_fast" / "loss.py")
    loss_module = importlib.util.module_from_spec(_spec)
    _spec.loader.exec_module(loss_module)
    heatmap_loss = loss_module.heatmap_loss

# The reference computes in float32 even for float64 input, so both the loss and
# its gradient can only agree to float32 accuracy: 1e-5 relative leaves room for
# summation-order differences over ~10^4 terms, and is far below any real bug.
RTOL = 1e-5


def loss_and_grad(fn, heatmap, mask, **kwargs):
    heatmap = heatmap.detach().clone().requires_grad_(True)
    loss = fn(heatmap, mask, **kwargs)
    loss.sum().backward()
    return loss.detach(), heatmap.grad


def random_inputs(batch=3, classes=4, channels=3, size=16, seed=0, scale=1.0, mask_channels=None):
    """Signed relevance and a rectangular binary foreground mask per image."""
    g = torch.Generator().manual_seed(seed)
    heatmap = scale * torch.randn(batch, classes, channels, size, size, generator=g)
    mask = torch.zeros(batch, mask_channels or channels, size, size)
    for i in range(batch):
        y0, x0 = torch.randint(0, size // 2, (2,), generator=g).tolist()
        y1, x1 = torch.randint(size // 2 + 1, size + 1, (2,), generator=g).tolist()
        mask[i, :, y0:y1, x0:x1] = 1
    return heatmap, mask


# --------------------------------------------------------------------- fixtures
@pytest.mark.parametrize("name", ["default", "small_scale", "tuned"])
def test_matches_fixture(name):
    fx = torch.load(FIXTURES / f"loss_{name}.pt", weights_only=True)
    loss, grad = loss_and_grad(heatmap_loss, fx["heatmap"], fx["mask"], multiMask=fx["multiMask"], **fx["kwargs"])
    assert loss.dtype == torch.float32  # float32 result even for float64 input, as the reference
    torch.testing.assert_close(loss, fx["loss"], rtol=RTOL, atol=0)
    assert rel_err(grad, fx["grad_heatmap"]) <= RTOL


# ------------------------------------------------------------------- behaviour
def test_gwrp_on_a_small_example():
    x = torch.tensor([[1.0, 3.0, 2.0]])
    expected = (3 + 2 * 0.5 + 1 * 0.25) / (1 + 0.5 + 0.25)
    torch.testing.assert_close(loss_module._gwrp(x, 0.5), torch.tensor([expected]))


@pytest.mark.parametrize("d", [0.5, 0.9, 0.99, 1.0], ids=lambda d: f"d={d}")
def test_gwrp_top_k_equals_full_sort(d):
    x = torch.rand(4, 64 * 64, dtype=torch.float32, generator=torch.Generator().manual_seed(1))
    w = torch.tensor([d**i for i in range(x.shape[-1])], dtype=torch.float32)
    full = (x.sort(-1, descending=True).values * w).sum(-1) / w.sum()
    torch.testing.assert_close(loss_module._gwrp(x, d), full, rtol=RTOL, atol=0)


def test_per_class_cut_tensor_equals_float_cut():
    # A per-class cut rescales the per-image loss by broadcasting (as the
    # reference), so it needs batch size == number of classes here.
    heatmap, mask = random_inputs(batch=4, classes=4)
    ref, ref_grad = loss_and_grad(heatmap_loss, heatmap, mask, cut=2.0, cut2=30.0)
    loss, grad = loss_and_grad(heatmap_loss, heatmap, mask, cut=torch.full((4,), 2.0), cut2=torch.full((4,), 30.0))
    torch.testing.assert_close(loss, ref, rtol=RTOL, atol=0)
    assert rel_err(grad, ref_grad) <= RTOL


def test_per_class_cut2_tensor_equals_float_cut2():
    heatmap, mask = random_inputs(batch=3, classes=4)
    ref = heatmap_loss(heatmap, mask, cut2=10.0, reduction="none")
    loss = heatmap_loss(heatmap, mask, cut2=torch.full((4,), 10.0), reduction="none")
    torch.testing.assert_close(loss, ref, rtol=RTOL, atol=0)


def test_multimask_with_repeated_mask_equals_shared_mask():
    heatmap, mask = random_inputs()
    per_class = mask.unsqueeze(1).repeat(1, heatmap.shape[1], 1, 1, 1)
    ref, ref_grad = loss_and_grad(heatmap_loss, heatmap, mask, reduction="none")
    loss, grad = loss_and_grad(heatmap_loss, heatmap, per_class, reduction="none", multiMask=True)
    torch.testing.assert_close(loss, ref, rtol=RTOL, atol=0)
    assert rel_err(grad, ref_grad) <= RTOL


def test_reductions_are_consistent():
    heatmap, mask = random_inputs()
    per_image = heatmap_loss(heatmap, mask, reduction="none")
    assert per_image.shape == (heatmap.shape[0],)
    torch.testing.assert_close(heatmap_loss(heatmap, mask, reduction="sum"), per_image.sum())
    torch.testing.assert_close(heatmap_loss(heatmap, mask, reduction="mean"), per_image.mean())
    torch.testing.assert_close(heatmap_loss(heatmap, mask), per_image.mean())


@pytest.mark.parametrize("kwargs", [{}, {"var": True}, {"normRoI": False}], ids=["normRoI", "var", "mean"])
def test_detach_norm_changes_gradient_not_value(kwargs):
    heatmap, mask = random_inputs(scale=0.01)
    loss, grad = loss_and_grad(heatmap_loss, heatmap, mask, **kwargs)
    loss_d, grad_d = loss_and_grad(heatmap_loss, heatmap, mask, detachNorm=True, **kwargs)
    torch.testing.assert_close(loss_d, loss, rtol=RTOL, atol=0)
    assert rel_err(grad_d, grad) > 1e-3


@pytest.mark.parametrize(
    "kwargs",
    [{"var": True}, {"normRoI": False}, {"norm": False}, {"alternativeCut": True}],
    ids=["var", "normRoI_off", "norm_off", "alternativeCut"],
)
def test_variants_are_finite(kwargs):
    heatmap, mask = random_inputs(scale=0.01)
    loss, grad = loss_and_grad(heatmap_loss, heatmap, mask, reduction="none", **kwargs)
    assert loss.shape == (heatmap.shape[0],)
    assert torch.isfinite(loss).all() and torch.isfinite(grad).all()


def test_half_and_double_inputs_give_float32():
    heatmap, mask = random_inputs()
    for dtype in (torch.float16, torch.bfloat16, torch.float64):
        loss = heatmap_loss(heatmap.to(dtype), mask.to(dtype))
        assert loss.dtype == torch.float32


def test_non_finite_input_gives_finite_loss_and_no_output(capsys):
    heatmap, mask = random_inputs()
    heatmap[0, 0, 0, 0, :3] = torch.tensor([float("nan"), float("inf"), float("-inf")])
    heatmap[1, 2, 1, 5, 5] = float("nan")
    loss, grad = loss_and_grad(heatmap_loss, heatmap, mask)
    out = capsys.readouterr()
    assert out.out == "" and out.err == ""
    assert torch.isfinite(loss) and torch.isfinite(grad).all()
    # No gradient flows into the replaced entries.
    assert grad[0, 0, 0, 0, :3].abs().sum() == 0 and grad[1, 2, 1, 5, 5] == 0


def test_never_prints(capsys):
    heatmap, mask = random_inputs()
    for kwargs in ({}, {"var": True}, {"norm": False}, {"alternativeCut": True}):
        heatmap_loss(heatmap, mask, **kwargs)
    out = capsys.readouterr()
    assert out.out == "" and out.err == ""


# ------------------------------------------- newer reference (code/ISNetFunctionsZe.py)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("name", ["fi_loss_hybrid", "fi_loss_roimean_hybrid"])
def test_matches_newer_fixture(name, dtype):
    fx = load_fixture(name)
    loss, grad = loss_and_grad(heatmap_loss, fx["heatmap"].to(dtype), fx["mask"].to(dtype), **fx["kwargs"])
    assert loss.dtype == torch.float32
    assert rel_err(loss, fx["loss"]) <= RTOL
    assert rel_err(grad, fx["grad_heatmap"]) <= RTOL


def constant_classes(totals, size=2):
    """1 x C x 1 x size x size heatmap whose class k sums to totals[k], and an all-foreground
    mask: the background term is exactly 0, so the loss is B times the foreground term."""
    per_pixel = torch.tensor(totals, dtype=torch.float64) / size**2
    heatmap = per_pixel.view(1, -1, 1, 1, 1).expand(1, len(totals), 1, size, size).clone()
    return heatmap, torch.ones(1, 1, size, size)


@pytest.mark.parametrize("option", ["L1", True], ids=["L1", "bool_True"])
def test_l1_foreground_by_hand(option):
    # cut=2, cut2=25, B=3; class 0 sums to 30 (above cut2), class 1 to 0.5 (below cut).
    heatmap, mask = constant_classes([30.0, 0.5])
    loss, grad = loss_and_grad(heatmap_loss, heatmap, mask, cut=2.0, cut2=25.0, alternativeForeground=option)
    lower = (0.5 - 2) ** 2 / 2**2  # divided by cut**2
    upper = abs(30 - 25)  # L1, not divided by cut
    torch.testing.assert_close(loss, torch.tensor(3 * (lower + upper) / 2), rtol=1e-6, atol=0)
    # d/dF: 3 * (1/2) * 1 above cut2, 3 * (1/2) * 2 * (F - cut) / cut**2 below cut.
    torch.testing.assert_close(grad[0, 0], torch.full((1, 2, 2), 1.5, dtype=torch.float64), rtol=1e-6, atol=0)
    torch.testing.assert_close(grad[0, 1], torch.full((1, 2, 2), -1.125, dtype=torch.float64), rtol=1e-6, atol=0)


@pytest.mark.parametrize("option", ["L2", False], ids=["L2", "bool_False"])
def test_l2_foreground_is_the_original(option):
    heatmap, mask = random_inputs(scale=0.05)
    ref, ref_grad = loss_and_grad(heatmap_loss, heatmap, mask, cut=2.0, cut2=8.0, reduction="none")
    loss, grad = loss_and_grad(heatmap_loss, heatmap, mask, cut=2.0, cut2=8.0, reduction="none",
                               alternativeForeground=option)
    assert torch.equal(loss, ref) and torch.equal(grad, ref_grad)
    by_hand, _ = loss_and_grad(heatmap_loss, *constant_classes([30.0, 0.5]), cut=2.0, cut2=25.0,
                               alternativeForeground=option)
    torch.testing.assert_close(by_hand, torch.tensor(3 * ((0.5 - 2) ** 2 / 4 + 5**2 / 4) / 2), rtol=1e-6, atol=0)


def test_hybrid_foreground_by_hand():
    # cut=2, cut2=10 (cut + cut2 = 12): class 0 below cut, class 1 between cut2 and
    # cut + cut2 (the L2 term), class 2 above cut + cut2 (|F - 12| + 1), B=3, 3 classes.
    heatmap, mask = constant_classes([0.5, 11.0, 30.0])
    loss, grad = loss_and_grad(heatmap_loss, heatmap, mask, cut=2.0, cut2=10.0, alternativeForeground="hybrid")
    expected = 3 * ((0.5 - 2) ** 2 / 4 + (11 - 10) ** 2 / 4 + (abs(30 - 12) + 1)) / 3
    torch.testing.assert_close(loss, torch.tensor(expected), rtol=1e-6, atol=0)
    for k, slope in enumerate([2 * (0.5 - 2) / 4, 2 * (11 - 10) / 4, 1.0]):
        torch.testing.assert_close(grad[0, k], torch.full((1, 2, 2), slope, dtype=torch.float64), rtol=1e-6, atol=0)


@pytest.mark.parametrize("total, expected", [(12.0, 1.0), (12.5, 1.5), (11.5, 0.5625)],
                         ids=["at_cut_plus_cut2", "above", "below"])
def test_hybrid_upper_term_is_continuous_at_cut_plus_cut2(total, expected):
    heatmap, mask = constant_classes([total])
    loss = heatmap_loss(heatmap, mask, cut=2.0, cut2=10.0, B=1, alternativeForeground="hybrid")
    torch.testing.assert_close(loss, torch.tensor(expected), rtol=1e-6, atol=0)


@pytest.mark.parametrize("option", ["L1", "hybrid"])
def test_per_class_cut_divides_each_class_by_its_own_cut(option):
    # The newer reference's per-class cut: no broadcasting against the batch (batch 3 != 4
    # classes), and the loss of all classes is the mean of each class's own loss (A=0).
    heatmap, mask = random_inputs(batch=3, classes=4, scale=0.05)
    cut, cut2 = torch.tensor([1.0, 5.0, 10.0, 30.0]), torch.tensor([5.0, 8.0, 15.0, 40.0])
    loss = heatmap_loss(heatmap, mask, cut=cut, cut2=cut2, A=0, reduction="none", alternativeForeground=option)
    each = [heatmap_loss(heatmap[:, k:k + 1], mask, cut=cut[k].item(), cut2=cut2[k].item(), A=0,
                         reduction="none", alternativeForeground=option) for k in range(4)]
    torch.testing.assert_close(loss, torch.stack(each).mean(0), rtol=RTOL, atol=0)


@pytest.mark.parametrize(
    "new, old",
    [
        ({"norm": "absRoIMean"}, {"norm": True}),
        ({"norm": "absRoIMean", "detachNorm": True}, {"norm": True, "detachNorm": True}),
        ({"norm": "absRoIMean", "alternativeForeground": "hybrid"}, {"norm": True, "alternativeForeground": "hybrid"}),
        ({"norm": "none"}, {"norm": False}),
        ({"norm": "none", "var": True}, {"norm": False, "var": True}),
    ],
    ids=["absRoIMean", "absRoIMean_detachNorm", "absRoIMean_hybrid", "none", "none_var"],
)
def test_string_norms_equal_bool_norms(new, old):
    heatmap, mask = random_inputs(scale=0.01)
    ref, ref_grad = loss_and_grad(heatmap_loss, heatmap, mask, reduction="none", **old)
    loss, grad = loss_and_grad(heatmap_loss, heatmap, mask, reduction="none", **new)
    assert torch.equal(loss, ref) and torch.equal(grad, ref_grad)


def _direct_roimean_background(heatmap, mask, d=0.9, E=1.0):
    """The background term of norm='RoIMean', written out: |h / signed RoI mean|, full-sort GWRP."""
    h = heatmap.float()
    m = mask.float().unsqueeze(1)
    normed = (h / ((h * m).sum((-3, -2, -1), keepdim=True) / m.sum((-3, -2, -1), keepdim=True))).abs()
    flat = (normed * (1 - m)).flatten(-2).sort(-1, descending=True).values
    w = torch.tensor([d**i for i in range(flat.shape[-1])], dtype=torch.float32)
    pooled = (flat * w).sum(-1) / w.sum()
    return -torch.log(1 - pooled / (pooled + E)).mean((-2, -1))


def test_roimean_normalises_the_signed_heatmap():
    heatmap, mask = random_inputs(scale=0.01)
    heatmap = heatmap + 0.004  # a signed heatmap whose signed RoI mean is far from its mean |h|
    loss, grad = loss_and_grad(heatmap_loss, heatmap, mask, norm="RoIMean", B=0, reduction="none")
    direct, direct_grad = loss_and_grad(_direct_roimean_background, heatmap, mask)
    torch.testing.assert_close(loss, direct, rtol=RTOL, atol=0)
    assert rel_err(grad, direct_grad) <= RTOL
    absolute = heatmap_loss(heatmap, mask, norm="absRoIMean", B=0, reduction="none")
    assert (loss - absolute).abs().min() > 0.1 * absolute.abs().max()
    # The foreground term does not depend on the normalisation.
    torch.testing.assert_close(heatmap_loss(heatmap, mask, norm="RoIMean", A=0),
                               heatmap_loss(heatmap, mask, norm="absRoIMean", A=0), rtol=0, atol=0)


def test_roimean_equals_absroimean_on_a_non_negative_heatmap():
    heatmap, mask = random_inputs(scale=0.01)
    heatmap = heatmap.abs()
    ref, ref_grad = loss_and_grad(heatmap_loss, heatmap, mask, norm="absRoIMean", reduction="none")
    loss, grad = loss_and_grad(heatmap_loss, heatmap, mask, norm="RoIMean", reduction="none")
    torch.testing.assert_close(loss, ref, rtol=RTOL, atol=0)
    assert rel_err(grad, ref_grad) <= RTOL


def test_roimean_replaces_non_finite_values_with_signed_constants():
    heatmap, mask = random_inputs(scale=0.01)
    finite = heatmap.clone()
    heatmap[0, 0, 0, 0, :2] = torch.tensor([float("inf"), float("-inf")])
    finite[0, 0, 0, 0, :2] = torch.tensor([heatmap[~heatmap.isinf()].max(), heatmap[~heatmap.isinf()].min()])
    loss, grad = loss_and_grad(heatmap_loss, heatmap, mask, norm="RoIMean", reduction="none")
    torch.testing.assert_close(loss, heatmap_loss(finite, mask, norm="RoIMean", reduction="none"), rtol=RTOL, atol=0)
    assert grad[0, 0, 0, 0, :2].abs().sum() == 0 and torch.isfinite(grad).all()


# ------------------------------------------------------------------ mask handling
def nearest_upsample(mask, factor=2):
    return mask.repeat_interleave(factor, -1).repeat_interleave(factor, -2)


@pytest.mark.parametrize(
    "multiMask, mask_channels, kwargs",
    [(False, None, {}), (False, 1, {}), (True, None, {}), (False, None, {"norm": "RoIMean", "alternativeForeground": "hybrid"})],
    ids=["shared_mask", "single_channel_mask", "multiMask", "roimean_hybrid"],
)
def test_half_size_mask_equals_nearest_upsampled_mask(multiMask, mask_channels, kwargs):
    heatmap, _ = random_inputs(size=16, scale=0.01)
    g = torch.Generator().manual_seed(3)
    b, c, ch = heatmap.shape[:3]
    shape = (b, c, mask_channels or ch, 8, 8) if multiMask else (b, mask_channels or ch, 8, 8)
    small = (torch.rand(shape, generator=g) > 0.5).float()
    ref, ref_grad = loss_and_grad(heatmap_loss, heatmap, nearest_upsample(small), multiMask=multiMask,
                                  reduction="none", **kwargs)
    loss, grad = loss_and_grad(heatmap_loss, heatmap, small, multiMask=multiMask, reduction="none", **kwargs)
    torch.testing.assert_close(loss, ref, rtol=RTOL, atol=0)
    assert rel_err(grad, ref_grad) <= RTOL


@pytest.mark.parametrize("mask_size, scale", [(32, 1), (24, 1), (37, 255)], ids=["32_to_16", "24_to_16", "37_to_16_0_255"])
def test_resized_mask_is_binarised(mask_size, scale):
    # Any foreground pixel in a pooling cell makes the cell foreground (also for a 0/255
    # mask: resized masks are binarised, not checked).
    heatmap, _ = random_inputs(size=16, scale=0.01)
    g = torch.Generator().manual_seed(4)
    big = scale * (torch.rand(heatmap.shape[0], 3, mask_size, mask_size, generator=g) > 0.97).float()
    expected_mask = (F.adaptive_max_pool2d(big, (16, 16)) > 0).float()
    assert 0 < expected_mask.mean() < 1
    ref = heatmap_loss(heatmap, expected_mask, reduction="none")
    loss = heatmap_loss(heatmap, big, reduction="none")
    torch.testing.assert_close(loss, ref, rtol=RTOL, atol=0)
    # A pooled average would be a different mask: check the loss sees the difference.
    soft_like = (F.adaptive_avg_pool2d(big, (16, 16)) > 0.5 * scale).float()
    assert not torch.equal(soft_like, expected_mask)
    assert not torch.allclose(heatmap_loss(heatmap, soft_like, reduction="none"), ref)


@pytest.mark.parametrize(
    "values, found",
    [((0.0, 255.0), "255"), ((0.0, 0.5, 1.0), "0.5"), ((0.0, float("nan")), "nan")],
    ids=["0_255", "soft", "nan"],
)
def test_non_binary_mask_raises(values, found):
    heatmap, mask = random_inputs()
    choice = torch.randint(0, len(values), mask.shape, generator=torch.Generator().manual_seed(5))
    bad = torch.tensor(values)[choice]
    with pytest.raises(ValueError, match=r"mask must hold only 0 .*and 1") as info:
        heatmap_loss(heatmap, bad)
    message = str(info.value)
    assert found in message and "255" in message and len(message.splitlines()) <= 2


def test_bool_mask_equals_float_mask():
    heatmap, mask = random_inputs()
    ref, ref_grad = loss_and_grad(heatmap_loss, heatmap, mask, reduction="none")
    loss, grad = loss_and_grad(heatmap_loss, heatmap, mask.bool(), reduction="none")
    assert torch.equal(loss, ref) and torch.equal(grad, ref_grad)
    small = mask[..., ::2, ::2].bool()  # and resized
    torch.testing.assert_close(heatmap_loss(heatmap, small), heatmap_loss(heatmap, nearest_upsample(small).float()),
                               rtol=RTOL, atol=0)


def test_numpy_mask_raises_type_error():
    heatmap, mask = random_inputs()
    with pytest.raises(TypeError, match=r"mask must be a torch tensor, got numpy\.ndarray.*torch\.from_numpy"):
        heatmap_loss(heatmap, mask.numpy())


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"norm": "roimean"}, r"norm must be a bool or one of 'absRoIMean', 'RoIMean', 'none'; got 'roimean'"),
        ({"norm": "RoIMean", "var": True}, r"var and normRoI only choose the normalisation for norm=True"),
        ({"norm": "absRoIMean", "normRoI": False}, r"var and normRoI only choose"),
        ({"alternativeForeground": "L3"}, r"alternativeForeground must be 'L2', 'L1' or 'hybrid' .*got 'L3'"),
        ({"alternativeForeground": None}, r"alternativeForeground must be .*got None"),
    ],
    ids=["norm_unknown", "roimean_with_var", "absroimean_normroi_off", "foreground_unknown", "foreground_none"],
)
def test_bad_option_strings_raise(kwargs, match):
    heatmap, mask = random_inputs()
    with pytest.raises(ValueError, match=match):
        heatmap_loss(heatmap, mask, **kwargs)


def test_new_options_never_print(capsys):
    heatmap, mask = random_inputs()
    for kwargs in ({"norm": "RoIMean"}, {"alternativeForeground": "hybrid"}, {"alternativeForeground": "L1"}):
        heatmap_loss(heatmap, mask[..., ::2, ::2], **kwargs)
    out = capsys.readouterr()
    assert out.out == "" and out.err == ""


# ---------------------------------------------------------------------- errors
H5, M4 = random_inputs(batch=2, classes=3, channels=3, size=8)


@pytest.mark.parametrize(
    "heatmap, mask, kwargs, match",
    [
        (H5[0], M4, {}, r"heatmap must be 5-D .* got shape \(3, 3, 8, 8\)"),
        (H5, M4[:, :2], {}, r"mask must have shape \(2, 3, 8, 8\).* got \(2, 2, 8, 8\)"),
        (H5, M4[0], {}, r"mask must have shape \(2, 3, 8, 8\).* got \(3, 8, 8\)"),
        (H5, M4, {"multiMask": True}, r"mask must have shape \(2, 3, 3, 8, 8\).*multiMask=True"),
        (H5, M4, {"reduction": "avg"}, r"reduction must be 'none', 'mean' or 'sum'; got 'avg'"),
        (H5, M4, {"alternativeCut": True, "cut": torch.ones(3)}, r"alternativeCut=True needs a float cut"),
        (H5, M4, {"cut": torch.ones(5)}, r"cut must be a float or a 1-D tensor .*\(length 3\); got .* shape \(5,\)"),
        (H5, M4, {"cut2": torch.ones(3, 3)}, r"cut2 must be a float or a 1-D tensor"),
        (H5, M4, {"cut": torch.ones(3)}, r"per-class cut of length 3 .*\(batch size 2\)"),
    ],
    ids=[
        "heatmap_4d",
        "mask_channels",
        "mask_3d",
        "multimask_4d",
        "bad_reduction",
        "alternativeCut_tensor_cut",
        "cut_wrong_length",
        "cut2_2d",
        "cut_not_broadcastable",
    ],
)
def test_errors(heatmap, mask, kwargs, match, capsys):
    with pytest.raises(ValueError, match=match):
        heatmap_loss(heatmap, mask, **kwargs)
    assert capsys.readouterr().out == ""


# ------------------------------------------------------ original implementation
def _load_reference():
    folder = original_reference_folder()
    if folder is None:
        pytest.skip("set ISNET_REFERENCE to a checkout of ISNet (or its backup/ folder, with ISNetFunctions.py)")
    folder = str(folder)
    sys.path.insert(0, folder)  # ISNetFunctions imports its sibling `globals`
    try:
        spec = importlib.util.spec_from_file_location("_isnet_reference", Path(folder) / "ISNetFunctions.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(folder)
    return module.LRPLossCEValleysGWRP


def _nan_inf(heatmap, mask):
    heatmap[0, 0, 0, 0, :3] = torch.tensor([float("nan"), float("inf"), float("-inf")])
    return heatmap, mask


def _empty_mask(heatmap, mask):
    mask[1] = 0
    return heatmap, mask


def _per_class_mask(heatmap, mask):
    return heatmap, (torch.rand(heatmap.shape) > 0.5).float()


REFERENCE_CASES = {
    "default": ({}, {}),
    "reduction_none": ({}, {"reduction": "none"}),
    "reduction_sum": ({}, {"reduction": "sum"}),
    "tuned": ({}, {"E": 10, "d": 0.996, "cut": 2, "cut2": 20, "A": 1, "B": 2}),
    "small_scale": ({"scale": 1e-4}, {}),
    "large_image_d0.5": ({"size": 64}, {"d": 0.5}),
    "large_image_d0.9": ({"size": 64, "scale": 0.01}, {}),
    "var": ({"scale": 0.01}, {"var": True}),
    "normRoI_off": ({"scale": 0.01}, {"normRoI": False}),
    "norm_off": ({"scale": 1e-4}, {"norm": False, "reduction": "none"}),
    "detachNorm": ({"scale": 0.01}, {"detachNorm": True}),
    "alternativeCut": ({"scale": 0.001}, {"alternativeCut": True, "cut": 5.0, "reduction": "none"}),
    "per_class_cuts_batch_eq_classes": (
        {"batch": 4, "scale": 0.001},
        {"cut": torch.tensor([1.0, 2.0, 3.0, 4.0]), "cut2": torch.tensor([5.0, 10.0, 20.0, 40.0]), "reduction": "none"},
    ),
    "per_class_cut2": ({"scale": 0.01}, {"cut2": torch.tensor([5.0, 10.0, 20.0, 40.0]), "reduction": "none"}),
    "single_class": ({"classes": 1}, {"reduction": "none"}),
    "single_channel_mask": ({"mask_channels": 1}, {"reduction": "none"}),
    "multiMask": ({}, {"multiMask": True, "_make": _per_class_mask}),
    "empty_mask": ({}, {"reduction": "none", "_make": _empty_mask}),
    "nan_inf": ({}, {"reduction": "none", "_make": _nan_inf}),
}


@pytest.mark.parametrize("case", list(REFERENCE_CASES))
def test_matches_original(case):
    reference = _load_reference()
    input_kwargs, kwargs = REFERENCE_CASES[case]
    kwargs = dict(kwargs)
    make = kwargs.pop("_make", None)
    torch.manual_seed(0)
    heatmap, mask = random_inputs(**input_kwargs)
    if make:
        heatmap, mask = make(heatmap, mask)
    ref, ref_grad = loss_and_grad(reference, heatmap.double(), mask.double(), **kwargs)
    loss, grad = loss_and_grad(heatmap_loss, heatmap.double(), mask.double(), **kwargs)
    assert loss.shape == ref.shape and loss.dtype == ref.dtype
    torch.testing.assert_close(loss, ref, rtol=RTOL, atol=0)
    assert rel_err(grad, ref_grad) <= RTOL
