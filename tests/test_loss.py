"""Tests for isnet_fast.loss.heatmap_loss (ISNet's LRPLossCEValleysGWRP)."""

import importlib.util
import os
import sys
from pathlib import Path

import pytest
import torch

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


def rel_err(ours, ref):
    """max|ours - ref| / max|ref|."""
    return ((ours.double() - ref.double()).abs().max() / ref.double().abs().max()).item()


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
    folder = os.environ.get("ISNET_REFERENCE")
    if not folder or not (Path(folder) / "ISNetFunctions.py").is_file():
        pytest.skip("set ISNET_REFERENCE to a folder with the original ISNetFunctions.py (and globals.py)")
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
