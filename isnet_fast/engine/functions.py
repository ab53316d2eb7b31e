"""autograd Functions of the relevance pass that plain torch ops cannot express."""

from __future__ import annotations

import torch


def _pixels_last(t: torch.Tensor) -> torch.Tensor:
    """``... x ch x H x W`` -> ``... x (H W) x ch``, a view for channels_last tensors."""
    return t.movedim(-3, -1).flatten(-3, -2)


def overwrite_winners(indices: torch.Tensor, input_hw: tuple) -> torch.Tensor:
    """For each input pixel, the last pooled position (raster order) that chose it, or -1.

    ``max_unpool2d`` on the CPU writes pooled positions in raster order, so where several chose
    the same pixel the last one wins; the original's heatmaps depend on it. Taking the largest
    position with ``amax`` gives that winner deterministically, on any device.
    """
    batch, channels, pooled_h, pooled_w = indices.shape
    # Scattered with the channels last, the layout the un-pooling gathers in (see _gather_pixels).
    flat_indices = _pixels_last(indices)
    positions = torch.arange(pooled_h * pooled_w, device=indices.device).view(1, -1, 1).expand_as(flat_indices)
    winners = torch.full((batch, input_hw[0] * input_hw[1], channels), -1, dtype=torch.long, device=indices.device)
    return winners.scatter_reduce_(1, flat_indices, positions, reduce="amax").transpose(1, 2)


def _gather_pixels(source: torch.Tensor, pixel_index: torch.Tensor, classes: int) -> torch.Tensor:
    """``out[b, c, p, ch] = source[b, c, pixel_index[b, ch, p], ch]``, on pixels-last views.

    ``source`` is ``B x C x P x ch``, ``pixel_index`` ``B x ch x Q`` (shared by the classes).
    """
    batch, channels, count = pixel_index.shape
    index = pixel_index.transpose(1, 2).unsqueeze(1).expand(batch, classes, count, channels)
    return source.gather(2, index)


class MaxUnpoolOverwrite(torch.autograd.Function):
    """Un-pools relevance ``B x C x ch x h x w`` to the pool's input size, classes broadcast.

    Forward: each input pixel takes the relevance of its winner (see ``overwrite_winners``).
    Backward: every pooled position gets the gradient at the pixel it chose, overwritten or not,
    which is what autograd gives the original's ``max_unpool2d`` (a gather).
    Both gather with the channels last, so channels_last tensors stay so.
    """

    @staticmethod
    def forward(ctx, relevance, indices, winners, input_hw):
        batch, classes, channels, pooled_h, pooled_w = relevance.shape
        out = _gather_pixels(_pixels_last(relevance), winners.clamp(min=0), classes)
        out = out.masked_fill_((winners < 0).transpose(1, 2).unsqueeze(1), 0)  # pixels no pooled position chose
        ctx.save_for_backward(indices)
        ctx.pooled_hw = (pooled_h, pooled_w)
        return out.view(batch, classes, *input_hw, channels).movedim(-1, -3)

    @staticmethod
    def backward(ctx, grad_out):
        (indices,) = ctx.saved_tensors
        batch, classes, channels = grad_out.shape[:3]
        flat_indices = indices.reshape(batch, channels, -1)
        grad = _gather_pixels(_pixels_last(grad_out), flat_indices, classes)
        return grad.view(batch, classes, *ctx.pooled_hw, channels).movedim(-1, -3), None, None, None


def max_unpool_overwrite(relevance, indices, winners, input_hw):
    return MaxUnpoolOverwrite.apply(relevance, indices, winners, tuple(input_hw))
