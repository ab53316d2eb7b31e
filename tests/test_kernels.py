"""The Triton kernels (through ``isnet_fast.engine.triton_ops``) against the plain torch ops.

Accuracy is judged as flash-attention's tests do: against a float64 torch reference computed
from the same (rounded) inputs, the Triton float32 result may be off by at most twice what the
torch float32 path is off, plus a tiny slack; in float64 both must agree to 1e-12. Without a GPU
the kernels run in Triton's interpreter (tests/conftest.py), so shapes are small.

Every op runs on NCHW inputs (with slices, expands, transposes) and on channels_last storage
(channels innermost, as a channels_last pass on CUDA gives them); outputs and gradients must
come back in the activations' layout (``test_outputs_and_gradients_come_back_in_the_activations_layout``).
What the kernels compile to on a GPU is tested in ``tests/test_compile.py``.

The float64 comparisons use an epsilon that float32 represents exactly (``E[torch.float64]``):
the kernels currently round the stabiliser's epsilon to float32 (see
``test_float64_epsilon_is_not_rounded_to_float32``, which pins that down with e = 0.01).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")

from helpers import rel_err  # noqa: E402
from isnet_fast.engine import torch_ops, triton_ops  # noqa: E402
from isnet_fast.engine.functions import overwritten_positions  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
DTYPES = [pytest.param(torch.float32, id="float32"), pytest.param(torch.float64, id="float64")]
# float64: exactly representable in float32, so these comparisons test the kernels' arithmetic
E = {torch.float32: 1e-2, torch.float64: 2.0 ** -7}
FLOAT64_TOL = 1e-12
FLOAT32_FACTOR, FLOAT32_SLACK = 2.0, 1e-6




# ---------------------------------------------------------------------------------------------
# Helpers: NaN-filled allocations, input specs, evaluation and the error criterion
# ---------------------------------------------------------------------------------------------

class AllocationCounter:
    def __init__(self):
        self.count = 0


@contextlib.contextmanager
def nan_filled_allocations():
    """``torch.empty`` and ``torch.empty_like`` return NaN-filled tensors while active, so an
    element a kernel fails to write shows up as NaN. ``torch.zeros`` stays as it is."""
    real_empty, real_empty_like = torch.empty, torch.empty_like
    counter = AllocationCounter()

    def poison(t):
        counter.count += 1
        if t.is_floating_point():
            t.fill_(float("nan"))
        return t

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch, "empty", lambda *args, **kwargs: poison(real_empty(*args, **kwargs)))
        mp.setattr(torch, "empty_like", lambda *args, **kwargs: poison(real_empty_like(*args, **kwargs)))
        assert torch.empty(2, 3).isnan().all()  # the patch is in force
        counter.count = 0
        yield counter


def generator(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def randn(g, *shape, scale=1.0):
    return torch.randn(*shape, generator=g, dtype=torch.float64) * scale


def nonzero_pre(g, *shape):
    """Values bounded away from zero (for gradcheck's finite differences near the sign switch)."""
    sign = torch.where(torch.rand(*shape, generator=g, dtype=torch.float64) < 0.5, -1.0, 1.0)
    return sign * (0.5 + torch.rand(*shape, generator=g, dtype=torch.float64))


def channels_last(t):
    """A ``... x H x W x ch`` tensor seen as ``... x ch x H x W``: channels innermost (for 4-D
    tensors exactly ``torch.channels_last``)."""
    return t.movedim(-1, -3)


def channels_last_base(g, *shape):
    """Random ``... x H x W x ch`` storage for a ``... x ch x H x W`` tensor (see ``channels_last``)."""
    return randn(g, *shape[:-3], shape[-2], shape[-1], shape[-3])


def channels_innermost(t, channel_dim=-3):
    return t.stride(channel_dim) == 1 and t.shape[channel_dim] > 1


def with_zeros(t):
    """Puts exact zeros (and a negative zero) in: stab(0) = +e, as the original's sign(0) = +1."""
    t = t.clone()
    flat = t.view(-1)
    flat[::5] = 0.0
    flat[1] = -0.0
    return t


@dataclass
class Spec:
    """An op's inputs and how to call it.

    ``bases`` are float64 CPU tensors (integer ones stay as they are); ``views`` turn a base,
    once moved to the device and dtype, into the op's input (slices, expands, transposes);
    ``diff`` names the inputs gradients are taken with respect to.
    """
    bases: Dict[str, torch.Tensor]
    call: Callable  # call(ops, inputs, e) -> output
    diff: List[str]
    views: Dict[str, Callable] = field(default_factory=dict)
    cotangent_layout: str = "contiguous"  # or "transposed" (spatial dims swapped in memory), "expand", "channels_last"
    seed: int = 1

    def rounded(self, dtype):
        """The bases rounded to ``dtype`` and back to float64: the reference's inputs."""
        return {k: v.to(dtype).double() if v.is_floating_point() else v for k, v in self.bases.items()}


def make_inputs(spec: Spec, bases, dtype, device, requires_grad=True):
    inputs = {}
    for name, base in bases.items():
        if base.is_floating_point():
            base = base.to(device, dtype).requires_grad_(requires_grad and name in spec.diff)
        else:
            base = base.to(device)
        inputs[name] = spec.views.get(name, lambda t: t)(base)
    return inputs


def make_cotangent(spec: Spec, shape, dtype, device):
    g = generator(spec.seed + 1000)
    if spec.cotangent_layout == "expand":  # as the backward of a sum over the spatial dims gives
        return randn(g, *shape[:-2], 1, 1).to(device, dtype).expand(*shape)
    if spec.cotangent_layout == "transposed":
        return randn(g, *shape[:-2], shape[-1], shape[-2]).to(device, dtype).transpose(-1, -2)
    if spec.cotangent_layout == "channels_last":  # channels innermost, as a channels_last pass gives
        return channels_last(randn(g, *shape[:-3], shape[-2], shape[-1], shape[-3]).to(device, dtype))
    return randn(g, *shape).to(device, dtype)


def evaluate(ops, spec: Spec, bases, dtype, device, e, backward=True):
    """Output and gradients (w.r.t. every input in ``spec.diff``, random cotangent) of ``ops``."""
    inputs = make_inputs(spec, bases, dtype, device, requires_grad=backward)
    out = spec.call(ops, inputs, e)
    results = {"out": out.detach()}
    if backward:
        cot = make_cotangent(spec, out.shape, dtype, device)
        grads = torch.autograd.grad(out, [inputs[k] for k in spec.diff], cot)
        results.update({f"grad_{k}": g.detach() for k, g in zip(spec.diff, grads)})
    return results


def evaluate_triton(spec: Spec, bases, dtype, e, backward=True):
    with nan_filled_allocations() as counter:
        results = evaluate(triton_ops, spec, bases, dtype, DEVICE, e, backward)
    assert counter.count > 0, "the launchers' allocations were not intercepted"
    return results


def assert_accurate(ours: Dict[str, torch.Tensor], torch_path: Optional[Dict[str, torch.Tensor]],
                    reference: Dict[str, torch.Tensor], dtype):
    """float64: within 1e-12 of the reference. float32: at most FLOAT32_FACTOR times the torch
    float32 path's error against the float64 reference, plus FLOAT32_SLACK."""
    assert set(ours) == set(reference)
    for key, ref in reference.items():
        value = ours[key]
        assert value.dtype == dtype, key
        assert value.shape == ref.shape, key
        assert torch.isfinite(value).all(), f"{key}: not finite (an element was never written?)"
        err = rel_err(value, ref)
        if dtype == torch.float64:
            assert err <= FLOAT64_TOL, f"{key}: relative error {err:.3g}"
        else:
            bound = FLOAT32_FACTOR * rel_err(torch_path[key], ref) + FLOAT32_SLACK
            assert err <= bound, f"{key}: relative error {err:.3g} > {bound:.3g}"


def check_against_torch(spec: Spec, dtype, e=None):
    e = E[dtype] if e is None else e
    bases = spec.rounded(dtype)
    reference = evaluate(torch_ops, spec, bases, torch.float64, "cpu", e)
    ours = evaluate_triton(spec, bases, dtype, e)
    torch_path = evaluate(torch_ops, spec, bases, dtype, "cpu", e) if dtype != torch.float64 else None
    assert_accurate(ours, torch_path, reference, dtype)
    return ours, reference


def has_shared_pixels(indices):
    """Whether, in some plane, several pooled positions chose the same input pixel."""
    flat = indices.flatten(2).sort(dim=-1).values
    return bool((flat[..., 1:] == flat[..., :-1]).any())


# ---------------------------------------------------------------------------------------------
# Specs of the ops
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class GatedCase:
    batch: int = 2
    classes: int = 2
    channels: int = 3
    height: int = 5
    width: int = 7
    fold: bool = True
    rel: str = "contiguous"  # contiguous | expand | channel_slice | transposed | channels_last | channels_last_slice
    # contiguous | channel_slice (act and pre sliced from wider tensors) | channels_last | channels_last_slice
    act: str = "contiguous"
    cotangent: str = "contiguous"
    zeros_in_pre: bool = False
    fold_layout: str = "contiguous"  # or "strided": scale and shift every other element of a longer tensor


def gated_spec(case: GatedCase, seed=0) -> Spec:
    g = generator(seed)
    b, c, ch, h, w = case.batch, case.classes, case.channels, case.height, case.width
    views = {}
    if case.rel == "expand":
        rel = randn(g, b, c, ch, 1, 1)
        views["rel"] = lambda t: t.expand(b, c, ch, h, w)
    elif case.rel == "channel_slice":
        rel = randn(g, b, c, ch + 3, h, w)
        views["rel"] = lambda t: t[:, :, 2:2 + ch]
    elif case.rel == "transposed":
        rel = randn(g, b, c, ch, w, h)
        views["rel"] = lambda t: t.transpose(-1, -2)
    elif case.rel == "channels_last":
        rel = randn(g, b, c, h, w, ch)
        views["rel"] = lambda t: t.permute(0, 1, 4, 2, 3)
    elif case.rel == "channels_last_slice":  # a chunk of a channels-last relevance (split_channels)
        rel = channels_last_base(g, b, c, ch + 3, h, w)
        views["rel"] = lambda t: channels_last(t)[:, :, 2:2 + ch]
    else:
        rel = randn(g, b, c, ch, h, w)
    if case.act == "channel_slice":
        act, pre = randn(g, b, ch + 2, h, w), randn(g, b, ch + 4, h, w)
        views["act"] = lambda t: t[:, 1:1 + ch]
        views["pre"] = lambda t: t[:, 3:3 + ch]
    elif case.act == "channels_last":
        act, pre = channels_last_base(g, b, ch, h, w), channels_last_base(g, b, ch, h, w)
        views["act"] = views["pre"] = channels_last
    elif case.act == "channels_last_slice":  # the first channels of a channels_last block's features
        act, pre = channels_last_base(g, b, ch + 2, h, w), channels_last_base(g, b, ch + 4, h, w)
        views["act"] = lambda t: channels_last(t)[:, 1:1 + ch]
        views["pre"] = lambda t: channels_last(t)[:, 3:3 + ch]
    else:
        act, pre = randn(g, b, ch, h, w), randn(g, b, ch, h, w)
    if case.zeros_in_pre:
        pre = with_zeros(pre)
    bases = dict(rel=rel, act=act, pre=pre)
    diff = ["rel", "act", "pre"]
    if case.fold:
        scale, shift = randn(g, ch), randn(g, ch, scale=0.5)
        scale[0], shift[0] = 0.0, 1.0  # a range the consumer does not take: scale 0, shift 1
        if case.fold_layout == "strided":
            scale = torch.stack([scale, randn(g, ch)], dim=1).flatten()  # scale at the even elements
            shift = torch.stack([randn(g, ch), shift], dim=1)  # shift in the second column
            views["scale"] = lambda t: t[::2]
            views["shift"] = lambda t: t[:, 1]
        bases.update(scale=scale, shift=shift)
        diff += ["scale", "shift"]

        def call(ops, t, e):
            return ops.gated_product(t["rel"], t["act"], t["pre"], t["scale"], t["shift"], e)
    else:
        def call(ops, t, e):
            return ops.gated_product(t["rel"], t["act"], t["pre"], None, None, e)
    return Spec(bases, call, diff, views, case.cotangent)


GATED_CASES = [
    pytest.param(GatedCase(), id="b2-c2-ch3-5x7-fold"),
    pytest.param(GatedCase(fold=False, zeros_in_pre=True), id="b2-c2-ch3-5x7-nofold-zeros"),
    pytest.param(GatedCase(batch=1, classes=1, channels=5, height=4, width=4, fold=False), id="b1-c1-ch5-4x4-nofold"),
    pytest.param(GatedCase(batch=1, classes=7, channels=3, height=3, width=5), id="b1-c7-ch3-3x5-fold"),
    pytest.param(GatedCase(batch=2, classes=3, channels=2, height=1, width=1), id="b2-c3-ch2-1x1-fold"),
    pytest.param(GatedCase(batch=1, classes=2, channels=3, height=1, width=6, fold=False), id="b1-c2-ch3-1x6-nofold"),
    pytest.param(GatedCase(batch=1, classes=1, channels=1, height=33, width=35), id="b1-c1-ch1-33x35-tail-fold"),
    pytest.param(GatedCase(batch=1, classes=2, channels=1, height=33, width=35, fold=False, act="channel_slice"),
                 id="b1-c2-ch1-33x35-tail-nofold-act_slice"),
    pytest.param(GatedCase(rel="expand", act="channel_slice"), id="rel_expand-act_slice-fold"),
    pytest.param(GatedCase(rel="expand", fold=False, height=6, width=6), id="rel_expand-6x6-nofold"),
    pytest.param(GatedCase(rel="channel_slice", cotangent="transposed"), id="rel_slice-cot_transposed-fold"),
    pytest.param(GatedCase(rel="transposed", fold=False, channels=5), id="rel_transposed-ch5-nofold"),
    pytest.param(GatedCase(cotangent="expand", height=4, width=3), id="cot_expand-4x3-fold"),
    pytest.param(GatedCase(fold_layout="strided", batch=1), id="fold_strided"),
    pytest.param(GatedCase(rel="channels_last", act="channel_slice", classes=3), id="rel_channels_last-act_slice-fold"),
    # channels_last storage throughout, as the pass runs on CUDA with channels_last inputs
    pytest.param(GatedCase(rel="channels_last", act="channels_last", cotangent="channels_last"),
                 id="channels_last-b2-c2-ch3-5x7-fold"),
    pytest.param(GatedCase(rel="channels_last_slice", act="channels_last_slice", cotangent="channels_last",
                           fold=False, zeros_in_pre=True), id="channels_last_slices-nofold-zeros"),
    pytest.param(GatedCase(rel="expand", act="channels_last_slice", batch=1, classes=3, height=6, width=6),
                 id="rel_expand-act_channels_last_slice-6x6-fold"),
    pytest.param(GatedCase(rel="channels_last", act="channels_last", batch=1, classes=1, channels=5, height=33,
                           width=35), id="channels_last-b1-c1-ch5-33x35-tail-fold"),
    pytest.param(GatedCase(rel="channels_last", act="channels_last", batch=1, classes=2, channels=131, height=3,
                           width=2, cotangent="channels_last"), id="channels_last-ch131-3x2-two_channel_blocks-fold"),
    pytest.param(GatedCase(batch=1, classes=2, channels=19, height=7, width=7), id="b1-c2-ch19-7x7-fold"),
]


@dataclass(frozen=True)
class PoolCase:
    batch: int = 2
    classes: int = 2
    channels: int = 3
    pooled: tuple = (2, 3)
    extra: tuple = (1, 1)  # H = 2h + extra[0], W = 2w + extra[1]
    rel: str = "contiguous"  # contiguous | channel_slice | transposed | channels_last
    act: str = "contiguous"  # contiguous | channel_slice | channels_last
    cotangent: str = "contiguous"
    zeros_in_pre: bool = False


def pooled_relevance(g, layout, b, c, ch, ph, pw, views):
    """A B x C x ch x ph x pw relevance stored as ``layout`` (channel_slice, transposed or
    contiguous); the view that gives it its shape goes into ``views["rel"]``."""
    if layout == "channel_slice":
        views["rel"] = lambda t: t[:, :, 1:1 + ch]
        return randn(g, b, c, ch + 2, ph, pw)
    if layout == "transposed":
        views["rel"] = lambda t: t.transpose(-1, -2)
        return randn(g, b, c, ch, pw, ph)
    if layout == "channels_last":
        views["rel"] = channels_last
        return channels_last_base(g, b, c, ch, ph, pw)
    return randn(g, b, c, ch, ph, pw)


def pool_spec(case: PoolCase, seed=0, pre_away_from_zero=False) -> Spec:
    g = generator(seed)
    b, c, ch = case.batch, case.classes, case.channels
    ph, pw = case.pooled
    h, w = 2 * ph + case.extra[0], 2 * pw + case.extra[1]
    views = {}
    rel = pooled_relevance(g, case.rel, b, c, ch, ph, pw, views)
    make_pre = nonzero_pre if pre_away_from_zero else randn
    if case.act == "channel_slice":
        act, pre = randn(g, b, ch + 3, h, w), make_pre(g, b, ch + 1, h, w)
        views["act"] = lambda t: t[:, 2:2 + ch]
        views["pre"] = lambda t: t[:, 1:1 + ch]
    elif case.act == "channels_last":
        act, pre = channels_last_base(g, b, ch, h, w), make_pre(g, b, h, w, ch)
        views["act"] = views["pre"] = channels_last
    else:
        act, pre = randn(g, b, ch, h, w), make_pre(g, b, ch, h, w)
    if case.zeros_in_pre:
        pre = with_zeros(pre)

    def call(ops, t, e):
        return ops.pool_spread(t["rel"], t["act"], t["pre"], e)
    return Spec(dict(rel=rel, act=act, pre=pre), call, ["rel", "act", "pre"], views, case.cotangent)


POOL_CASES = [
    pytest.param(PoolCase(), id="b2-c2-ch3-5x7-odd"),
    pytest.param(PoolCase(extra=(0, 0), zeros_in_pre=True), id="b2-c2-ch3-4x6-even-zeros"),
    pytest.param(PoolCase(batch=1, classes=1, channels=5, pooled=(3, 2), extra=(1, 0)), id="b1-c1-ch5-7x4"),
    pytest.param(PoolCase(batch=1, classes=7, channels=1, pooled=(1, 1)), id="b1-c7-ch1-3x3"),
    pytest.param(PoolCase(batch=1, classes=1, channels=1, pooled=(16, 17)), id="b1-c1-ch1-33x35-tail"),
    pytest.param(PoolCase(rel="channel_slice", act="channel_slice"), id="rel_slice-act_slice"),
    pytest.param(PoolCase(rel="transposed", cotangent="transposed", classes=3), id="rel_transposed-cot_transposed"),
    pytest.param(PoolCase(cotangent="expand", extra=(2, 0)), id="6x6_from_2x3-cot_expand"),
    pytest.param(PoolCase(rel="channels_last", act="channels_last", cotangent="channels_last"),
                 id="channels_last-b2-c2-ch3-5x7-odd"),
    pytest.param(PoolCase(rel="channels_last", act="channels_last", cotangent="channels_last", batch=1, classes=3,
                           channels=5, pooled=(3, 4), extra=(0, 0), zeros_in_pre=True),
                 id="channels_last-ch5-6x8-even-zeros"),
    pytest.param(PoolCase(rel="channels_last", act="channels_last", batch=1, classes=1, channels=131, pooled=(1, 2)),
                 id="channels_last-ch131-3x5-two_channel_blocks"),
]


@dataclass(frozen=True)
class UnpoolCase:
    batch: int = 2
    classes: int = 2
    channels: int = 3
    size: tuple = (13, 11)
    data: str = "random"  # random | ties | constant: what the max pool that made the indices saw
    geometry: tuple = (3, 2, 1)  # kernel, stride, padding
    ceil_mode: bool = False  # the pool's: a last, partial row and column of windows
    rel: str = "contiguous"  # contiguous | channel_slice | transposed | channels_last
    act: str = "contiguous"  # contiguous | channel_slice | channels_last (act, z and the pool's indices)
    cotangent: str = "contiguous"


def pool_indices(g, batch, channels, size, data, geometry, channels_last=False, ceil_mode=False):
    if data == "ties":
        x = torch.randint(0, 3, (batch, channels, *size), generator=g).double()
    elif data == "constant":
        x = torch.zeros(batch, channels, *size, dtype=torch.float64)
    else:
        x = randn(g, batch, channels, *size)
    kernel, stride, padding = geometry
    if channels_last:  # as the network's pool gives them in a channels_last pass
        x = x.contiguous(memory_format=torch.channels_last)
    indices = F.max_pool2d(x, kernel, stride, padding, ceil_mode=ceil_mode, return_indices=True)[1]
    assert channels_innermost(indices, 1) == (channels_last and channels > 1)
    return indices


def unpool_spec(case: UnpoolCase, seed=0, z_away_from_zero=False) -> Spec:
    g = generator(seed)
    b, c, ch = case.batch, case.classes, case.channels
    indices = pool_indices(g, b, ch, case.size, case.data, case.geometry, case.act == "channels_last", case.ceil_mode)
    ph, pw = indices.shape[-2:]
    views = {}
    rel = pooled_relevance(g, case.rel, b, c, ch, ph, pw, views)
    make_z = nonzero_pre if z_away_from_zero else randn
    if case.act == "channel_slice":
        act, z = randn(g, b, ch + 2, *case.size), make_z(g, b, ch + 1, *case.size)
        views["act"] = lambda t: t[:, 2:]
        views["z"] = lambda t: t[:, :ch]
    elif case.act == "channels_last":
        act, z = channels_last_base(g, b, ch, *case.size), make_z(g, b, *case.size, ch)
        views["act"] = views["z"] = channels_last
    else:
        act, z = randn(g, b, ch, *case.size), make_z(g, b, ch, *case.size)
    kernel, stride, padding = case.geometry

    def call(ops, t, e):
        return ops.max_unpool_gated(t["rel"], t["indices"], t["act"], t["z"], e, kernel, stride, padding)
    return Spec(dict(rel=rel, indices=indices, act=act, z=z), call, ["rel", "act", "z"], views, case.cotangent)


UNPOOL_CASES = [
    pytest.param(UnpoolCase(), id="b2-c2-ch3-13x11-random"),
    pytest.param(UnpoolCase(data="ties"), id="b2-c2-ch3-13x11-ties"),
    pytest.param(UnpoolCase(batch=1, classes=1, channels=1, data="constant"), id="b1-c1-ch1-13x11-constant"),
    pytest.param(UnpoolCase(batch=1, classes=7, channels=1, size=(8, 8), data="ties"), id="b1-c7-ch1-8x8-ties"),
    pytest.param(UnpoolCase(batch=1, classes=1, channels=1, size=(33, 35), data="ties"),
                 id="b1-c1-ch1-33x35-tail-ties"),
    pytest.param(UnpoolCase(channels=5, size=(9, 7), data="ties", geometry=(2, 2, 0)), id="ch5-9x7-k2s2p0-ties"),
    pytest.param(UnpoolCase(batch=1, size=(6, 5), data="ties", geometry=(3, 1, 1)), id="b1-6x5-k3s1p1-ties"),
    pytest.param(UnpoolCase(size=(12, 11), data="ties", geometry=(3, 2, 0), ceil_mode=True), id="12x11-k3s2p0-ceil-ties"),
    pytest.param(UnpoolCase(data="ties", rel="channel_slice", act="channel_slice"), id="rel_slice-act_slice-ties"),
    pytest.param(UnpoolCase(data="ties", rel="transposed", cotangent="transposed"), id="rel_transposed-cot_transposed"),
    pytest.param(UnpoolCase(data="ties", rel="channels_last", act="channels_last", cotangent="channels_last"),
                 id="channels_last-b2-c2-ch3-13x11-ties"),
    pytest.param(UnpoolCase(batch=1, classes=3, channels=5, size=(9, 7), data="ties", geometry=(3, 1, 1),
                            rel="channels_last", act="channels_last"), id="channels_last-ch5-9x7-k3s1p1-ties"),
]

COEFFICIENTS = {1: (), 2: (1.0,), 3: (0.5, 2.0)}


@dataclass(frozen=True)
class InputCase:
    parts: int = 3
    batch: int = 2
    classes: int = 2
    channels: int = 3
    height: int = 5
    width: int = 7
    layout: str = "contiguous"  # contiguous | sliced (back a channel slice, x a channel slice) | channels_last


def input_spec(case: InputCase, seed=0) -> Spec:
    g = generator(seed)
    b, c, cin, h, w, parts = case.batch, case.classes, case.channels, case.height, case.width, case.parts
    coefficients = COEFFICIENTS[parts]
    views = {}
    if case.layout == "sliced":
        back, x = randn(g, b, c, parts * cin + 2, h, w), randn(g, b, cin + 1, h, w)
        views["back"] = lambda t: t[:, :, 1:1 + parts * cin]
        views["x"] = lambda t: t[:, 1:]
    elif case.layout == "channels_last":
        back, x = channels_last_base(g, b, c, parts * cin, h, w), channels_last_base(g, b, cin, h, w)
        views["back"] = views["x"] = channels_last
    else:
        back, x = randn(g, b, c, parts * cin, h, w), randn(g, b, cin, h, w)

    def call(ops, t, e):
        return ops.input_rule(t["back"], t["x"], coefficients)
    cotangent = "channels_last" if case.layout == "channels_last" else "contiguous"
    return Spec(dict(back=back, x=x), call, ["back", "x"], views, cotangent)


INPUT_CASES = [
    pytest.param(InputCase(parts=parts, **shape), id=f"{parts}parts-{name}")
    for parts in (1, 2, 3)
    for name, shape in [("b2-c2-cin3-5x7", {}),
                        ("b1-c7-cin1-3x3", dict(batch=1, classes=7, channels=1, height=3, width=3)),
                        ("sliced", dict(layout="sliced", channels=5, classes=1)),
                        ("channels_last", dict(layout="channels_last"))]
] + [
    pytest.param(InputCase(parts=3, batch=1, classes=1, channels=1, height=33, width=35), id="3parts-33x35-tail"),
]


# ---------------------------------------------------------------------------------------------
# Forward and backward against torch_ops
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", GATED_CASES)
def test_gated_product_matches_torch(case, dtype):
    check_against_torch(gated_spec(case), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", POOL_CASES)
def test_pool_spread_matches_torch(case, dtype):
    out, _ = check_against_torch(pool_spec(case), dtype)
    if case.extra != (0, 0):  # rows and columns the pool dropped get nothing
        ph, pw = case.pooled
        for key in ("out", "grad_act", "grad_pre"):
            assert (out[key][..., 2 * ph:, :] == 0).all() and (out[key][..., 2 * pw:] == 0).all(), key


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", UNPOOL_CASES)
def test_max_unpool_gated_matches_torch(case, dtype):
    spec = unpool_spec(case)
    if case.data == "ties" and case.geometry[0] > case.geometry[1]:
        assert has_shared_pixels(spec.bases["indices"]), "the case should have pixels several windows chose"
    check_against_torch(spec, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", INPUT_CASES)
def test_input_rule_matches_torch(case, dtype):
    check_against_torch(input_spec(case), dtype)


ACCUMULATE_CASES = [
    pytest.param(GatedCase(), 2, id="b2-c2-ch3-5x7-fold-prefix_of_5"),
    pytest.param(GatedCase(fold=False, zeros_in_pre=True), 0, id="b2-c2-ch3-5x7-nofold-whole"),
    pytest.param(GatedCase(batch=1, classes=7, channels=5, height=3, width=3, act="channel_slice"), 3,
                 id="b1-c7-ch5-3x3-fold-act_slice-prefix_of_8"),
    pytest.param(GatedCase(batch=1, classes=1, channels=1, height=33, width=35, fold=False), 1,
                 id="b1-c1-ch1-33x35-tail-nofold-prefix_of_2"),
    pytest.param(GatedCase(rel="expand", batch=1), 2, id="rel_expand-fold-prefix_of_5"),
    pytest.param(GatedCase(rel="transposed", fold=False, batch=1), 2, id="rel_transposed-nofold-prefix_of_5"),
    pytest.param(GatedCase(fold_layout="strided", batch=1), 1, id="fold_strided-prefix_of_4"),
    # a channels_last pass: the block-wide total and the features are channels_last, the layer's
    # input its first channels
    pytest.param(GatedCase(rel="channels_last", act="channels_last_slice", classes=3), 2,
                 id="channels_last-fold-act_slice-prefix_of_5"),
    pytest.param(GatedCase(rel="channels_last", act="channels_last", batch=1, channels=131, height=2, width=3), 5,
                 id="channels_last-ch131-two_channel_blocks-prefix_of_136"),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case, extra_channels", ACCUMULATE_CASES)
def test_gated_accumulate_matches_torch(case, extra_channels, dtype):
    """In place into ``total[:, :, :ch]``; the channels after the prefix stay untouched."""
    spec = gated_spec(case)
    e = E[dtype]
    bases = spec.rounded(dtype)
    g = generator(7)
    b, c, ch, h, w = case.batch, case.classes, case.channels, case.height, case.width
    if case.act.startswith("channels_last"):
        total = channels_last(channels_last_base(g, b, c, ch + extra_channels, h, w).to(dtype))
    else:
        total = randn(g, b, c, ch + extra_channels, h, w).to(dtype)

    def accumulate(ops, dtype, device):
        inputs = make_inputs(spec, bases, dtype, device, requires_grad=False)
        target = total.to(device, dtype).clone()  # keeps total's strides
        assert target.stride() == total.stride()
        if case.fold:
            returned = ops.gated_accumulate_(target[:, :, :ch], inputs["rel"], inputs["act"], inputs["pre"],
                                             inputs["scale"], inputs["shift"], e)
        else:
            returned = ops.gated_accumulate_(target[:, :, :ch], inputs["rel"], inputs["act"], inputs["pre"],
                                             None, None, e)
        assert returned.data_ptr() == target.data_ptr() and returned.shape == (b, c, ch, h, w)
        return target

    reference = accumulate(torch_ops, torch.float64, "cpu")
    with nan_filled_allocations():
        ours = accumulate(triton_ops, dtype, DEVICE)
    assert torch.equal(ours[:, :, ch:].cpu(), total[:, :, ch:]), "channels past the prefix changed"
    torch_path = {"out": accumulate(torch_ops, dtype, "cpu")[:, :, :ch]} if dtype != torch.float64 else None
    assert_accurate({"out": ours[:, :, :ch]}, torch_path, {"out": reference[:, :, :ch]}, dtype)
    assert not torch.equal(ours[:, :, :ch].cpu(), total[:, :, :ch]), "nothing was accumulated"


# ---------------------------------------------------------------------------------------------
# act_is_relu: the gate from act alone, without autograd
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("fold", [True, False], ids=["fold", "nofold"])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("accumulate", [False, True], ids=["product", "accumulate"])
def test_gated_product_act_is_relu_reads_no_pre(fold, layout, accumulate):
    """act = relu(pre * scale + shift) (an eval-mode BatchNorm's fold): the kernel's gate is
    torch_ops' act * scale / (act + e), the full formula's up to rounding, and pre is never read
    (it is NaN here)."""
    g = generator(11)
    b, c, ch, h, w = 2, 3, 5, 7, 9
    rel, pre = randn(g, b, c, ch, h, w), with_zeros(randn(g, b, ch, h, w))
    scale, shift = (randn(g, ch), randn(g, ch, scale=0.5)) if fold else (None, None)
    act = torch.relu(pre * scale.view(-1, 1, 1) + shift.view(-1, 1, 1)) if fold else torch.relu(pre)
    if layout == "channels_last":
        rel = channels_last(rel.movedim(2, -1).contiguous())
        act, pre = (t.contiguous(memory_format=torch.channels_last) for t in (act, pre))
    e = E[torch.float64]
    hinted = torch_ops.gated_product(rel, act, pre, scale, shift, e, act_is_relu=True)
    full = torch_ops.gated_product(rel, act, pre, scale, shift, e)
    assert rel_err(hinted, full) <= 1e-14
    target = randn(g, b, c, ch, h, w)
    if layout == "channels_last":
        target = channels_last(target.movedim(2, -1).contiguous())
    nan_pre = torch.full_like(pre, float("nan"))
    with nan_filled_allocations(), torch.no_grad():
        if accumulate:
            ours = triton_ops.gated_accumulate_(target.clone().to(DEVICE), rel.to(DEVICE), act.to(DEVICE),
                                                nan_pre.to(DEVICE), *(t.to(DEVICE) if fold else None
                                                                      for t in (scale, shift)), e, act_is_relu=True)
            expected = target + hinted
        else:
            ours = triton_ops.gated_product(rel.to(DEVICE), act.to(DEVICE), nan_pre.to(DEVICE),
                                            *(t.to(DEVICE) if fold else None for t in (scale, shift)), e,
                                            act_is_relu=True)
            expected = hinted
            assert ours.stride() == expected_strides(ours.shape, layout == "channels_last")
    assert rel_err(ours, expected) <= FLOAT64_TOL


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_pool_spread_act_is_relu_reads_no_pre(layout):
    """act = relu(pre) (the transition's ReLU): the same numbers as the full formula (division by
    4 is exact), pre never read."""
    g = generator(12)
    b, c, ch, ph, pw = 2, 2, 3, 3, 4
    rel, pre = randn(g, b, c, ch, ph, pw), with_zeros(randn(g, b, ch, 2 * ph + 1, 2 * pw))
    act = torch.relu(pre)
    if layout == "channels_last":
        act, pre = (t.contiguous(memory_format=torch.channels_last) for t in (act, pre))
    e = E[torch.float64]
    expected = torch_ops.pool_spread(rel, act, pre, e)
    with nan_filled_allocations(), torch.no_grad():
        ours = triton_ops.pool_spread(rel.to(DEVICE), act.to(DEVICE), torch.full_like(pre, float("nan")).to(DEVICE), e,
                                      act_is_relu=True)
    assert ours.stride() == expected_strides(ours.shape, layout == "channels_last")
    assert rel_err(ours, expected) <= FLOAT64_TOL
    assert (ours[..., 2 * ph:, :].cpu() == 0).all()


def test_act_is_relu_is_ignored_under_autograd():
    """With autograd the full formula runs (its gradients are the original's): pre matters."""
    g = generator(13)
    rel, pre = randn(g, 1, 2, 3, 4, 5), nonzero_pre(g, 1, 3, 4, 5)
    act = torch.relu(pre).to(DEVICE).requires_grad_()
    rel, pre = rel.to(DEVICE).requires_grad_(), pre.to(DEVICE).requires_grad_()
    out = triton_ops.gated_product(rel, act, pre, None, None, 0.1, act_is_relu=True)
    assert out.requires_grad
    grad_pre, = torch.autograd.grad(out.sum(), pre)
    assert grad_pre.abs().max() > 0


def test_gated_accumulate_rejects_an_output_whose_spatial_dims_do_not_flatten():
    spec = gated_spec(GatedCase(batch=1, fold=False, height=5, width=7))
    inputs = make_inputs(spec, spec.bases, torch.float64, DEVICE, requires_grad=False)
    target = torch.zeros(1, 2, 3, 7, 5, dtype=torch.float64, device=DEVICE).transpose(-1, -2)
    with pytest.raises(ValueError, match="flatten"):
        triton_ops.gated_accumulate_(target, inputs["rel"], inputs["act"], inputs["pre"], None, None, 0.01)


# ---------------------------------------------------------------------------------------------
# The un-pooling's semantics against torch's own max_unpool2d (shared pixels)
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("case", [
    pytest.param(UnpoolCase(data="ties"), id="b2-c2-ch3-13x11-ties"),
    pytest.param(UnpoolCase(batch=1, classes=3, channels=2, size=(7, 6), data="constant", geometry=(3, 1, 1)),
                 id="b1-c3-ch2-7x6-k3s1p1-constant"),
    pytest.param(UnpoolCase(batch=1, classes=2, channels=2, size=(6, 5), data="ties", geometry=(3, 1, 1)),
                 id="b1-c2-ch2-6x5-k3s1p1-ties"),
])
def test_max_unpool_gated_matches_torch_max_unpool2d_with_shared_pixels(case):
    """Forward: CPU ``F.max_unpool2d`` (later pooled positions overwrite earlier ones) times the
    gate. Backward w.r.t. rel: autograd of ``F.max_unpool2d`` (a gather at every pooled position,
    overwritten or not) times the gate."""
    spec = unpool_spec(case)
    indices = spec.bases["indices"]
    assert has_shared_pixels(indices)
    e = E[torch.float64]
    b, c, ch = case.batch, case.classes, case.channels
    height, width = case.size
    ph, pw = indices.shape[-2:]

    rel = spec.bases["rel"].clone().requires_grad_()
    act, z = spec.bases["act"], spec.bases["z"]
    gate = (act / torch_ops.stabilize(z, e)).unsqueeze(1)
    per_class_indices = indices.unsqueeze(1).expand(b, c, ch, ph, pw).reshape(b * c, ch, ph, pw)
    unpooled = F.max_unpool2d(rel.reshape(b * c, ch, ph, pw), per_class_indices, *case.geometry,
                              output_size=(height, width))
    expected = unpooled.view(b, c, ch, height, width) * gate
    cot = make_cotangent(spec, expected.shape, torch.float64, "cpu")
    (expected_grad,) = torch.autograd.grad(expected, rel, cot)

    ours_rel = rel.detach().to(DEVICE).requires_grad_()
    with nan_filled_allocations():
        ours = triton_ops.max_unpool_gated(ours_rel, indices.to(DEVICE), act.to(DEVICE), z.to(DEVICE), e,
                                           *case.geometry)
        (ours_grad,) = torch.autograd.grad(ours, ours_rel, cot.to(DEVICE))
    assert rel_err(ours, expected) <= FLOAT64_TOL
    assert rel_err(ours_grad, expected_grad) <= FLOAT64_TOL
    # the overwritten positions do get a gradient: it is not the gradient of the forward's gather
    kernel, stride, _ = case.geometry
    losers = overwritten_positions(indices, kernel, stride).unsqueeze(1).expand(b, c, ch, ph, pw)
    assert losers.any()
    assert (ours_grad.cpu()[losers] != 0).any()


# ---------------------------------------------------------------------------------------------
# The float64 epsilon
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("spec_factory", [
    pytest.param(lambda: gated_spec(GatedCase(fold=True)), id="gated_product-fold"),
    pytest.param(lambda: gated_spec(GatedCase(fold=False)), id="gated_product-nofold"),
    pytest.param(lambda: pool_spec(PoolCase()), id="pool_spread"),
    pytest.param(lambda: unpool_spec(UnpoolCase(data="ties")), id="max_unpool_gated"),
])
def test_float64_epsilon_is_not_rounded_to_float32(spec_factory):
    """With e = 0.01 (the model's default, not a float32 number) float64 must still agree to 1e-12."""
    check_against_torch(spec_factory(), torch.float64, e=0.01)


# ---------------------------------------------------------------------------------------------
# gradcheck of the autograd Functions (float64, tiny inputs)
# ---------------------------------------------------------------------------------------------

def _leaves(*tensors):
    return [t.to(DEVICE).requires_grad_() for t in tensors]


@pytest.mark.parametrize("fold", [True, False], ids=["fold", "nofold"])
def test_gradcheck_gated_product(fold):
    g = generator(3)
    rel, act, pre = randn(g, 1, 2, 2, 3, 3), randn(g, 1, 2, 3, 3), nonzero_pre(g, 1, 2, 3, 3)
    if fold:
        scale, shift = 0.5 + torch.rand(2, generator=g, dtype=torch.float64), randn(g, 2, scale=0.05)
        inputs = _leaves(rel, act, pre, scale, shift)
        fn = lambda r, a, p, s, t: triton_ops.GatedProduct.apply(r, a, p, s, t, 0.1)  # noqa: E731
    else:
        inputs = _leaves(rel, act, pre)
        fn = lambda r, a, p: triton_ops.GatedProduct.apply(r, a, p, None, None, 0.1)  # noqa: E731
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-8, rtol=1e-6)


def test_gradcheck_pool_spread():
    g = generator(4)
    rel, act, pre = randn(g, 1, 2, 1, 2, 1), randn(g, 1, 1, 5, 3), nonzero_pre(g, 1, 1, 5, 3)
    fn = lambda r, a, p: triton_ops.PoolSpread.apply(r, a, p, 0.1)  # noqa: E731
    assert torch.autograd.gradcheck(fn, _leaves(rel, act, pre), eps=1e-6, atol=1e-8, rtol=1e-6)


def test_gradcheck_max_unpool_gated_without_shared_pixels():
    """kernel 2, stride 2: every pixel is in one window at most, so the documented backward is
    the true gradient (with shared pixels it is not: see the test against max_unpool2d)."""
    g = generator(5)
    indices = pool_indices(g, 1, 1, (5, 4), "random", (2, 2, 0))  # the odd last row is in no window
    assert not has_shared_pixels(indices)
    rel, act, z = randn(g, 1, 2, 1, 2, 2), randn(g, 1, 1, 5, 4), nonzero_pre(g, 1, 1, 5, 4)
    indices = indices.to(DEVICE)
    fn = lambda r, a, q: triton_ops.MaxUnpoolGated.apply(r, indices, a, q, 0.1, 2, 2, 0)  # noqa: E731
    assert torch.autograd.gradcheck(fn, _leaves(rel, act, z), eps=1e-6, atol=1e-8, rtol=1e-6)


@pytest.mark.parametrize("parts", [1, 2, 3], ids=["1part", "2parts", "3parts"])
def test_gradcheck_input_rule(parts):
    g = generator(6)
    back, x = randn(g, 1, 2, parts * 1, 3, 2), randn(g, 1, 1, 3, 2)
    coefficients = COEFFICIENTS[parts]
    fn = lambda bk, xx: triton_ops.InputRule.apply(bk, xx, coefficients)  # noqa: E731
    assert torch.autograd.gradcheck(fn, _leaves(back, x), eps=1e-6, atol=1e-8, rtol=1e-6)


def test_gradcheck_gated_product_channels_last():
    g = generator(7)
    rel, act, pre = randn(g, 1, 2, 3, 2, 3), randn(g, 1, 3, 2, 3), nonzero_pre(g, 1, 3, 2, 3)
    scale, shift = 0.5 + torch.rand(3, generator=g, dtype=torch.float64), randn(g, 3, scale=0.05)

    def fn(r, a, p, s, t):
        return triton_ops.GatedProduct.apply(channels_last(r), channels_last(a), channels_last(p), s, t, 0.1)
    assert torch.autograd.gradcheck(fn, _leaves(rel, act, pre, scale, shift), eps=1e-6, atol=1e-8, rtol=1e-6)


def test_gradcheck_pool_spread_channels_last():
    g = generator(8)
    rel, act, pre = randn(g, 1, 2, 1, 2, 2), randn(g, 1, 5, 4, 2), nonzero_pre(g, 1, 5, 4, 2)

    def fn(r, a, p):
        return triton_ops.PoolSpread.apply(channels_last(r), channels_last(a), channels_last(p), 0.1)
    assert torch.autograd.gradcheck(fn, _leaves(rel, act, pre), eps=1e-6, atol=1e-8, rtol=1e-6)


def test_gradcheck_max_unpool_gated_channels_last_without_shared_pixels():
    g = generator(9)
    indices = pool_indices(g, 1, 2, (5, 4), "random", (2, 2, 0), channels_last=True)
    assert not has_shared_pixels(indices)
    rel, act, z = randn(g, 1, 2, 2, 2, 2), randn(g, 1, 5, 4, 2), nonzero_pre(g, 1, 5, 4, 2)
    indices = indices.to(DEVICE)

    def fn(r, a, q):
        return triton_ops.MaxUnpoolGated.apply(channels_last(r), indices, channels_last(a), channels_last(q), 0.1,
                                               2, 2, 0)
    assert torch.autograd.gradcheck(fn, _leaves(rel, act, z), eps=1e-6, atol=1e-8, rtol=1e-6)


def expected_strides(shape, channels_last_storage):
    """The strides of a dense tensor of ``shape``, channels innermost or not."""
    if not channels_last_storage:
        return torch.empty(shape).stride()
    return channels_last(torch.empty(*shape[:-3], shape[-2], shape[-1], shape[-3])).stride()


@pytest.mark.parametrize("spec_factory, stored_channels_last", [
    pytest.param(lambda: gated_spec(GatedCase()), False, id="gated_product-nchw"),
    pytest.param(lambda: gated_spec(GatedCase(act="channel_slice", rel="expand")), False,
                 id="gated_product-nchw-act_slice-rel_expand"),
    pytest.param(lambda: gated_spec(GatedCase(rel="channels_last", act="channels_last", cotangent="channels_last")),
                 True, id="gated_product-channels_last"),
    pytest.param(lambda: gated_spec(GatedCase(rel="expand", act="channels_last_slice")), True,
                 id="gated_product-channels_last_slice-rel_expand"),
    pytest.param(lambda: pool_spec(PoolCase()), False, id="pool_spread-nchw"),
    pytest.param(lambda: pool_spec(PoolCase(rel="channels_last", act="channels_last", cotangent="channels_last")),
                 True, id="pool_spread-channels_last"),
    pytest.param(lambda: unpool_spec(UnpoolCase(data="ties")), False, id="max_unpool_gated-nchw"),
    pytest.param(lambda: unpool_spec(UnpoolCase(data="ties", rel="channels_last", act="channels_last",
                                                cotangent="channels_last")), True, id="max_unpool_gated-channels_last"),
    pytest.param(lambda: input_spec(InputCase()), False, id="input_rule-nchw"),
    pytest.param(lambda: input_spec(InputCase(layout="channels_last")), True, id="input_rule-channels_last"),
])
def test_outputs_and_gradients_come_back_in_the_activations_layout(spec_factory, stored_channels_last):
    """Dense, channels innermost for channels_last activations (so that a channels_last pass
    stays so on CUDA), NCHW-contiguous otherwise; whatever the cotangent's layout."""
    spec = spec_factory()
    results = evaluate_triton(spec, spec.rounded(torch.float64), torch.float64, E[torch.float64])
    checked = 0
    for key, value in results.items():
        if value.dim() < 4:
            continue  # a fold's gradient
        assert value.stride() == expected_strides(value.shape, stored_channels_last), key
        checked += 1
    assert checked >= 3


# ---------------------------------------------------------------------------------------------
# Determinism and bad input
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("spec_factory", [
    pytest.param(lambda: gated_spec(GatedCase(batch=2, classes=2, channels=2, height=33, width=35)),
                 id="gated_product-fold-33x35"),
    pytest.param(lambda: pool_spec(PoolCase(classes=3)), id="pool_spread"),
    pytest.param(lambda: unpool_spec(UnpoolCase(data="ties")), id="max_unpool_gated-ties"),
    pytest.param(lambda: unpool_spec(UnpoolCase(batch=1, classes=1, channels=1, data="constant", size=(33, 35))),
                 id="max_unpool_gated-constant-33x35"),
    pytest.param(lambda: input_spec(InputCase(parts=3)), id="input_rule"),
    pytest.param(lambda: gated_spec(GatedCase(batch=2, classes=2, channels=5, height=9, width=11, rel="channels_last",
                                              act="channels_last", cotangent="channels_last")),
                 id="gated_product-fold-channels_last"),
    pytest.param(lambda: pool_spec(PoolCase(classes=3, rel="channels_last", act="channels_last",
                                            cotangent="channels_last")), id="pool_spread-channels_last"),
    pytest.param(lambda: unpool_spec(UnpoolCase(data="ties", rel="channels_last", act="channels_last",
                                                cotangent="channels_last")), id="max_unpool_gated-ties-channels_last"),
    pytest.param(lambda: input_spec(InputCase(parts=3, layout="channels_last")), id="input_rule-channels_last"),
])
def test_bitwise_deterministic(spec_factory, dtype):
    spec = spec_factory()
    bases = spec.rounded(dtype)
    first = evaluate_triton(spec, bases, dtype, E[dtype])
    second = evaluate_triton(spec, bases, dtype, E[dtype])
    assert set(first) == set(second) and len(first) > 1
    for key in first:
        assert torch.equal(first[key], second[key]), key


@pytest.mark.parametrize("back_channels, coefficients", [
    pytest.param(6, (), id="2parts-no_coefficient"),
    pytest.param(3, (1.0,), id="1part-one_coefficient"),
    pytest.param(9, (1.0,), id="3parts-one_coefficient"),
    pytest.param(7, (1.0,), id="not_a_multiple"),
    pytest.param(12, (1.0, 2.0, 3.0), id="4parts"),
])
def test_input_rule_rejects_channels_that_do_not_match_the_coefficients(back_channels, coefficients):
    back = torch.randn(1, 2, back_channels, 3, 3, device=DEVICE)
    x = torch.randn(1, 3, 3, 3, device=DEVICE)
    with pytest.raises(ValueError, match="parts"):
        triton_ops.input_rule(back, x, coefficients)
