"""The residual sum's kernels (``kernels/residual_split.py``, through ``isnet_fast.engine.triton_ops``)
against the torch ops, and the ResNet pass on the Triton backend running them.

Accuracy as in ``tests/test_kernels.py`` (whose helpers these tests use): float64 within 1e-12 of
a float64 torch reference, float32 within twice the torch float32 path's error; outputs
allocated NaN-filled, so an element a kernel fails to write shows. NCHW and channels_last
storage (channels innermost), one map and three, odd planes and channel counts. What the
kernels compile to on a GPU is ``tests/test_compile.py``'s (the table records a ResNet pass).
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")

from helpers import rel_err  # noqa: E402
from isnet_fast import IsResNetFast, ResNet  # noqa: E402
from isnet_fast.engine import torch_ops, triton_ops
from isnet_fast.engine.resnet.relevance import _op  # noqa: E402
from test_kernels import (DEVICE, DTYPES, E, FLOAT64_TOL, Spec, channels_last, check_against_torch,  # noqa: E402
                          evaluate_triton, expected_strides, generator, nan_filled_allocations, nonzero_pre, randn,
                          with_zeros)

LAYOUTS = ["nchw", "channels_last"]


@dataclass(frozen=True)
class ResidualCase:
    batch: int = 2
    maps: int = 3
    channels: int = 3
    height: int = 7
    width: int = 7
    layout: str = "nchw"  # or "channels_last": every tensor (and the cotangent) stored channels innermost
    zeros: bool = False  # exact zeros (and a -0) in total and pre: stab(0) = +e

    @property
    def id(self) -> str:
        return (f"b{self.batch}-m{self.maps}-ch{self.channels}-{self.height}x{self.width}-{self.layout}"
                f"{'-zeros' if self.zeros else ''}")


def _base(g, case, *lead):
    """Random storage for a ``*lead x ch x H x W`` tensor in the case's layout, and its view."""
    shape = (*lead, case.channels, case.height, case.width)
    if case.layout == "channels_last":
        return randn(g, *lead, case.height, case.width, case.channels), channels_last
    return randn(g, *shape), None


def _tensors(case, names, g):
    bases, views = {}, {}
    for name, lead in names:
        bases[name], view = _base(g, case, *lead)
        if view is not None:
            views[name] = view
    return bases, views


def split_spec(case: ResidualCase, seed=0) -> Spec:
    g = generator(seed)
    b, m = case.batch, case.maps
    bases, views = _tensors(case, [("rel", (b, m)), ("out", (b,)), ("total", (b,)), ("part", (b,)), ("pre", (b,))], g)
    if case.zeros:
        bases["total"], bases["pre"] = with_zeros(bases["total"]), with_zeros(bases["pre"])
    bases["scale"] = 0.5 + torch.rand(case.channels, generator=g, dtype=torch.float64)
    bases["shift"] = randn(g, case.channels, scale=0.3)
    if case.zeros:
        bases["shift"][0] = 0.0  # z = pre * scale + 0 = 0 where pre is
        bases["scale"][1 % case.channels] = 0.0

    def call(ops, t, e):
        return ops.residual_split_gated(t["rel"], t["out"], t["total"], t["part"], t["pre"], t["scale"], t["shift"], e)
    return Spec(bases, call, ["rel", "out", "total", "part", "pre", "scale", "shift"], views,
                "channels_last" if case.layout == "channels_last" else "contiguous")


def add_spec(case: ResidualCase, seed=0) -> Spec:
    g = generator(seed)
    b, m = case.batch, case.maps
    bases, views = _tensors(case, [("back", (b, m)), ("rel", (b, m)), ("out", (b,)), ("total", (b,))], g)
    if case.zeros:
        bases["total"] = with_zeros(bases["total"])

    def call(ops, t, e):
        return ops.residual_shortcut_add(t["back"], t["rel"], t["out"], t["total"], e)
    return Spec(bases, call, ["back", "rel", "out", "total"], views,
                "channels_last" if case.layout == "channels_last" else "contiguous")


SPECS = {"split": split_spec, "add": add_spec}
CASES = [ResidualCase(maps=maps, channels=channels, height=height, width=width, layout=layout)
         for layout in LAYOUTS for maps in (1, 3) for channels, height, width in ((3, 7, 7), (37, 5, 9))]
CASES += [ResidualCase(batch=1, maps=2, channels=5, height=6, width=5, layout=layout, zeros=True) for layout in LAYOUTS]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
@pytest.mark.parametrize("op", list(SPECS))
def test_matches_torch_forward_and_every_gradient(op, case, dtype):
    ours, _ = check_against_torch(SPECS[op](case), dtype)
    # the output and the activations' gradients in the activations' layout (the folds' are 1-D)
    for key, value in ours.items():
        if value.dim() >= 4:
            assert value.stride() == expected_strides(value.shape, case.layout == "channels_last"), key


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("op", list(SPECS))
def test_bitwise_deterministic(op, layout, dtype):
    spec = SPECS[op](ResidualCase(batch=2, maps=3, channels=37, height=5, width=9, layout=layout))
    bases = spec.rounded(dtype)
    first = evaluate_triton(spec, bases, dtype, E[dtype])
    second = evaluate_triton(spec, bases, dtype, E[dtype])
    assert set(first) == set(second) and len(first) == len(spec.diff) + 1
    for key in first:
        assert torch.equal(first[key], second[key]), key


def test_float64_epsilon_is_not_rounded_to_float32():
    check_against_torch(split_spec(ResidualCase(channels=5, height=5, width=9)), torch.float64, e=0.01)


# ---------------------------------------------------------------------------------------------
# gradcheck (float64, tiny inputs; denominators away from zero, where stab jumps)
# ---------------------------------------------------------------------------------------------

def _leaves(*tensors):
    return [t.to(DEVICE).requires_grad_() for t in tensors]


def _view(layout):
    return channels_last if layout == "channels_last" else (lambda t: t)


def _stored(g, layout, *shape, make=randn):
    """A ``... x ch x H x W`` tensor's storage (``... x H x W x ch`` for channels_last)."""
    return make(g, *shape[:-3], shape[-2], shape[-1], shape[-3]) if layout == "channels_last" else make(g, *shape)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_gradcheck_residual_split_gated(layout):
    g = generator(21)
    view = _view(layout)
    rel = _stored(g, layout, 1, 2, 3, 2, 3)
    out, part = _stored(g, layout, 1, 3, 2, 3), _stored(g, layout, 1, 3, 2, 3)
    total, pre = _stored(g, layout, 1, 3, 2, 3, make=nonzero_pre), _stored(g, layout, 1, 3, 2, 3, make=nonzero_pre)
    scale, shift = 0.5 + torch.rand(3, generator=g, dtype=torch.float64), randn(g, 3, scale=0.05)

    def fn(r, o, t, p, q, s, h):
        return triton_ops.residual_split_gated(view(r), view(o), view(t), view(p), view(q), s, h, 0.1)
    assert torch.autograd.gradcheck(fn, _leaves(rel, out, total, part, pre, scale, shift), eps=1e-6, atol=1e-8,
                                    rtol=1e-6)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_gradcheck_residual_shortcut_add(layout):
    g = generator(22)
    view = _view(layout)
    back, rel = _stored(g, layout, 1, 2, 3, 3, 2), _stored(g, layout, 1, 2, 3, 3, 2)
    out, total = _stored(g, layout, 1, 3, 3, 2), _stored(g, layout, 1, 3, 3, 2, make=nonzero_pre)

    def fn(bk, r, o, t):
        return triton_ops.residual_shortcut_add(view(bk), view(r), view(o), view(t), 0.1)
    assert torch.autograd.gradcheck(fn, _leaves(back, rel, out, total), eps=1e-6, atol=1e-8, rtol=1e-6)


# ---------------------------------------------------------------------------------------------
# The no-grad shortcuts: out = relu(total), part = the eval-mode BatchNorm of pre
# ---------------------------------------------------------------------------------------------

def block_tensors(layout, dtype, seed=23, batch=2, maps=3, channels=37, height=5, width=9):
    """What the ResNet pass hands the ops: pre (a conv's output), part = its eval-mode BatchNorm,
    total = part + a shortcut, out = relu(total), the BatchNorm's fold; zeros in total."""
    g = generator(seed)
    shape = (batch, channels, height, width)
    pre = _stored(g, layout, *shape)
    weight, bias = 0.5 + torch.rand(channels, generator=g, dtype=torch.float64), randn(g, channels, scale=0.3)
    mean, var = randn(g, channels, scale=0.2), 0.5 + torch.rand(channels, generator=g, dtype=torch.float64)
    view = _view(layout)
    pre, weight, bias, mean, var = (t.to(DEVICE, dtype) for t in (pre, weight, bias, mean, var))
    pre = view(pre)
    part = F.batch_norm(pre, mean, var, weight, bias, training=False, eps=1e-5)
    total = part + view(_stored(g, layout, *shape).to(DEVICE, dtype))
    total = total.clone().copy_(with_zeros(total.contiguous()))  # clone keeps the layout
    std = torch.sqrt(var + 1e-5)
    scale, shift = weight / std, weight * (-mean / std) + bias  # relevance.batchnorm_fold's
    rel = view(_stored(g, layout, batch, maps, *shape[1:]).to(DEVICE, dtype))
    back = view(_stored(g, layout, batch, maps, *shape[1:]).to(DEVICE, dtype))
    return dict(rel=rel, back=back, out=torch.relu(total), total=total, part=part, pre=pre, scale=scale, shift=shift)


def _split(ops, t, total=None, pre=None, shift=None, **hints):
    return ops.residual_split_gated(t["rel"], t["out"], t["total"] if total is None else total, t["part"],
                                    t["pre"] if pre is None else pre, t["scale"],
                                    t["shift"] if shift is None else shift, E[t["rel"].dtype], **hints)


def _add(ops, t, total=None, **hints):
    return ops.residual_shortcut_add(t["back"], t["rel"], t["out"], t["total"] if total is None else total,
                                     E[t["rel"].dtype], **hints)


def _full_formula(call, t):
    """The op with autograd recording: the formula as written, whatever the hints say."""
    leaves = {k: v.detach().requires_grad_() for k, v in t.items()}
    with torch.enable_grad():
        result = call(torch_ops, leaves)
    assert result.requires_grad
    return result.detach()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_torch_out_is_relu_gives_the_full_formulas_numbers(layout, dtype):
    """Bitwise: out + e is total + e wherever out > 0, and the same operations run in order."""
    t = block_tensors(layout, dtype)
    with torch.no_grad():
        for call in (_split, _add):
            expected = _full_formula(call, t)
            assert torch.equal(call(torch_ops, t), expected)
            assert torch.equal(call(torch_ops, t, out_is_relu=True), expected)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_triton_hints_read_neither_total_nor_pre_and_match_the_full_formula(layout, dtype):
    """With the hints the kernels never read total (NaN here), pre or shift (NaN): the numbers are
    the full formula's, to rounding (part is pre * scale + shift only up to rounding)."""
    t = block_tensors(layout, dtype)
    nan = torch.full_like(t["total"], float("nan"))
    tolerance = FLOAT64_TOL if dtype == torch.float64 else 1e-5
    expected_split, expected_add = _full_formula(_split, t), _full_formula(_add, t)
    with torch.no_grad(), nan_filled_allocations():
        relu_only = _split(triton_ops, t, total=nan, out_is_relu=True)
        both = _split(triton_ops, t, total=nan, pre=nan, shift=torch.full_like(t["shift"], float("nan")),
                      out_is_relu=True, part_is_fold=True)
        added = _add(triton_ops, t, total=nan, out_is_relu=True)
    assert rel_err(relu_only, expected_split) <= tolerance
    assert rel_err(both, expected_split) <= tolerance
    assert rel_err(added, expected_add) <= tolerance
    for result in (relu_only, both, added):
        assert result.stride() == expected_strides(result.shape, layout == "channels_last")


@pytest.mark.parametrize("dtype", DTYPES)
def test_torch_part_is_fold_differs_from_the_full_formula_by_rounding_only(dtype):
    t = block_tensors("channels_last", dtype)
    expected = _full_formula(_split, t)
    with torch.no_grad():
        hinted = _split(torch_ops, t, out_is_relu=True, part_is_fold=True)
    assert rel_err(hinted, expected) <= (FLOAT64_TOL if dtype == torch.float64 else 1e-5)


@pytest.mark.parametrize("ops", [torch_ops, triton_ops], ids=["torch", "triton"])
def test_hints_are_ignored_under_autograd(ops):
    """With autograd the full formula runs: total and pre get their gradients."""
    t = block_tensors("nchw", torch.float64, batch=1, maps=2, channels=3, height=3, width=4)
    leaves = {k: v.detach().requires_grad_() for k, v in t.items()}
    split = _split(ops, leaves, out_is_relu=True, part_is_fold=True)
    grad_total, grad_pre = torch.autograd.grad(split.sum(), [leaves["total"], leaves["pre"]])
    assert grad_total.abs().max() > 0 and grad_pre.abs().max() > 0
    (grad_total,) = torch.autograd.grad(_add(ops, leaves, out_is_relu=True).sum(), [leaves["total"]])
    assert grad_total.abs().max() > 0


def test_registered_ops_refuse_hints_under_autograd():
    t = block_tensors("nchw", torch.float32, batch=1, maps=1, channels=2, height=3, width=3)
    rel = t["rel"].requires_grad_()
    with pytest.raises(RuntimeError, match="has no gradient"):
        triton_ops._residual_split_gated(rel, t["out"], t["total"], t["part"], t["pre"], t["scale"], t["shift"],
                                         0.01, False, True)
    with pytest.raises(RuntimeError, match="has no gradient"):
        triton_ops._residual_shortcut_add(t["back"], rel, t["out"], t["total"], 0.01, True)


def test_mismatched_shapes_are_refused_naming_the_tensor():
    t = block_tensors("nchw", torch.float32, batch=1, maps=1, channels=2, height=3, width=3)
    with torch.no_grad():
        with pytest.raises(ValueError, match="part must be B x CH x H x W"):
            triton_ops.residual_split_gated(t["rel"], t["out"], t["total"], t["part"][..., :2], t["pre"], t["scale"],
                                            t["shift"], 0.01)
        with pytest.raises(ValueError, match="scale must be the BatchNorm fold's 2 per-channel values"):
            triton_ops.residual_split_gated(t["rel"], t["out"], t["total"], t["part"], t["pre"], t["scale"][:1],
                                            t["shift"], 0.01)
        with pytest.raises(ValueError, match="back must have rel's shape"):
            triton_ops.residual_shortcut_add(t["back"][:, :, :1], t["rel"], t["out"], t["total"], 0.01)


# ---------------------------------------------------------------------------------------------
# torch.library.opcheck of the four ops (see tests/test_triton_library_ops.py)
# ---------------------------------------------------------------------------------------------

OPCHECK_TESTS = ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")


def assert_opcheck_passes(op, args):
    results = torch.library.opcheck(op, args, raise_exception=False)
    failed = {name: repr(result) for name, result in results.items() if result != "SUCCESS"}
    assert set(results) == set(OPCHECK_TESTS) and not failed, failed


def _opcheck_inputs(layout, dtype, grad):
    t = block_tensors(layout, dtype, seed=24, batch=2, maps=2, channels=3, height=5, width=3)
    return {k: v.detach().requires_grad_(grad) for k, v in t.items()}


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_opcheck_residual_split_gated(dtype, layout):
    t = _opcheck_inputs(layout, dtype, grad=True)
    assert_opcheck_passes(triton_ops._residual_split_gated, (t["rel"], t["out"], t["total"], t["part"], t["pre"],
                                                             t["scale"], t["shift"], 0.01))


@pytest.mark.parametrize("layout", LAYOUTS)
def test_opcheck_residual_split_gated_hints_and_backward(layout):
    t = _opcheck_inputs(layout, torch.float32, grad=False)
    fold = (t["scale"], t["shift"])
    assert_opcheck_passes(triton_ops._residual_split_gated, (t["rel"], t["out"], t["total"], t["part"], t["pre"],
                                                             *fold, 0.01, True, True))
    assert_opcheck_passes(triton_ops._residual_split_gated_backward,
                          (t["back"], t["rel"], t["out"], t["total"], t["part"], t["pre"], *fold, 0.01))


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_opcheck_residual_shortcut_add(dtype, layout):
    t = _opcheck_inputs(layout, dtype, grad=True)
    assert_opcheck_passes(triton_ops._residual_shortcut_add, (t["back"], t["rel"], t["out"], t["total"], 0.01))


@pytest.mark.parametrize("layout", LAYOUTS)
def test_opcheck_residual_shortcut_add_hint_and_backward(layout):
    t = _opcheck_inputs(layout, torch.float32, grad=False)
    assert_opcheck_passes(triton_ops._residual_shortcut_add, (t["back"], t["rel"], t["out"], t["total"], 0.01, True))
    assert_opcheck_passes(triton_ops._residual_shortcut_add_backward, (t["back"], t["rel"], t["out"], t["total"], 0.01))


# ---------------------------------------------------------------------------------------------
# The ResNet pass on the Triton backend runs these kernels
# ---------------------------------------------------------------------------------------------

def test_the_pass_finds_the_triton_ops():
    for name in ("residual_split_gated", "residual_shortcut_add"):
        assert _op(triton_ops, name) is getattr(triton_ops, name)


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_resnet_triton_backend_launches_the_residual_kernels_and_matches_torch(mode, monkeypatch):
    """A basic-block ResNet with an identity shortcut (layer1) and a downsample (layer2), at an
    odd size: the triton backend's maps and gradients are the torch backend's, and each block's
    residual steps went through triton_ops (with the hints only without autograd)."""
    torch.manual_seed(0)
    net = ResNet("basic", (1, 1), num_classes=3, stem_width=4, widths=(4, 6)).double()
    with torch.no_grad():
        for module in net.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.3, 0.3)
                module.running_mean.uniform_(-0.2, 0.2)
                module.running_var.uniform_(0.5, 1.5)
    x = torch.rand(2, 3, 13, 11, dtype=torch.float64)
    calls = []

    def spy(name):
        real = getattr(triton_ops, name)

        def wrapper(*args, **kwargs):
            calls.append((name, kwargs))
            return real(*args, **kwargs)
        return wrapper

    def run(backend, grad):
        model = IsResNetFast(net, backend=backend).train(mode == "train")
        inputs = x.clone().requires_grad_(grad)
        net.zero_grad(set_to_none=True)
        state = {k: v.clone() for k, v in net.state_dict().items()}
        if not grad:
            with torch.no_grad():
                _, heatmaps = model(inputs)
            net.load_state_dict(state)  # train mode moves the running statistics: run each pass from the same
            return heatmaps, None
        _, heatmaps = model(inputs)
        (heatmaps * torch.linspace(-1, 1, heatmaps.numel(), dtype=heatmaps.dtype).view_as(heatmaps)).sum().backward()
        net.load_state_dict(state)
        grads = [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in net.parameters()]
        return heatmaps.detach(), [inputs.grad] + grads

    for grad in (False, True):
        expected, expected_grads = run("torch", grad)
        calls.clear()
        with monkeypatch.context() as patch:
            for name in ("residual_split_gated", "residual_shortcut_add"):
                patch.setattr(triton_ops, name, spy(name))
            ours, grads = run("triton", grad)
        # layer2's block (downsample: two splits), then layer1's (identity: a split and the add)
        assert [name for name, _ in calls] == ["residual_split_gated", "residual_split_gated",
                                               "residual_split_gated", "residual_shortcut_add"]
        assert all(kwargs["out_is_relu"] for _, kwargs in calls)
        assert all(kwargs["part_is_fold"] == (mode == "eval") for name, kwargs in calls if "split" in name)
        assert rel_err(ours, expected) <= 1e-12
        if grad:
            assert len(grads) == len(expected_grads) > 1
            for theirs, mine in zip(expected_grads, grads):
                assert rel_err(mine, theirs) <= 1e-10
