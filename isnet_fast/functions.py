"""autograd Functions of the relevance pass that plain torch ops cannot express."""

from __future__ import annotations

import torch


def overwrite_winners(indices: torch.Tensor, input_hw: tuple) -> torch.Tensor:
    """For each input pixel, the last pooled position (raster order) that chose it, or -1.

    ``max_unpool2d`` on the CPU writes pooled positions in raster order, so where several chose
    the same pixel the last one wins; the original's heatmaps depend on it. Taking the largest
    position with ``amax`` gives that winner deterministically, on any device.
    """
    batch, channels, pooled_h, pooled_w = indices.shape
    flat_indices = indices.reshape(batch, channels, pooled_h * pooled_w)
    positions = torch.arange(pooled_h * pooled_w, device=indices.device).expand_as(flat_indices)
    winners = torch.full((batch, channels, input_hw[0] * input_hw[1]), -1, dtype=torch.long, device=indices.device)
    return winners.scatter_reduce_(2, flat_indices, positions, reduce="amax")


class MaxUnpoolOverwrite(torch.autograd.Function):
    """Un-pools relevance ``B x C x ch x h x w`` to the pool's input size, classes broadcast.

    Forward: each input pixel takes the relevance of its winner (see ``overwrite_winners``).
    Backward: every pooled position gets the gradient at the pixel it chose, overwritten or not,
    which is what autograd gives the original's ``max_unpool2d`` (a gather).
    """

    @staticmethod
    def forward(ctx, relevance, indices, winners, input_hw):
        batch, classes, channels, pooled_h, pooled_w = relevance.shape
        flat = relevance.reshape(batch, classes, channels, pooled_h * pooled_w)
        index = winners.clamp(min=0).unsqueeze(1).expand(batch, classes, channels, winners.shape[-1])
        out = flat.gather(3, index)
        out = torch.where(winners.unsqueeze(1) >= 0, out, torch.zeros((), dtype=out.dtype, device=out.device))
        ctx.save_for_backward(indices)
        ctx.pooled_hw = (pooled_h, pooled_w)
        return out.view(batch, classes, channels, *input_hw)

    @staticmethod
    def backward(ctx, grad_out):
        (indices,) = ctx.saved_tensors
        batch, classes, channels = grad_out.shape[:3]
        flat_grad = grad_out.reshape(batch, classes, channels, -1)
        index = indices.reshape(batch, 1, channels, -1).expand(batch, classes, channels, indices[0, 0].numel())
        grad = flat_grad.gather(3, index).view(batch, classes, channels, *ctx.pooled_hw)
        return grad, None, None, None


def max_unpool_overwrite(relevance, indices, winners, input_hw):
    return MaxUnpoolOverwrite.apply(relevance, indices, winners, tuple(input_hw))
