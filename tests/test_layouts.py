"""On the CPU IsDenseFast runs the network channels_last, because oneDNN's convolutions (most
of the work) are fastest in that layout. These tests check that the torch ops keep relevance
tensors and their gradients channels-innermost (a stray NCHW tensor makes every later step a
slow strided copy) and that any layout gives the same numbers."""

import pytest
import torch

from helpers import rel_err
from isnet_fast import DenseNet, IsDenseFast
from isnet_fast.engine import torch_ops
from isnet_fast.engine.functions import overwritten_positions
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


# kernel, stride, padding, ceil_mode; on 11 x 9 inputs ceil_mode adds a last row or column of windows
UNPOOL_GEOMETRIES = [(3, 2, 1, False), (2, 2, 0, False), (3, 1, 1, False), (4, 2, 1, False), (5, 2, 2, False),
                     (5, 3, 2, False), (2, 1, 0, False), (7, 3, 3, False), (3, 2, 0, True), (2, 2, 0, True),
                     (4, 3, 1, True)]
UNPOOL_IDS = [f"k{k}s{s}p{p}" + ("-ceil" if ceil else "") for k, s, p, ceil in UNPOOL_GEOMETRIES]


def overwritten_by_raster_order(indices: torch.Tensor) -> torch.Tensor:
    """The slow way: walk the pooled positions in raster order, remembering each pixel's last chooser."""
    flat = indices.flatten(2)
    last_chooser = {}
    for b in range(flat.shape[0]):
        for ch in range(flat.shape[1]):
            for position, pixel in enumerate(flat[b, ch].tolist()):
                last_chooser[b, ch, pixel] = position
    overwritten = torch.zeros(flat.shape, dtype=torch.bool)
    for b in range(flat.shape[0]):
        for ch in range(flat.shape[1]):
            for position, pixel in enumerate(flat[b, ch].tolist()):
                overwritten[b, ch, position] = last_chooser[b, ch, pixel] != position
    return overwritten.view(indices.shape)


@pytest.mark.parametrize("data", ["ties", "constant", "random"])
@pytest.mark.parametrize("geometry", UNPOOL_GEOMETRIES, ids=UNPOOL_IDS)
def test_overwritten_positions_are_those_a_later_position_overwrites(geometry, data):
    g = torch.Generator().manual_seed(0)
    values = {"ties": torch.randint(0, 2, (B, CH, 11, 9), generator=g).double(),
              "constant": torch.zeros(B, CH, 11, 9, dtype=torch.float64),
              "random": torch.randn(B, CH, 11, 9, generator=g, dtype=torch.float64)}[data]
    kernel, stride, padding, ceil_mode = geometry
    _, indices = torch.nn.functional.max_pool2d(values, kernel, stride, padding, ceil_mode=ceil_mode,
                                                return_indices=True)
    expected = overwritten_by_raster_order(indices)
    if data == "ties" and stride < kernel:
        assert expected.any()  # overlapping windows and ties: some positions are overwritten
    assert torch.equal(overwritten_positions(indices, kernel, stride), expected)
    as_channels_last = indices.contiguous(memory_format=torch.channels_last)
    assert torch.equal(overwritten_positions(as_channels_last, kernel, stride), expected)


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("geometry", UNPOOL_GEOMETRIES, ids=UNPOOL_IDS)
def test_overwriting_unpool_is_torchs_max_unpool2d_and_its_gradient_a_gather(geometry, layout):
    """Forward: CPU ``F.max_unpool2d`` (the last pooled position in raster order wins a shared
    pixel) times the gate; backward: autograd of ``max_unpool2d``, a gather at every pooled
    position, overwritten or not."""
    g = torch.Generator().manual_seed(1)
    kernel, stride, padding, ceil_mode = geometry
    height, width = 11, 9
    values = torch.randint(0, 2, (B, CH, height, width), generator=g).double()
    _, indices = torch.nn.functional.max_pool2d(values, kernel, stride, padding, ceil_mode=ceil_mode,
                                                return_indices=True)
    ph, pw = indices.shape[-2:]
    act = torch.rand(B, CH, height, width, generator=g, dtype=torch.float64)
    z = torch.randn(B, CH, height, width, generator=g, dtype=torch.float64)
    rel = torch.randn(B, C, CH, ph, pw, generator=g, dtype=torch.float64)
    cotangent = torch.randn(B, C, CH, height, width, generator=g, dtype=torch.float64)
    gate = (act / torch_ops.stabilize(z, 0.01)).unsqueeze(1)

    expected_rel = rel.clone().requires_grad_()
    unpooled = torch.nn.functional.max_unpool2d(expected_rel.reshape(B * C, CH, ph, pw),
                                                indices.repeat_interleave(C, dim=0), kernel, stride, padding,
                                                output_size=(height, width))
    expected = unpooled.view(B, C, CH, height, width) * gate
    (expected_grad,) = torch.autograd.grad(expected, expected_rel, cotangent)

    layout_fn = to_channels_last if layout == "channels_last" else (lambda t: t)
    ours_rel = layout_fn(rel).requires_grad_()
    ours = torch_ops.max_unpool_gated(ours_rel, layout_fn(indices), layout_fn(act), layout_fn(z), 0.01, kernel,
                                      stride, padding, overwrite=True)
    (ours_grad,) = torch.autograd.grad(ours, ours_rel, cotangent)
    assert rel_err(ours, expected) <= 1e-15
    assert rel_err(ours_grad, expected_grad) <= 1e-15
    with torch.no_grad():  # the in-place path
        assert rel_err(torch_ops.max_unpool_gated(rel, indices, act, z, 0.01, kernel, stride, padding), expected) <= 1e-15
    if layout == "channels_last":
        assert channels_innermost(ours) and channels_innermost(ours_grad)


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
