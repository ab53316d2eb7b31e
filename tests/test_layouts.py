"""On the CPU IsDenseFast runs the network channels_last, because oneDNN's convolutions (most
of the work) are fastest in that layout. These tests check that the torch ops keep relevance
tensors and their gradients channels-innermost (a stray NCHW tensor makes every later step a
slow strided copy) and that any layout gives the same numbers."""

import pytest
import torch

from helpers import rel_err
from isnet_fast import DenseNet, IsDenseFast
from isnet_fast.engine import torch_ops
from isnet_fast.engine.functions import overwrite_winners
from isnet_fast.engine.densenet.relevance import split_channels
from isnet_fast.engine.rules import batch_statistics

B, C, CH, H, W = 2, 3, 5, 6, 7


def channels_innermost(t: torch.Tensor) -> bool:
    """Whether ``... x ch x H x W`` has its channels innermost (the channels_last layout)."""
    return t.stride(-3) == 1 and t.stride(-1) == t.shape[-3] and t.stride(-2) == t.shape[-3] * t.shape[-1]


def to_channels_last(t: torch.Tensor) -> torch.Tensor:
    return t.movedim(-3, -1).contiguous().movedim(-1, -3)


def run_op(name, layout_fn, H=H, W=W):
    """One torch op on float64 inputs in a layout: its output and the gradients of its inputs."""
    g = torch.Generator().manual_seed(0)
    rel_shape = (B, C, CH, H // 2, W // 2) if name in ("pool_spread", "max_unpool_gated") else (B, C, CH, H, W)
    rel = torch.randn(rel_shape, generator=g, dtype=torch.float64)
    act = torch.rand(B, CH, H, W, generator=g, dtype=torch.float64)
    pre = torch.randn(B, CH, H, W, generator=g, dtype=torch.float64)
    scale = torch.randn(CH, generator=g, dtype=torch.float64).requires_grad_()
    shift = torch.randn(CH, generator=g, dtype=torch.float64).requires_grad_()
    rel, act, pre = (layout_fn(t).requires_grad_() for t in (rel, act, pre))
    if name == "gated_product":
        out, inputs = torch_ops.gated_product(rel, act, pre, scale, shift, 0.01), (rel, act, pre, scale, shift)
    elif name == "gated_product-nofold":
        out, inputs = torch_ops.gated_product(rel, act, pre, None, None, 0.01), (rel, act, pre)
    elif name == "pool_spread":
        out, inputs = torch_ops.pool_spread(rel, act, pre, 0.01), (rel, act, pre)
    elif name == "max_unpool_gated":
        _, indices = torch.nn.functional.max_pool2d(torch.randn(B, CH, H, W, generator=g), 2, 2, return_indices=True)
        out = torch_ops.max_unpool_gated(rel, layout_fn(indices), act, pre, 0.01, 2, 2, 0)
        inputs = (rel, act, pre)
    else:  # input_rule: 6 back channels for 3 image channels, as the z^B rule makes
        back = layout_fn(torch.randn(B, C, 6, H, W, generator=g, dtype=torch.float64)).requires_grad_()
        image = layout_fn(torch.rand(B, 3, H, W, generator=g, dtype=torch.float64)).requires_grad_()
        out, inputs = torch_ops.input_rule(back, image, (1.0,)), (back, image)
    cotangent = layout_fn(torch.randn(out.shape, generator=g, dtype=torch.float64))
    grads = torch.autograd.grad(out, inputs, cotangent)
    return out, grads


OPS = ["gated_product", "gated_product-nofold", "pool_spread", "max_unpool_gated", "input_rule"]


@pytest.mark.parametrize("size", [(6, 7), (8, 6)], ids=["6x7", "8x6"])
@pytest.mark.parametrize("name", OPS)
def test_torch_ops_keep_channels_last_and_their_numbers(name, size):
    out, grads = run_op(name, to_channels_last, *size)
    ref_out, ref_grads = run_op(name, lambda t: t.contiguous(), *size)
    assert channels_innermost(out), out.stride()
    assert torch.equal(out, ref_out)
    for grad, ref in zip(grads, ref_grads):
        if grad.dim() >= 4:
            assert channels_innermost(grad), grad.stride()
        assert rel_err(grad, ref) <= 1e-14


def test_split_channels_keeps_channels_last_in_the_backward():
    g = torch.Generator().manual_seed(0)
    base = torch.randn(B, C, 9, H, W, generator=g, dtype=torch.float64)
    widths = [4, 3, 2]
    grads = []
    for layout_fn in (to_channels_last, lambda t: t.contiguous()):
        relevance = layout_fn(base).requires_grad_()
        pieces = split_channels(relevance, widths)
        assert [p.shape[2] for p in pieces] == widths
        assert all(torch.equal(p, q) for p, q in zip(pieces, torch.split(base, widths, dim=2)))
        weights = [torch.full_like(p, k + 1.0) for k, p in enumerate(pieces)]
        (grad,) = torch.autograd.grad(sum((p * w).sum() for p, w in zip(pieces, weights)), relevance)
        grads.append(grad)
    assert channels_innermost(grads[0])
    assert torch.equal(grads[0], grads[1])
    assert torch.equal(grads[0][:, :, 4:7], torch.full_like(grads[0][:, :, 4:7], 2.0))


def test_overwrite_winners_is_the_last_pooled_position_in_either_layout():
    g = torch.Generator().manual_seed(0)
    values = torch.randn(B, CH, 9, 9, generator=g)
    _, indices = torch.nn.functional.max_pool2d(values, 3, 2, 1, return_indices=True)  # overlapping windows
    winners = overwrite_winners(indices, (9, 9))
    flat = indices.flatten(2)
    expected = torch.full((B, CH, 81), -1, dtype=torch.long)
    for position in range(flat.shape[-1]):  # raster order: later positions overwrite
        expected.scatter_(2, flat[:, :, position:position + 1], position)
    assert torch.equal(winners, expected)
    assert torch.equal(overwrite_winners(indices.contiguous(memory_format=torch.channels_last), (9, 9)), expected)


@pytest.mark.parametrize("shape", [(2, 5, 6, 7), (3, 1, 1, 4)], ids=["2x5x6x7", "3x1x1x4"])
def test_batch_statistics_are_the_mean_and_unbiased_variance(shape):
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 3 + 10
    mean, var = batch_statistics(x.contiguous(memory_format=torch.channels_last))
    ref_var, ref_mean = torch.var_mean(x, dim=(0, 2, 3))
    assert rel_err(mean, ref_mean) <= 1e-14
    assert rel_err(var, ref_var) <= 1e-13


def test_cpu_model_runs_channels_last_and_returns_contiguous_heatmaps():
    torch.manual_seed(0)
    net = DenseNet(growth_rate=3, block_config=(2, 2), num_init_features=5, bn_size=1, num_classes=2).double()
    model = IsDenseFast(net, backend="torch").train()
    x = torch.rand(2, 3, 33, 30, dtype=torch.float64, requires_grad=True)
    y, R = model(x)
    R.square().sum().backward()
    assert R.is_contiguous() and y.is_contiguous()
    assert x.grad.shape == x.shape and x.grad.is_contiguous() and torch.isfinite(x.grad).all()
    assert net.features.conv0.weight.grad.is_contiguous()  # parameters keep their own layout


class LayoutWatcher:
    """torch ops that record the layout of every relevance tensor they are given."""

    def __init__(self):
        self.layouts = []

    def __getattr__(self, name):
        op = getattr(torch_ops, name)

        def watched(rel, *args, **kwargs):
            if rel.shape[2] > 1 and rel.stride(-1) != 0:  # skip the expanded classifier factor
                self.layouts.append((name, tuple(rel.shape), channels_innermost(rel)))
            return op(rel, *args, **kwargs)
        return watched


@pytest.mark.parametrize("batch, classes", [(1, 1), (2, 1), (1, 2), (2, 3)], ids=["b1-c1", "b2-c1", "b1-c2", "b2-c3"])
def test_relevance_stays_channels_last_for_any_batch_and_class_count(batch, classes):
    # Size-one batch or class dimensions once made torch read channels_last tensors as NCHW
    # (a merged size-one dimension gets a small stride), and the pass fell back to NCHW.
    from isnet_fast.engine.densenet.forward import run_forward
    from isnet_fast.engine.densenet.relevance import relevance
    from isnet_fast.engine.densenet.plan import build_plan
    torch.manual_seed(0)
    net = DenseNet(growth_rate=4, block_config=(2, 3), num_init_features=8, bn_size=2, num_classes=classes).train()
    plan = build_plan(net)
    watcher = LayoutWatcher()
    x = torch.rand(batch, 3, 40, 40).contiguous(memory_format=torch.channels_last)
    heatmaps = relevance(plan, run_forward(plan, x), 0.01, True, watcher)
    assert heatmaps.shape == (batch, classes, 3, 40, 40)
    assert len(watcher.layouts) > 10
    assert [entry for entry in watcher.layouts if not entry[2]] == []
