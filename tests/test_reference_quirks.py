"""``reference_quirks``: the original's two departures from LRP as written, and the rules without them.

* The summing max-pool un-pooling (``max_unpool_gated(..., overwrite=False)``): the Triton
  kernels (in the interpreter without a GPU) against the torch op, as ``test_kernels.py`` tests
  the others (NaN-filled outputs, gradcheck, bitwise determinism, NCHW and channels_last), and
  both against its definition, the adjoint of max-pool (autograd's backward of ``max_pool2d``).
* It conserves relevance; the overwriting one does not where windows share a pixel.
* ``IsDenseFast(reference_quirks=False)`` at e -> 0, Zb off, eval: the maps summed over the
  classes are gradient x input, for DenseNets with blocks of ten or more layers; the quirks
  (either one) break that.
* How ``reference_quirks`` and its alias ``reference_pairing`` combine, and the errors.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")

from helpers import rel_err  # noqa: E402
from isnet_fast import DenseNet, IsDenseFast  # noqa: E402
from isnet_fast.engine import torch_ops, triton_ops
from isnet_fast.engine.densenet.forward import run_forward  # noqa: E402
from isnet_fast.engine.densenet.relevance import relevance  # noqa: E402
from isnet_fast.engine.densenet.plan import build_plan  # noqa: E402
from test_kernels import (DEVICE, DTYPES, E, FLOAT64_TOL, UnpoolCase, assert_accurate, channels_last,  # noqa: E402
                          evaluate, evaluate_triton, expected_strides, generator, has_shared_pixels,
                          nan_filled_allocations, nonzero_pre, pool_indices, randn, unpool_spec)

OPS = {"torch": torch_ops, "triton": triton_ops}
POOL0 = (3, 2, 1)  # kernel, stride, padding of DenseNet's pool0: overlapping windows


def summing_spec(case: UnpoolCase, seed=0, z_away_from_zero=False):
    """``test_kernels.unpool_spec``'s inputs, called with ``overwrite=False``."""
    spec = unpool_spec(case, seed, z_away_from_zero)
    kernel, stride, padding = case.geometry

    def call(ops, t, e):
        return ops.max_unpool_gated(t["rel"], t["indices"], t["act"], t["z"], e, kernel, stride, padding,
                                    overwrite=False)
    return dataclasses.replace(spec, call=call)


# ---------------------------------------------------------------------------------------------
# (i) The summing un-pool's kernels
# ---------------------------------------------------------------------------------------------

SUM_CASES = [
    pytest.param(UnpoolCase(size=(7, 9), data="ties"), id="b2-c2-ch3-7x9-k3s2p1-ties"),
    pytest.param(UnpoolCase(size=(7, 9)), id="b2-c2-ch3-7x9-k3s2p1-random"),
    pytest.param(UnpoolCase(batch=1, classes=1, channels=1, data="constant"), id="b1-c1-ch1-13x11-k3s2p1-constant"),
    pytest.param(UnpoolCase(batch=1, classes=7, channels=1, size=(8, 8), data="ties"), id="b1-c7-ch1-8x8-ties"),
    pytest.param(UnpoolCase(batch=1, classes=1, channels=1, size=(33, 35), data="ties"),
                 id="b1-c1-ch1-33x35-tail-ties"),
    pytest.param(UnpoolCase(channels=5, size=(7, 9), data="ties", geometry=(2, 2, 0)), id="ch5-7x9-k2s2p0-ties"),
    pytest.param(UnpoolCase(batch=1, size=(6, 5), data="ties", geometry=(3, 1, 1)), id="b1-6x5-k3s1p1-ties"),
    pytest.param(UnpoolCase(data="ties", rel="channel_slice", act="channel_slice"), id="rel_slice-act_slice-ties"),
    pytest.param(UnpoolCase(data="ties", rel="transposed", cotangent="transposed"), id="rel_transposed-cot_transposed"),
    pytest.param(UnpoolCase(size=(7, 9), data="ties", rel="channels_last", act="channels_last",
                            cotangent="channels_last"), id="channels_last-b2-c2-ch3-7x9-k3s2p1-ties"),
    pytest.param(UnpoolCase(batch=1, classes=3, channels=5, size=(7, 9), data="ties", geometry=(2, 2, 0),
                            rel="channels_last", act="channels_last"), id="channels_last-ch5-7x9-k2s2p0-ties"),
    pytest.param(UnpoolCase(batch=1, classes=1, channels=131, size=(5, 3), data="ties", rel="channels_last",
                            act="channels_last"), id="channels_last-ch131-5x3-two_channel_blocks"),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", SUM_CASES)
def test_summing_unpool_matches_torch(case, dtype):
    """Output and all three gradients, every element written (NaN-filled allocations)."""
    spec = summing_spec(case)
    if case.data == "ties" and case.geometry[0] > case.geometry[1]:
        assert has_shared_pixels(spec.bases["indices"]), "the case should have pixels several windows chose"
    e = E[dtype]
    bases = spec.rounded(dtype)
    reference = evaluate(torch_ops, spec, bases, torch.float64, "cpu", e)
    ours = evaluate_triton(spec, bases, dtype, e)
    torch_path = evaluate(torch_ops, spec, bases, dtype, "cpu", e) if dtype != torch.float64 else None
    assert_accurate(ours, torch_path, reference, dtype)


def _max_pool_adjoint(rel, x, geometry):
    """What summing un-pooling is by definition: autograd's backward of max_pool2d (which adds
    every pooled position's gradient into the pixel it took), one cotangent per class."""
    batch, classes = rel.shape[:2]
    x = x.unsqueeze(1).expand(batch, classes, *x.shape[1:]).reshape(batch * classes, *x.shape[1:])
    x = x.clone().requires_grad_()
    (adjoint,) = torch.autograd.grad(F.max_pool2d(x, *geometry), x, rel.flatten(0, 1))
    return adjoint.view(batch, classes, *adjoint.shape[1:])


@pytest.mark.parametrize("backend", list(OPS))
@pytest.mark.parametrize("geometry", [POOL0, (2, 2, 0), (3, 1, 1)], ids=["k3s2p1", "k2s2p0", "k3s1p1"])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_summing_unpool_is_max_pools_adjoint(backend, geometry, layout):
    g = generator(11)
    batch, classes, ch, size = 2, 3, 4, (7, 9)
    x = torch.randint(0, 3, (batch, ch, *size), generator=g).double()  # ties: shared pixels
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    indices = F.max_pool2d(x, *geometry, return_indices=True)[1]
    if geometry[0] > geometry[1]:
        assert has_shared_pixels(indices)
    rel = randn(g, batch, classes, ch, *indices.shape[-2:])
    act, z = randn(g, batch, ch, *size), nonzero_pre(g, batch, ch, *size)
    e = E[torch.float64]
    expected = _max_pool_adjoint(rel, x, geometry) * (act / torch_ops.stabilize(z, e)).unsqueeze(1)
    with nan_filled_allocations():
        ours = OPS[backend].max_unpool_gated(rel.to(DEVICE), indices.to(DEVICE), act.to(DEVICE), z.to(DEVICE), e,
                                             *geometry, overwrite=False)
    assert rel_err(ours, expected) <= FLOAT64_TOL


def test_summing_and_overwriting_differ_only_where_windows_share_pixels():
    spec = summing_spec(UnpoolCase(size=(7, 9), data="ties"))
    bases = spec.rounded(torch.float64)
    summed = evaluate(triton_ops, spec, bases, torch.float64, DEVICE, E[torch.float64], backward=False)["out"]
    overwriting = evaluate(triton_ops, unpool_spec(UnpoolCase(size=(7, 9), data="ties")), bases, torch.float64,
                           DEVICE, E[torch.float64], backward=False)["out"]
    indices = bases["indices"].flatten(2)  # B x ch x (h w)
    choosers = torch.zeros(*indices.shape[:2], 7 * 9, dtype=torch.long).scatter_add_(2, indices,
                                                                                      torch.ones_like(indices))
    shared = (choosers > 1).view(indices.shape[0], 1, indices.shape[1], 7, 9).expand_as(summed)  # every class
    assert shared.any()
    assert torch.equal(summed.cpu()[~shared], overwriting.cpu()[~shared])
    assert not torch.allclose(summed.cpu()[shared], overwriting.cpu()[shared])


def _gradcheck_inputs(g, maps, channels, size, geometry, layout):
    indices = pool_indices(g, 1, channels, size, "ties", geometry, channels_last=layout == "channels_last")
    rel = randn(g, 1, maps, channels, *indices.shape[-2:])
    act, z = randn(g, 1, channels, *size), nonzero_pre(g, 1, channels, *size)
    return indices, rel, act, z


@pytest.mark.parametrize("backend", list(OPS))
@pytest.mark.parametrize("geometry", [POOL0, (2, 2, 0)], ids=["k3s2p1", "k2s2p0"])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_gradcheck_summing_unpool(backend, geometry, layout):
    """Unlike the overwriting un-pool's documented backward, this one is the true gradient,
    shared pixels or not."""
    g = generator(12)
    # one channel has no channels_last storage; 40 outputs either way (the interpreter is slow)
    maps, channels = (1, 2) if layout == "channels_last" else (2, 1)
    indices, rel, act, z = _gradcheck_inputs(g, maps, channels, (5, 4), geometry, layout)
    if geometry == POOL0:
        assert has_shared_pixels(indices)
    indices = indices.to(DEVICE)
    view = channels_last if layout == "channels_last" else (lambda t: t)
    if layout == "channels_last":  # channels innermost storage for rel, act and z
        rel, act, z = (t.movedim(-3, -1).contiguous() for t in (rel, act, z))
    kernel, stride, padding = geometry

    def fn(r, a, q):
        return OPS[backend].max_unpool_gated(view(r), indices, view(a), view(q), 0.1, kernel, stride, padding,
                                             overwrite=False)
    leaves = [t.to(DEVICE).requires_grad_() for t in (rel, act, z)]
    assert torch.autograd.gradcheck(fn, leaves, eps=1e-6, atol=1e-8, rtol=1e-6)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", [
    pytest.param(UnpoolCase(size=(7, 9), data="ties"), id="nchw-7x9-ties"),
    pytest.param(UnpoolCase(batch=1, classes=1, channels=1, data="constant", size=(33, 35)), id="nchw-33x35-constant"),
    pytest.param(UnpoolCase(size=(7, 9), data="ties", rel="channels_last", act="channels_last",
                            cotangent="channels_last"), id="channels_last-7x9-ties"),
])
def test_summing_unpool_is_bitwise_deterministic(case, dtype):
    spec = summing_spec(case)
    bases = spec.rounded(dtype)
    first = evaluate_triton(spec, bases, dtype, E[dtype])
    second = evaluate_triton(spec, bases, dtype, E[dtype])
    assert set(first) == {"out", "grad_rel", "grad_act", "grad_z"}
    for key in first:
        assert torch.equal(first[key], second[key]), key


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_summing_unpool_outputs_and_gradients_take_the_activations_layout(layout):
    stored_channels_last = layout == "channels_last"
    storage = "channels_last" if stored_channels_last else "contiguous"
    spec = summing_spec(UnpoolCase(data="ties", rel=storage, act=storage, cotangent=storage))
    results = evaluate_triton(spec, spec.rounded(torch.float64), torch.float64, E[torch.float64])
    for key, value in results.items():
        assert value.stride() == expected_strides(value.shape, stored_channels_last), key


def test_torch_summing_unpool_keeps_channels_last_and_its_numbers():
    """As ``test_layouts.py`` for the other torch ops: channels_last in, channels_last out (and
    gradients), the output of the same values stored NCHW."""
    spec = summing_spec(UnpoolCase(batch=2, classes=3, channels=5, size=(7, 9), data="ties", rel="channels_last",
                                   act="channels_last", cotangent="channels_last"))
    bases = {name: base.detach().clone() for name, base in spec.bases.items()}  # evaluate flags float64 bases in place
    results = evaluate(torch_ops, spec, bases, torch.float64, "cpu", E[torch.float64])
    for key, value in results.items():
        assert value.stride() == expected_strides(value.shape, True), key
    nchw = dataclasses.replace(spec, views={}, cotangent_layout="contiguous")
    bases = {name: base.detach().clone() for name, base in spec.bases.items()}
    for name in ("rel", "act", "z"):  # the same values, stored NCHW
        bases[name] = spec.views[name](bases[name]).contiguous()
    nchw_out = evaluate(torch_ops, nchw, bases, torch.float64, "cpu", E[torch.float64], backward=False)["out"]
    assert rel_err(nchw_out, results["out"]) <= 1e-15


# ---------------------------------------------------------------------------------------------
# (ii) Conservation
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", list(OPS))
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_summing_unpool_conserves_relevance(backend, layout):
    """With a gate of 1 every plane's relevance sums to what was pooled; the overwriting
    un-pool loses what the overwritten positions held."""
    g = generator(13)
    batch, classes, ch, size = 2, 3, 4, (7, 9)
    indices = pool_indices(g, batch, ch, size, "ties", POOL0, channels_last=layout == "channels_last")
    assert has_shared_pixels(indices)
    rel = randn(g, batch, classes, ch, *indices.shape[-2:]).abs()  # positive: a loss cannot cancel out
    e = 2.0 ** -7
    ones = torch.ones(batch, ch, *size, dtype=torch.float64)
    gate_of_one = (ones.to(DEVICE), (ones - e).to(DEVICE))  # act / stab(1 - e) = 1 exactly
    ops = OPS[backend]
    args = (rel.to(DEVICE), indices.to(DEVICE), *gate_of_one, e, *POOL0)
    pooled_sums = rel.sum(dim=(-2, -1))
    summed = ops.max_unpool_gated(*args, overwrite=False).sum(dim=(-2, -1)).cpu()
    overwritten = ops.max_unpool_gated(*args, overwrite=True).sum(dim=(-2, -1)).cpu()
    assert rel_err(summed, pooled_sums) <= FLOAT64_TOL
    assert (overwritten < pooled_sums * (1 - 1e-6)).any()


# ---------------------------------------------------------------------------------------------
# (iii) Without the quirks, LRP-epsilon at e -> 0 is gradient x input
# ---------------------------------------------------------------------------------------------

DEEP_NETS = {
    # id: DenseNet kwargs; every net has a block of ten or more layers (where the pairing quirk bites)
    "blocks-11-2": dict(growth_rate=3, block_config=(11, 2), num_init_features=8, bn_size=2, num_classes=3),
    "block-10": dict(growth_rate=2, block_config=(10,), num_init_features=6, bn_size=1, num_classes=2),
}


def _random_eval_densenet(kwargs, seed=0):
    """float64, eval mode, BatchNorms with random affine parameters and running statistics."""
    g = generator(seed)
    torch.manual_seed(seed)
    net = DenseNet(**kwargs).double()
    for module in net.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            n = module.num_features
            module.weight.data = torch.rand(n, generator=g, dtype=torch.float64) + 0.5
            module.bias.data = randn(g, n, scale=0.2)
            module.running_mean.data = randn(g, n, scale=0.3)
            module.running_var.data = torch.rand(n, generator=g, dtype=torch.float64) + 0.5
    return net.eval()


def _gradient_x_input(net, x):
    """sum_c x * d y_c / d x, by autograd."""
    x = x.clone().requires_grad_()
    (grad,) = torch.autograd.grad(net(x).sum(), x)
    return (x * grad).detach()


def _summed_heatmaps(model, x, grad_mode):
    with torch.set_grad_enabled(grad_mode == "autograd"):  # the in-place and the autograd relevance paths
        _, heatmaps = model(x)
    return heatmaps.detach().sum(dim=1)


# (net, backend, grad mode): the interpreted Triton kernels are slow, so each net runs them in one mode
GRADIENT_X_INPUT_CASES = [(net, "torch", mode) for net in DEEP_NETS for mode in ("no_grad", "autograd")] + [
    ("blocks-11-2", "triton", "no_grad"), ("block-10", "triton", "autograd")]


@pytest.mark.parametrize("net_id, backend, grad_mode", GRADIENT_X_INPUT_CASES,
                         ids=["-".join(case) for case in GRADIENT_X_INPUT_CASES])
def test_without_quirks_heatmaps_sum_to_gradient_x_input(net_id, backend, grad_mode):
    net = _random_eval_densenet(DEEP_NETS[net_id])
    x = torch.rand(2, 3, 32, 32, generator=generator(1), dtype=torch.float64)
    expected = _gradient_x_input(net, x)
    model = IsDenseFast(net, e=1e-12, Zb=False, reference_quirks=False, backend=backend).eval()
    assert rel_err(_summed_heatmaps(model, x.to(DEVICE), grad_mode), expected) <= 1e-6
    # the original's numbers are far from it: the test can fail
    model.reference_quirks = True
    assert rel_err(_summed_heatmaps(model, x.to(DEVICE), grad_mode), expected) > 1e-2


@pytest.mark.parametrize("pairing, overwrite_unpool", [(True, False), (False, True)],
                         ids=["pairing-quirk-alone", "unpool-quirk-alone"])
def test_either_quirk_alone_breaks_gradient_x_input(pairing, overwrite_unpool):
    net = _random_eval_densenet(DEEP_NETS["blocks-11-2"])
    x = torch.rand(2, 3, 32, 32, generator=generator(1), dtype=torch.float64)
    plan, lrp_plan = build_plan(net, reference_pairing=pairing), build_plan(net, reference_pairing=False)
    with torch.no_grad():
        heatmaps = relevance(plan, run_forward(plan, x), 1e-12, False, overwrite_unpool=overwrite_unpool)
        fixed = relevance(lrp_plan, run_forward(lrp_plan, x), 1e-12, False, overwrite_unpool=False)
    expected = _gradient_x_input(net, x)
    assert rel_err(fixed.sum(dim=1), expected) <= 1e-6
    assert rel_err(heatmaps.sum(dim=1), expected) > 1e-3


# ---------------------------------------------------------------------------------------------
# (iv) reference_quirks and its alias reference_pairing
# ---------------------------------------------------------------------------------------------

TINY = dict(growth_rate=2, block_config=(2,), num_init_features=4, bn_size=1, num_classes=2)


@pytest.mark.parametrize("kwargs, quirks, pairing", [
    pytest.param({}, True, True, id="defaults-the-originals-numbers"),
    pytest.param(dict(reference_quirks=False), False, False, id="quirks-off"),
    pytest.param(dict(reference_quirks=True), True, True, id="quirks-on"),
    pytest.param(dict(reference_pairing=False), True, False, id="pairing-off-alone-fixes-only-the-pairing"),
    pytest.param(dict(reference_pairing=True), True, True, id="pairing-on-alone"),
    pytest.param(dict(reference_quirks=False, reference_pairing=False), False, False, id="both-off"),
    pytest.param(dict(reference_quirks=True, reference_pairing=True), True, True, id="both-on"),
    pytest.param(dict(reference_quirks=True, reference_pairing=False), True, False, id="quirks-on-pairing-off"),
])
def test_reference_quirks_and_reference_pairing_combine(kwargs, quirks, pairing):
    model = IsDenseFast(DenseNet(**TINY), **kwargs)
    assert (model.reference_quirks, model.reference_pairing) == (quirks, pairing)


def test_setting_reference_quirks_sets_the_pairing_too():
    model = IsDenseFast(DenseNet(**TINY), reference_pairing=False)
    model.reference_quirks = False
    assert (model.reference_quirks, model.reference_pairing) == (False, False)
    model.reference_quirks = True
    assert (model.reference_quirks, model.reference_pairing) == (True, True)
    model.reference_pairing = False
    assert (model.reference_quirks, model.reference_pairing) == (True, False)


def test_reference_quirks_off_with_reference_pairing_on_is_refused():
    with pytest.raises(ValueError, match=r"reference_quirks=False.*reference_pairing=True.*reference_quirks=False "
                                         r"alone"):
        IsDenseFast(DenseNet(**TINY), reference_quirks=False, reference_pairing=True)
    model = IsDenseFast(DenseNet(**TINY), reference_quirks=False)
    with pytest.raises(ValueError, match="reference_quirks=False"):
        model.reference_pairing = True
    assert (model.reference_quirks, model.reference_pairing) == (False, False)  # a refused change keeps the old


@pytest.mark.parametrize("name, value", [
    pytest.param("reference_quirks", 0, id="reference_quirks=0"),
    pytest.param("reference_quirks", None, id="reference_quirks=None"),
    pytest.param("reference_pairing", "no", id="reference_pairing='no'"),
])
def test_reference_flags_must_be_booleans(name, value):
    with pytest.raises(TypeError, match=f"{name} must be True or False"):
        IsDenseFast(DenseNet(**TINY), **{name: value})
    model = IsDenseFast(DenseNet(**TINY))
    with pytest.raises(TypeError, match=f"{name} must be True or False"):
        setattr(model, name, value)
    assert (model.reference_quirks, model.reference_pairing) == (True, True)


def test_training_checkpoints_and_lightning_pass_reference_quirks_on(tmp_path):
    from isnet_fast.training import _isdensefast_settings, isdensefast_settings

    model = IsDenseFast(DenseNet(**TINY), reference_quirks=False)
    recorded = {"isdensefast": _isdensefast_settings(model)}
    assert recorded["isdensefast"]["reference_quirks"] is False
    again = IsDenseFast(DenseNet(**TINY), **isdensefast_settings(recorded))
    assert (again.reference_quirks, again.reference_pairing) == (False, False)
    older = {"isdensefast": {"e": 1e-2, "Zb": True, "reference_pairing": False}}  # written before reference_quirks
    again = IsDenseFast(DenseNet(**TINY), **isdensefast_settings(older))
    assert (again.reference_quirks, again.reference_pairing) == (True, False)

    lightning = pytest.importorskip("isnet_fast.lightning")
    architecture = {k: v for k, v in TINY.items() if k != "num_classes"}
    module = lightning.IsDenseFastLightning(False, False, TINY["num_classes"], architecture=architecture,
                                            reference_quirks=False)
    assert (module.model.reference_quirks, module.model.reference_pairing) == (False, False)
