"""The fused relevance pass.

Every convolution's relevance goes back through one transposed convolution, however many
layers consume its output: each consumer's epsilon-rule quotient (its BatchNorm folded into
the producer, with the stabiliser) is summed channel-wise first. Everything that does not
depend on the class (activations, folds, stabilised denominators) is computed once per image
as a "gate" and broadcast over the maps; relevance tensors are ``B x M x ch x H x W``, with M
maps per image: one per class (the original ISNet) or one (the Faster ISNet variants, see
``isnet_fast.engine.output``, the only step that sees the number of classes).

The elementwise steps come from an ops module: ``torch_ops`` (plain torch) or
``triton_ops`` (fused Triton kernels with autograd Functions); convolutions stay torch's.
"""

from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch

from .. import torch_ops
from ..output import classifier_input_relevance
from ..rules import batch_statistics, batchnorm_fold, conv_transpose, is_forward_fold
from ..stem import pooled_stem_relevance
from ..torch_ops import (channels_first_view, channels_last_view, merge_batch_and_classes, split_batch_and_classes,
                        stabilize)
from .forward import Activations
from .plan import DenseBlockPlan, DenseNetPlan

def consumer_folds(block: DenseBlockPlan, block_input: torch.Tensor,
                   statistics=None) -> Dict[int, Tuple[torch.Tensor, torch.Tensor, bool]]:
    """For each layer m, the fold (scale, shift) over the channels its relevance reaches, and
    whether it is layer m's own norm1 over all of them (then its relu1 output is the ReLU of it).

    ``block_input`` is the block's concatenated features, ``statistics`` their batch statistics
    (what the BatchNorms fold in training).
    Channel ranges whose producer does not take layer m's relevance (see
    ``structure.consumer_pairs``) get scale 0 and shift 1: they contribute exactly nothing.
    """
    bn_folds = {}

    def fold(bn):
        if id(bn) not in bn_folds:
            bn_folds[id(bn)] = batchnorm_fold(bn, block_input[:, :bn.num_features], statistics)
        return bn_folds[id(bn)]

    folds = {}
    for m, pairs in block.consumers.items():
        if len(pairs) == m and len({id(bn) for _, bn in pairs}) == 1:
            folds[m] = (*fold(pairs[0][1]), True)  # one BatchNorm (layer m's norm1) over all m producers' channels
            continue
        paired = dict(pairs)
        scales, shifts = [], []
        for producer in range(m):
            sl = block.producer_slice(producer)
            bn = paired.get(producer)
            if bn is None:
                scales.append(block_input.new_zeros(sl.stop - sl.start))
                shifts.append(block_input.new_ones(sl.stop - sl.start))
            else:
                scales.append(fold(bn)[0][sl])
                shifts.append(fold(bn)[1][sl])
        folds[m] = (torch.cat(scales), torch.cat(shifts), False)
    return folds


class _Accumulator:
    """Sums the consumers' quotients per channel range of a block's concatenation.

    Without autograd it adds in place into one block-wide tensor, so each consumer's quotient
    is freed at once. With autograd it splits each quotient into its producers' ranges once
    (one cheap backward node, where per-range slicing would zero-fill a full gradient per range)
    and sums a producer's pieces when it needs them.
    """

    def __init__(self, block: DenseBlockPlan, first: torch.Tensor, in_place: bool, ops):
        self.in_place = in_place
        self.ops = ops
        self.widths = [block.in_channels] + [layer.out_stop - layer.out_start for layer in block.layers]
        if in_place:
            self.total = first
        else:
            self.pieces = [[] for _ in self.widths]
            self._split(first)

    def _split(self, quotient: torch.Tensor) -> None:
        count = width_segments(quotient.shape[2], self.widths)
        for producer, piece in enumerate(split_channels(quotient, self.widths[:count])):
            self.pieces[producer].append(piece)

    def add(self, relevance, act, pre, scale, shift, e, act_is_relu=False) -> None:
        """Adds relevance times its gate into the channels it covers."""
        if self.in_place:
            self.ops.gated_accumulate_(self.total[:, :, :relevance.shape[2]], relevance, act, pre, scale, shift, e,
                                       act_is_relu=act_is_relu)
        else:
            self._split(self.ops.gated_product(relevance, act, pre, scale, shift, e, act_is_relu=act_is_relu))

    def take(self, producer: int) -> torch.Tensor:
        if self.in_place:
            start = sum(self.widths[:producer])
            return self.total[:, :, start:start + self.widths[producer]]
        pieces = self.pieces[producer]
        self.pieces[producer] = []  # its last consumer has used it
        if len(pieces) == 1:
            return pieces[0]
        total = pieces[0] + pieces[1]
        for piece in pieces[2:]:
            total += piece  # in place: an addition's backward keeps no inputs, and this saves an allocation each
        return total


def split_channels(relevance: torch.Tensor, widths) -> Tuple[torch.Tensor, ...]:
    """``torch.split`` over the channels (dim 2) of ``B x C x ch x H x W``, as views.

    For channels-innermost relevance it splits a channels-last view, so that the gradient
    autograd assembles from the pieces (a ``cat``) comes out channels-innermost too.
    """
    if relevance.stride(2) == 1 and relevance.shape[2] > 1:
        return tuple(map(channels_first_view, torch.split(channels_last_view(relevance), widths, dim=-1)))
    return torch.split(relevance, widths, dim=2)


def width_segments(width: int, widths) -> int:
    """How many producer ranges (block input first) make up the first ``width`` channels."""
    total = 0
    for count, w in enumerate(widths, start=1):
        total += w
        if total == width:
            return count
    raise AssertionError(f"{width} channels do not end on a producer boundary")


def post_block_relevance(block: DenseBlockPlan, acts, post_relevance: torch.Tensor, e: float, ops,
                         statistics=None) -> torch.Tensor:
    """The post-block BatchNorm's (the transition's or norm5's) quotient over all the block's channels.

    ``post_relevance`` is the class-expanded factor c such that the relevance at the post-block
    ReLU is ``post_relu_out * c``.
    """
    features = acts.output
    scale, shift = batchnorm_fold(block.post_norm, features, statistics)
    return ops.gated_product(post_relevance.expand(-1, -1, -1, *features.shape[-2:]), acts.post_relu_out,
                             features, scale, shift, e, act_is_relu=is_forward_fold(block.post_norm))


def block_relevance(block: DenseBlockPlan, acts, first: torch.Tensor, e: float, in_place: bool, ops,
                    statistics=None) -> torch.Tensor:
    """Relevance through a dense block, from the post-block quotient ``first`` (which, without
    autograd, becomes the block-wide accumulator). Returns the summed quotient for the block
    input's channels: what the transition's (or stem's) pool spreads back.
    """
    features = acts.output
    batch = features.shape[0]
    spatial = features.shape[-2:]
    accumulator = _Accumulator(block, first, in_place, ops)
    folds = consumer_folds(block, features, statistics)
    for layer_plan, layer_acts in zip(reversed(block.layers), reversed(acts.layers)):
        layer = layer_plan.module
        m = int(layer_plan.name[len("denselayer"):])
        back = conv_transpose(layer.conv2, merge_batch_and_classes(accumulator.take(m)), spatial)
        norm2_scale, norm2_shift = batchnorm_fold(layer.norm2, layer_acts.conv1_out)
        back = ops.gated_product(split_batch_and_classes(back, batch), layer_acts.relu2_out, layer_acts.conv1_out,
                                 norm2_scale, norm2_shift, e, act_is_relu=is_forward_fold(layer.norm2))
        back = conv_transpose(layer.conv1, merge_batch_and_classes(back), spatial)
        scale, shift, own_norm1 = folds[m]
        layer_input = layer_acts.norm1_in if layer_acts.norm1_in is not None else features[:, :layer_plan.in_channels]
        accumulator.add(split_batch_and_classes(back, batch), layer_acts.relu1_out, layer_input, scale, shift, e,
                        act_is_relu=own_norm1 and is_forward_fold(layer.norm1))
    return accumulator.take(0)


def transition_relevance(block: DenseBlockPlan, acts, next_quotient: torch.Tensor, e: float, ops) -> torch.Tensor:
    """From the next block's input quotient back to the class-expanded factor at this block's
    post ReLU: average-pool spreading, then the transition conv's epsilon step."""
    spread = ops.pool_spread(next_quotient, acts.transition_relu2_out, acts.transition_conv_out, e, act_is_relu=True)
    back = conv_transpose(block.transition.conv, merge_batch_and_classes(spread), acts.output.shape[-2:])
    return split_batch_and_classes(back, spread.shape[0])


def pool_relevance(plan: DenseNetPlan, acts: Activations, at_classifier_input: torch.Tensor,
                   e: float) -> torch.Tensor:
    """From the relevance at the classifier's input (``B x M x F``, see ``isnet_fast.engine.output``)
    through the global average pool.

    Returns the map-expanded factor at the last block's post ReLU, B x M x F x 1 x 1.
    """
    pooled = acts.pooled.flatten(1)
    hw = acts.blocks[-1].post_relu_out.shape[-2] * acts.blocks[-1].post_relu_out.shape[-1]
    factor = at_classifier_input / stabilize(pooled, e).unsqueeze(1) / hw
    return factor[..., None, None]


def stem_relevance(plan: DenseNetPlan, acts: Activations, quotient: torch.Tensor, e: float, zb: bool,
                   ops, overwrite_unpool: bool = True) -> torch.Tensor:
    """From the first block's input quotient to the input heatmaps: max-pool un-pooling (with the
    original's overwrite rule, or summing where ``overwrite_unpool`` is False) and conv0/norm0 by
    the z^B rule or the epsilon rule."""
    f = plan.features
    return pooled_stem_relevance(f.conv0, f.norm0, f.pool0, acts.x, acts.conv0_out, acts.relu0_out,
                                 acts.pool0_indices, quotient, e, zb, ops, overwrite_unpool)


def relevance(plan: DenseNetPlan, acts: Activations, e: float, zb: bool, ops=torch_ops,
              at_classifier_input: Optional[torch.Tensor] = None, *, overwrite_unpool: bool = True) -> torch.Tensor:
    """Heatmaps B x M x 3 x H x W from the forward pass's activations.

    ``at_classifier_input`` is the relevance at the classifier's input, B x M x F (what the maps
    explain, ``isnet_fast.engine.output``); by default the original's one map per class.
    ``overwrite_unpool`` keeps the original's max-pool un-pooling (the last pooled position that
    chose a pixel wins); False sums them, as the LRP rules read (``IsDenseFast(reference_quirks=False)``).
    Without autograd each relevance tensor is dropped as soon as its last consumer has used it,
    so the pass holds about one block's worth (the block-wide accumulator) at a time.
    """
    if at_classifier_input is None:
        at_classifier_input = classifier_input_relevance(plan.classifier, acts.classifier_input, acts.y, e,
                                                         explain="all", selective=False, classes=None)
    in_place = not torch.is_grad_enabled()
    factor = pool_relevance(plan, acts, at_classifier_input, e)
    del at_classifier_input
    quotient = None
    for index in reversed(range(len(plan.blocks))):
        block, block_acts = plan.blocks[index], acts.blocks[index]
        if block.transition is not None:
            factor, quotient = transition_relevance(block, block_acts, quotient, e, ops), None
        # The block's BatchNorms fold batch statistics of its features in training: compute them once.
        statistics = batch_statistics(block_acts.output) if block.post_norm.training else None
        first, factor = post_block_relevance(block, block_acts, factor, e, ops, statistics), None
        quotient = block_relevance(block, block_acts, first, e, in_place, ops, statistics)
        del first
    return stem_relevance(plan, acts, quotient, e, zb, ops, overwrite_unpool)
