"""The torch ops' autograd Functions (``isnet_fast.engine.functions``) against their formulas.

Under autograd the CPU backend runs the epsilon step, the residual split and the identity
shortcut's add as Functions with hand-written backward passes (fewer passes over memory than the
formulas' generic graphs). Their forward must be the formula's numbers bit for bit, their
gradients autograd's of the formula; gradcheck in float64; any subset of inputs with gradients.
"""

import pytest
import torch

from helpers import rel_err
from isnet_fast.engine import torch_ops
from isnet_fast.engine.functions import GatedProduct, ResidualShortcutAdd, ResidualSplitGated
from isnet_fast.engine.torch_ops import channels_first_view, channels_last_view, stabilize

E = 0.1


def gated_formula(rel, act, pre, scale, shift, e):
    act, pre = channels_last_view(act), channels_last_view(pre)
    gate = act / stabilize(pre, e) if scale is None else act * scale / stabilize(pre * scale + shift, e)
    return channels_first_view(channels_last_view(rel) * gate.unsqueeze(1))


def split_formula(rel, out, total, part, pre, scale, shift, e):
    out, total, part, pre = (channels_last_view(t) for t in (out, total, part, pre))
    gate = out * part / stabilize(total, e) * scale / stabilize(pre * scale + shift, e)
    return channels_first_view(channels_last_view(rel) * gate.unsqueeze(1))


def shortcut_formula(back, rel, out, total, e):
    gate = channels_last_view(out) / stabilize(channels_last_view(total), e)
    return channels_first_view(channels_last_view(back) + channels_last_view(rel) * gate.unsqueeze(1))


def to_channels_last(t):
    return t.movedim(-3, -1).contiguous().movedim(-1, -3)


def make_inputs(kind, maps, size, channels_last, dtype=torch.float64, seed=0):
    """Inputs of one Function, as the relevance pass passes them (zeros among the pre-activations,
    which the stabiliser maps to +e)."""
    g = torch.Generator().manual_seed(seed)
    batch, channels = 2, 5
    height, width = size

    def randn(*shape):
        return torch.randn(*shape, generator=g, dtype=dtype)

    def per_image():
        t = randn(batch, channels, height, width)
        t[0, 0, 0, 0] = 0
        return to_channels_last(t) if channels_last else t

    rel = randn(batch, maps, channels, height, width)
    rel = to_channels_last(rel) if channels_last else rel
    scale, shift = torch.rand(channels, generator=g, dtype=dtype) + 0.5, randn(channels)
    if kind == "gated-fold":
        return [rel, per_image().abs(), per_image(), scale, shift]
    if kind == "gated-nofold":
        return [rel, per_image().abs(), per_image(), None, None]
    total = per_image()
    out = torch.relu(total)
    if kind == "split":
        return [rel, out, total, per_image(), per_image(), scale, shift]
    back = randn(batch, maps, channels, height, width)
    return [to_channels_last(back) if channels_last else back, rel, out, total]


FUNCTIONS = {
    "gated-fold": (GatedProduct, gated_formula),
    "gated-nofold": (GatedProduct, gated_formula),
    "split": (ResidualSplitGated, split_formula),
    "shortcut": (ResidualShortcutAdd, shortcut_formula),
}
CASES = [("gated-fold", 3, (4, 3)), ("gated-fold", 1, (5, 7)), ("gated-nofold", 2, (3, 5)),
         ("split", 3, (4, 3)), ("split", 1, (7, 5)), ("shortcut", 3, (4, 3)), ("shortcut", 1, (3, 6))]
CASE_IDS = [f"{kind}-m{maps}-{h}x{w}" for kind, maps, (h, w) in CASES]


def _with_grad(tensors, which=None):
    return [None if t is None else t.clone().requires_grad_(which is None or i in which)
            for i, t in enumerate(tensors)]


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("kind, maps, size", CASES, ids=CASE_IDS)
def test_function_is_the_formula_forward_bitwise_and_backward_to_rounding(kind, maps, size, channels_last):
    function, formula = FUNCTIONS[kind]
    inputs = make_inputs(kind, maps, size, channels_last)
    ours_in, theirs_in = _with_grad(inputs), _with_grad(inputs)
    ours, theirs = function.apply(*ours_in, E), formula(*theirs_in, E)
    assert torch.equal(ours, theirs)
    assert ours.stride() == theirs.stride()
    cotangent = torch.randn(theirs.shape, generator=torch.Generator().manual_seed(1), dtype=theirs.dtype)
    differentiable = [i for i, t in enumerate(inputs) if t is not None]
    ours_grads = torch.autograd.grad(ours, [ours_in[i] for i in differentiable], cotangent)
    theirs_grads = torch.autograd.grad(theirs, [theirs_in[i] for i in differentiable], cotangent)
    for index, mine, expected in zip(differentiable, ours_grads, theirs_grads):
        assert expected.abs().max() > 0, f"input {index} got no gradient from the formula"
        assert rel_err(mine, expected) <= 1e-13, f"input {index}"


@pytest.mark.parametrize("kind", list(FUNCTIONS))
def test_gradcheck_in_float64(kind):
    function, _ = FUNCTIONS[kind]
    inputs = _with_grad(make_inputs(kind, 2, (3, 2), channels_last=True))
    assert torch.autograd.gradcheck(lambda *t: function.apply(*t, E), tuple(inputs), eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("kind", list(FUNCTIONS))
def test_any_single_input_with_gradient(kind):
    """Each input alone asking for a gradient gets the formula's; the others get none."""
    function, formula = FUNCTIONS[kind]
    inputs = make_inputs(kind, 2, (3, 4), channels_last=True)
    for index in (i for i, t in enumerate(inputs) if t is not None):
        ours_in, theirs_in = _with_grad(inputs, {index}), _with_grad(inputs, {index})
        (mine,) = torch.autograd.grad(function.apply(*ours_in, E).sum(), ours_in[index])
        (expected,) = torch.autograd.grad(formula(*theirs_in, E).sum(), theirs_in[index])
        assert rel_err(mine, expected) <= 1e-13, f"input {index}"


def test_the_torch_ops_use_the_functions_under_autograd_and_the_formula_for_mixed_dtypes():
    rel, act, pre, scale, shift = make_inputs("gated-fold", 2, (3, 4), channels_last=True, dtype=torch.float32)
    rel.requires_grad_()
    assert type(torch_ops.gated_product(rel, act, pre, scale, shift, E).grad_fn).__name__ == "GatedProductBackward"
    mixed = torch_ops.gated_product(rel, act, pre, scale.double(), shift.double(), E)  # the formula promotes
    assert mixed.dtype == torch.float64 and type(mixed.grad_fn).__name__ != "GatedProductBackward"
    expected = gated_formula(rel.double(), act.double(), pre.double(), scale.double(), shift.double(), E)
    assert rel_err(mixed, expected) <= 1e-6
    split = make_inputs("split", 2, (3, 4), channels_last=True, dtype=torch.float32)
    split[0].requires_grad_()
    assert type(torch_ops.residual_split_gated(*split, E).grad_fn).__name__ == "ResidualSplitGatedBackward"
    shortcut = make_inputs("shortcut", 2, (3, 4), channels_last=True, dtype=torch.float32)
    shortcut[1].requires_grad_()
    assert type(torch_ops.residual_shortcut_add(*shortcut, E).grad_fn).__name__ == "ResidualShortcutAddBackward"
