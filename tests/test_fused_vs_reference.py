"""The fused pass against the slow per-consumer one, where the original cannot go: any input
size, odd channel counts, deep blocks, both pairings and both un-poolings (the original's
quirks, and the rules as written), train and eval mode."""

import pytest
import torch

from helpers import rel_err
from isnet_fast import DenseNet
from isnet_fast.engine.densenet.forward import run_forward
from isnet_fast.engine.densenet.reference import reference_relevance
from isnet_fast.engine.densenet.relevance import relevance
from isnet_fast.engine.densenet.plan import build_plan

CASES = {
    # id: (DenseNet kwargs, input H x W, batch, mode)
    "odd-size-45x37": (dict(growth_rate=3, block_config=(2, 3), num_init_features=5, bn_size=1, num_classes=3),
                       (45, 37), 2, "eval"),
    "smallest-29x29": (dict(growth_rate=4, block_config=(2, 2, 2, 2), num_init_features=8, bn_size=2, num_classes=2),
                       (29, 29), 1, "eval"),
    "odd-size-train": (dict(growth_rate=3, block_config=(3, 2), num_init_features=7, bn_size=3, num_classes=4),
                       (33, 50), 3, "train"),
    "deep-block-11": (dict(growth_rate=2, block_config=(11, 2), num_init_features=6, bn_size=1, num_classes=2),
                      (35, 35), 2, "eval"),
    "one-class-one-block": (dict(growth_rate=5, block_config=(3,), num_init_features=4, bn_size=2, num_classes=1),
                            (19, 22), 1, "train"),
}


def _randomize_batchnorms(net, generator):
    for module in net.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            n = module.num_features
            module.weight.data = torch.randn(n, generator=generator, dtype=torch.float64)
            module.bias.data = torch.randn(n, generator=generator, dtype=torch.float64) * 0.5
            module.running_mean.data = torch.randn(n, generator=generator, dtype=torch.float64) * 0.3
            module.running_var.data = torch.rand(n, generator=generator, dtype=torch.float64) + 0.5


def _heatmaps_and_grads(net, x, pairing, zb, fn, overwrite_unpool=True):
    plan = build_plan(net, reference_pairing=pairing)
    x = x.clone().requires_grad_()
    acts = run_forward(plan, x)
    R = fn(plan, acts, 0.01, zb, overwrite_unpool=overwrite_unpool)
    cotangent = torch.linspace(-1, 1, R.numel(), dtype=R.dtype).view_as(R)
    grads = torch.autograd.grad((R * cotangent).sum() + acts.y.sum(), [x, *net.parameters()])
    return R, grads


LAYOUTS = {"nchw": torch.contiguous_format, "channels-last": torch.channels_last}

# (reference_pairing, overwriting un-pool): the original's quirks, the pairing fixed alone, neither
# (IsDenseFast(reference_quirks=False))
QUIRKS = {"reference-pairing": (True, True), "lrp-pairing": (False, True), "no-quirks": (False, False)}


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("zb", [True, False], ids=["zb", "epsilon"])
@pytest.mark.parametrize("quirks", list(QUIRKS))
@pytest.mark.parametrize("case", list(CASES))
def test_fused_matches_per_consumer(case, quirks, zb, layout):
    pairing, overwrite_unpool = QUIRKS[quirks]
    kwargs, (height, width), batch, mode = CASES[case]
    generator = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    net = DenseNet(**kwargs).double()
    _randomize_batchnorms(net, generator)
    net.train(mode == "train")
    x = torch.rand(batch, 3, height, width, generator=generator, dtype=torch.float64)
    x = x.contiguous(memory_format=LAYOUTS[layout])  # the fused pass on the CPU runs channels_last
    state = {k: v.clone() for k, v in net.state_dict().items()}
    fused, fused_grads = _heatmaps_and_grads(net, x, pairing, zb, relevance, overwrite_unpool)
    net.load_state_dict(state)  # same BatchNorm statistics for the second run
    slow, slow_grads = _heatmaps_and_grads(net, x, pairing, zb, reference_relevance, overwrite_unpool)
    assert fused.shape == (batch, kwargs["num_classes"], 3, height, width)
    assert torch.isfinite(fused).all()
    assert rel_err(fused, slow) <= 1e-10
    for ours, ref in zip(fused_grads, slow_grads):
        assert rel_err(ours, ref) <= 1e-9


def test_pairings_differ_only_in_deep_blocks():
    torch.manual_seed(0)
    shallow = DenseNet(growth_rate=2, block_config=(9,), num_init_features=4, bn_size=1, num_classes=2).double().eval()
    deep = DenseNet(growth_rate=2, block_config=(10,), num_init_features=4, bn_size=1, num_classes=2).double().eval()
    x = torch.rand(1, 3, 24, 24, dtype=torch.float64)
    with torch.no_grad():
        for net, same in ((shallow, True), (deep, False)):
            heatmaps = [relevance(build_plan(net, p), run_forward(build_plan(net, p), x), 0.01, True) for p in (True, False)]
            assert torch.equal(heatmaps[0], heatmaps[1]) == same


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_no_grad_accumulation_equals_autograd_path(layout):
    torch.manual_seed(1)
    net = DenseNet(growth_rate=3, block_config=(4, 3), num_init_features=6, bn_size=2, num_classes=3).double().eval()
    x = torch.rand(2, 3, 40, 36, dtype=torch.float64).contiguous(memory_format=LAYOUTS[layout])
    plan = build_plan(net)
    with torch.no_grad():
        in_place = relevance(plan, run_forward(plan, x), 0.01, True)
    with torch.enable_grad():
        pieces = relevance(plan, run_forward(plan, x), 0.01, True)
    assert rel_err(in_place, pieces.detach()) <= 1e-12
