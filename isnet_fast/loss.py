"""ISNet heatmap (background-relevance) loss.

A vectorised re-implementation of ISNet's ``LRPLossCEValleysGWRP``: same
arguments, same defaults and the same numbers, without host syncs or prints.
"""

import math

import torch

__all__ = ["heatmap_loss"]

# GWRP tail terms smaller than this fraction of the pooled value are dropped
# (far below float32 resolution, 2**-24), so a partial top-k can replace a full sort.
_GWRP_TAIL = 2.0**-40


def _gwrp(x, d):
    """Global weighted rank pooling over the last dim.

    Sorts each row in descending order and returns ``sum_i d**i x_(i) / sum_i d**i``.
    """
    n = x.shape[-1]
    # Powers are taken in float64 and rounded once to float32, as the reference
    # does with Python floats; the normaliser keeps all n weights.
    w = (torch.tensor(float(d), dtype=torch.float64) ** torch.arange(n, dtype=torch.float64)).to(x)
    k = n
    if 0 < d < 1:
        # sum_{i>=k} d**i x_(i) <= x_(0) d**k / (1 - d): ranks past k cannot move the result.
        k = min(n, math.ceil(math.log(_GWRP_TAIL * (1 - d)) / math.log(d)) + 1)
    if k < n:
        top = x.topk(k, dim=-1).values
    else:
        top = x.sort(dim=-1, descending=True).values
    return (top * w[:k]).sum(-1) / w.sum()


def _as_class_values(value, name, n_classes, like):
    """Float or 0-d/1-d per-class tensor -> float32 tensor on ``like``'s device."""
    if not torch.is_tensor(value):
        return torch.as_tensor(float(value), dtype=torch.float32, device=like.device)
    if value.dim() > 1 or (value.dim() == 1 and value.numel() not in (1, n_classes)):
        raise ValueError(
            f"{name} must be a float or a 1-D tensor with one value per class "
            f"(length {n_classes}); got a tensor of shape {tuple(value.shape)}"
        )
    return value.detach().to(device=like.device, dtype=torch.float32)


def _check_args(heatmap, mask, reduction, multiMask, alternativeCut, cut):
    if reduction not in ("none", "mean", "sum"):
        raise ValueError(f"reduction must be 'none', 'mean' or 'sum'; got {reduction!r}")
    if heatmap.dim() != 5:
        raise ValueError(
            "heatmap must be 5-D (batch x classes x channels x H x W); "
            f"got shape {tuple(heatmap.shape)}"
        )
    b, c, ch, h, w = heatmap.shape
    expected = (b, c, ch, h, w) if multiMask else (b, ch, h, w)
    layout = "batch x classes x channels x H x W" if multiMask else "batch x channels x H x W"
    # The mask may have a single channel, broadcast over the heatmap's channels
    # (the reference accepts this too).
    ok = mask.dim() == len(expected) and all(
        m == e or (i == len(expected) - 3 and m == 1) for i, (m, e) in enumerate(zip(mask.shape, expected))
    )
    if not ok:
        raise ValueError(
            f"mask must have shape {expected} ({layout}{', multiMask=True' if multiMask else ''}) "
            f"for a heatmap of shape {tuple(heatmap.shape)}; got {tuple(mask.shape)}"
        )
    if alternativeCut and torch.is_tensor(cut):
        raise ValueError("alternativeCut=True needs a float cut, not a per-class tensor")


def heatmap_loss(heatmap, mask, cut=1, cut2=25, reduction='mean', norm=True, A=1, B=3, E=1, d=0.9,
                 normRoI=True, var=False, alternativeCut=False, detachNorm=False, multiMask=False,
                 eps=1e-10):
    """ISNet heatmap loss (drop-in for ``LRPLossCEValleysGWRP``).

    Penalises relevance outside the foreground mask and keeps the total
    foreground relevance of each class between ``cut`` and ``cut2``.

    Args:
        heatmap: ``B x C x ch x H x W`` relevance, one map per class.
        mask: ``B x ch x H x W`` foreground mask (1 = foreground) shared by the
            classes, or ``B x C x ch x H x W`` when ``multiMask``. ``ch`` may be 1.
        cut, cut2: lower (C1) and upper (C2) bounds on the foreground relevance
            sum; floats or 1-D per-class tensors of length C.
        reduction: ``'mean'``, ``'sum'`` or ``'none'`` (one loss per image).
        norm: normalise the heatmap before the background term: by its standard
            deviation if ``var``, by its mean inside the mask if ``normRoI``,
            else by its mean. If False, the heatmap is scaled by ``ch*H*W``.
        A, B: weights (W1, W2) of the background and foreground terms.
        E: background activation constant, ``g / (g + E)``.
        d: GWRP decay; the background is pooled as ``sum d**i x_(i) / sum d**i``
            over its pixels in descending order.
        alternativeCut: apply ``cut`` to the sum over classes instead of per class.
        detachNorm: stop the gradient through the normalisation denominator.
        eps: numerical stabiliser.

    The loss is computed in float32 with autocast disabled, whatever the input
    dtype. NaN relevance is replaced by the batch's mean finite relevance inside
    the mask and +-inf by its largest finite value (no gradient flows there).

    As in the reference, a per-class tensor ``cut`` divides the per-image
    foreground loss by ``cut**2`` through plain broadcasting (image ``i`` by
    class ``i``'s value), which needs batch size == C or either equal to 1.
    """
    _check_args(heatmap, mask, reduction, multiMask, alternativeCut, cut)
    n_batch, n_classes, ch, hh, ww = heatmap.shape
    low = _as_class_values(cut, "cut", n_classes, heatmap)
    high = _as_class_values(cut2, "cut2", n_classes, heatmap)
    if low.numel() not in (1, n_batch) and n_batch != 1:
        raise ValueError(
            f"a per-class cut of length {low.numel()} rescales the per-image foreground loss "
            f"(batch size {n_batch}) by broadcasting, as the reference does; this needs "
            "batch size == number of classes or either equal to 1. Use a float cut instead."
        )

    with torch.autocast(device_type=heatmap.device.type, enabled=False):
        if not multiMask:  # a view; the batch-wide RoI mean below counts it once per class, as the reference
            mask = mask.unsqueeze(1).expand(-1, n_classes, -1, -1, -1)
        background = (1 - mask).float()
        mask = mask.float()
        h = heatmap.float().abs()

        # Replace non-finite relevance with detached constants: no host sync,
        # and (like nan_to_num) no gradient through the replaced entries.
        finite = torch.nan_to_num(h, nan=0.0, posinf=0.0, neginf=0.0)
        roi_mean = ((finite * mask).sum() / (mask.sum() + eps)).detach()
        h = torch.where(torch.isnan(h), roi_mean, torch.where(torch.isinf(h), finite.max().detach(), h))
        raw = h

        dims = (-3, -2, -1)
        if norm:
            if var:
                denom = torch.var(h, dim=dims, keepdim=True).sqrt()
            elif normRoI:
                denom = (h * mask).sum(dims, keepdim=True) / (mask.sum(dims, keepdim=True) + eps)
            else:
                denom = h.mean(dims, keepdim=True)
            if detachNorm:
                denom = denom.detach()
            h = h / (denom + eps)
        else:
            h = h * (ch * hh * ww)

        # Background: pooled relevance outside the mask per (image, class, channel),
        # squashed to [0, 1) and penalised with a cross-entropy towards 0.
        pooled = _gwrp((h * background).flatten(-2), d)
        act = torch.clamp(pooled / (pooled + E), max=1 - 1e-7)
        loss_bg = -torch.log(1 - act).mean(dim=(-2, -1))

        # Foreground: unnormalised relevance inside the mask, per (image, class),
        # pushed above cut and below cut2.
        fg = (raw * mask).sum(dims)
        if alternativeCut:
            total = fg.sum(-1)
            loss_fg = (torch.clamp(total, max=low.expand_as(total)) - low) ** 2
        else:
            low_t = low.expand_as(fg)
            loss_fg = ((torch.clamp(fg, max=low_t) - low_t) ** 2).mean(-1)
        high_t = high.expand_as(fg)
        loss_fg = loss_fg / low**2 + ((torch.clamp(fg, min=high_t) - high_t) ** 2).mean(-1) / low**2

        loss = A * loss_bg + B * loss_fg
        if reduction == "sum":
            return loss.sum()
        if reduction == "mean":
            return loss.mean()
        return loss
