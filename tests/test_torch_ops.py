"""The torch ops' no-autograd shortcuts give the full formulas' numbers."""

import pytest
import torch

from helpers import rel_err
from isnet_fast.engine import functions, torch_ops


def relu_case(dtype, channels_last):
    torch.manual_seed(0)
    pre = torch.randn(2, 5, 7, 6, dtype=dtype)
    scale, shift = torch.randn(5, dtype=dtype), torch.randn(5, dtype=dtype)
    act = torch.relu(pre * scale.view(1, -1, 1, 1) + shift.view(1, -1, 1, 1))  # an eval BatchNorm, then ReLU
    rel = torch.randn(2, 3, 5, 7, 6, dtype=dtype)
    if channels_last:
        pre, act = (t.contiguous(memory_format=torch.channels_last) for t in (pre, act))
    return rel, act, pre, scale, shift


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels-last"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
def test_relu_shortcut_equals_the_full_gate(dtype, channels_last):
    rel, act, pre, scale, shift = relu_case(dtype, channels_last)
    with torch.no_grad():
        full = torch_ops.gated_product(rel, act, pre, scale, shift, 0.01)
        short = torch_ops.gated_product(rel, act, pre, scale, shift, 0.01, act_is_relu=True)
        accumulated = torch_ops.gated_accumulate_(torch.ones_like(rel), rel, act, pre, scale, shift, 0.01,
                                                  act_is_relu=True)
    tolerance = 1e-13 if dtype == torch.float64 else 1e-5
    assert rel_err(short, full) <= tolerance
    assert rel_err(accumulated, full + 1) <= tolerance


def test_relu_shortcut_of_the_pool_spread_is_exact():
    torch.manual_seed(0)
    pre = torch.randn(2, 4, 9, 8, dtype=torch.float64)
    act = torch.relu(pre)
    rel = torch.randn(2, 3, 4, 4, 4, dtype=torch.float64)
    with torch.no_grad():
        assert torch.equal(torch_ops.pool_spread(rel, act, pre, 0.01, act_is_relu=True),
                           torch_ops.pool_spread(rel, act, pre, 0.01))


def test_relu_shortcut_is_not_taken_under_autograd():
    # With autograd the full formula keeps the original's gradients: its fold's shift is detached,
    # the BatchNorm's bias is not, so a gate computed from the activation alone would differ.
    rel, act, pre, scale, shift = relu_case(torch.float64, False)
    pre.requires_grad_()
    full = torch_ops.gated_product(rel, act, pre, scale, shift, 0.01)
    hinted = torch_ops.gated_product(rel, act, pre, scale, shift, 0.01, act_is_relu=True)
    (grad_full,) = torch.autograd.grad(full.sum(), pre)
    (grad_hinted,) = torch.autograd.grad(hinted.sum(), pre)
    assert torch.equal(grad_full, grad_hinted) and grad_full.abs().max() > 0


def test_no_grad_gate_is_bitwise_the_autograd_gate():
    rel, act, pre, scale, shift = relu_case(torch.float32, True)
    pre = pre - 0.3  # some negative, some zero pre-activations
    pre[0, 0, 0, 0] = 0
    with torch.no_grad():
        fast = torch_ops.gated_product(rel, act, pre, scale, shift, 0.01)
    slow = torch_ops.gated_product(rel, act, pre.requires_grad_(), scale, shift, 0.01)
    assert torch.equal(fast, slow.detach())


def test_no_grad_forward_computes_relus_in_place_but_calls_hooked_ones():
    """Without autograd the forward applies a BatchNorm's ReLU in place on its output (one
    allocation fewer per layer); a ReLU module with a hook is still called, and the numbers are
    the same either way, and the same as under autograd."""
    from isnet_fast import DenseNet, IsDenseFast

    torch.manual_seed(0)
    net = DenseNet(growth_rate=4, block_config=(2, 2), num_init_features=8, bn_size=2, num_classes=3).double()
    model = IsDenseFast(net).eval()
    x = torch.rand(2, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        y, heatmaps = model(x)
    calls = []
    net.features.denseblock1.denselayer1.relu1.register_forward_hook(lambda *args: calls.append(1))
    with torch.no_grad():
        y_hooked, heatmaps_hooked = model(x)
    assert calls == [1]
    assert torch.equal(y, y_hooked) and torch.equal(heatmaps, heatmaps_hooked)
    y_grad, heatmaps_grad = model(x.clone().requires_grad_())
    assert rel_err(y_grad, y) <= 1e-14 and rel_err(heatmaps_grad, heatmaps) <= 1e-12


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("e", [1e-2, 1e-9, 0.3, 0.0], ids=lambda e: f"e={e}")
def test_stabilisers_add_e_times_the_sign_with_zero_counted_positive(dtype, e):
    tiny = torch.finfo(dtype).tiny  # the smallest normal number of the dtype, either sign
    z = torch.tensor([0.0, -0.0, tiny, -tiny, 2.5, -2.5, float("inf"), -float("inf")], dtype=torch.float64).to(dtype)
    sign = torch.tensor([1, 1, 1, -1, 1, -1, 1, -1], dtype=dtype)
    expected = sign * torch.tensor(e, dtype=dtype) + z  # e in the input's dtype, added last
    for stabiliser in (functions.stabilized, torch_ops.stabilize):
        got = stabiliser(z, e)
        assert got.dtype == dtype
        assert torch.equal(got, expected), stabiliser.__name__
    nan = torch.tensor([float("nan")], dtype=dtype)
    assert torch.isnan(functions.stabilized(nan, e)).all() and torch.isnan(torch_ops.stabilize(nan, e)).all()


def test_stabiliser_passes_the_gradient_straight_through_and_keeps_channels_last():
    z = torch.randn(2, 5, 3, 4, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
    z[0, 0] = 0.0
    z[1, 0] = -0.0
    z.requires_grad_()
    stabilised = functions.stabilized(z, 0.5)
    assert stabilised.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(stabilised[:, 0].detach(), torch.full_like(stabilised[:, 0], 0.5))
    stabilised.backward(torch.arange(z.numel(), dtype=z.dtype).view(z.shape))
    assert torch.equal(z.grad, torch.arange(z.numel(), dtype=z.dtype).view(z.shape))
