"""Without autograd the relevance pass frees each relevance tensor after its last consumer."""

import types
import weakref

import pytest
import torch

from isnet_fast import DenseNet
from isnet_fast.engine import torch_ops
from isnet_fast.engine.densenet.forward import run_forward
from isnet_fast.engine.densenet.relevance import relevance
from isnet_fast.engine.densenet.plan import build_plan


class LiveRelevanceTracker:
    """An ops module that watches every relevance tensor passing through the dense blocks' and
    transitions' steps and records the most bytes alive at once (counting each storage once).
    The stem's steps (un-pooling, input rule) work at the input's resolution and are not counted."""

    def __init__(self):
        self.seen = []
        self.peak_bytes = 0
        watched = {name: self._wrap(getattr(torch_ops, name))
                   for name in ("gated_product", "gated_accumulate_", "pool_spread")}
        self.ops = types.SimpleNamespace(max_unpool_gated=torch_ops.max_unpool_gated,
                                         input_rule=torch_ops.input_rule, **watched)

    def _wrap(self, op):
        def tracked(rel, *args, **kwargs):
            self._watch(rel)
            out = op(rel, *args, **kwargs)
            self._watch(out)
            return out
        return tracked

    def _watch(self, tensor):
        self.seen.append(weakref.ref(tensor))
        storages = {}
        for ref in self.seen:
            alive = ref()
            if alive is not None:
                storages[alive.untyped_storage().data_ptr()] = alive.untyped_storage().nbytes()
        self.peak_bytes = max(self.peak_bytes, sum(storages.values()))


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last], ids=["nchw", "channels-last"])
def test_no_grad_pass_holds_about_one_block_of_relevance(layout):
    torch.manual_seed(0)
    # One deep block: keeping every layer's relevance would take ~4x the block's width.
    net = DenseNet(growth_rate=4, block_config=(12,), num_init_features=8, bn_size=2, num_classes=3).eval()
    x = torch.rand(2, 3, 32, 32).contiguous(memory_format=layout)
    plan = build_plan(net)
    tracker = LiveRelevanceTracker()
    with torch.no_grad():
        acts = run_forward(plan, x)
        heatmaps = relevance(plan, acts, 0.01, True, tracker.ops)
    block = acts.blocks[0].output
    one_block = x.shape[0] * 3 * block[0].numel() * block.element_size()  # B x C x channels x H x W
    assert heatmaps.shape == (2, 3, 3, 32, 32)
    assert tracker.peak_bytes <= 1.5 * one_block


def test_tracker_sees_a_pass_that_keeps_everything():
    """The bound above can fail: with autograd every layer's quotient is kept."""
    torch.manual_seed(0)
    net = DenseNet(growth_rate=4, block_config=(12,), num_init_features=8, bn_size=2, num_classes=3).eval()
    x = torch.rand(2, 3, 32, 32)
    plan = build_plan(net)
    tracker = LiveRelevanceTracker()
    acts = run_forward(plan, x)
    relevance(plan, acts, 0.01, True, tracker.ops)
    block = acts.blocks[0].output
    one_block = x.shape[0] * 3 * block[0].numel() * block.element_size()
    assert tracker.peak_bytes > 1.5 * one_block
