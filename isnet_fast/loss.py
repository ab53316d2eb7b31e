"""ISNet heatmap (background-relevance) loss.

A vectorised re-implementation of ISNet's ``LRPLossCEValleysGWRP``: same
arguments, same defaults and the same numbers, without prints and with one
host sync (the checks of the mask's values and of the heatmap's finiteness).
Arguments the original silently turns into NaN or a constant without gradient
(``cut <= 0``, ``E <= 0``, ``d`` outside (0, 1], all-NaN heatmaps) raise
instead. It also takes the options of the authors' newer loss
(``code/ISNetFunctionsZe.py``): ``alternativeForeground``, string ``norm``
values and masks of another size than the heatmap.
"""

import math
import numbers

import torch
import torch.nn.functional as F

__all__ = ["NonFiniteHeatmapError", "heatmap_loss"]


class NonFiniteHeatmapError(ValueError):
    """The heatmaps hold no finite value at all (every entry NaN or Inf): there is nothing to train on."""

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


_FOREGROUNDS = ("L2", "L1", "hybrid")
_NORMS = ("absRoIMean", "RoIMean", "none")


def _foreground_mode(value):
    """``alternativeForeground`` -> 'L2', 'L1' or 'hybrid' (bools as the newer reference)."""
    if isinstance(value, bool):
        return "L1" if value else "L2"
    if isinstance(value, str) and value in _FOREGROUNDS:
        return value
    raise ValueError(
        "alternativeForeground must be 'L2', 'L1' or 'hybrid' (or a bool: True = 'L1', "
        f"False = 'L2'); got {value!r}"
    )


def _norm_mode(norm, var, normRoI):
    """``norm`` (+ the original's ``var`` / ``normRoI``) -> one normalisation name."""
    if isinstance(norm, str):
        if norm not in _NORMS:
            raise ValueError(f"norm must be a bool or one of 'absRoIMean', 'RoIMean', 'none'; got {norm!r}")
        if norm != "none" and (var or not normRoI):
            raise ValueError(
                f"var and normRoI only choose the normalisation for norm=True; norm={norm!r} names "
                "its own, so leave var=False and normRoI=True (or pass norm=True)"
            )
        return norm
    if not norm:
        return "none"
    if var:
        return "var"
    return "absRoIMean" if normRoI else "mean"


def _prepare_mask(mask, heatmap):
    """Float32 binary mask at the heatmap's H x W (resized as the newer reference), and a 0-d bool
    tensor that is False when the mask holds other values than 0 and 1 (None when not checked)."""
    hh, ww = heatmap.shape[-2:]
    if mask.shape[-2:] != (hh, ww):
        # Adaptive average pooling to H x W, then any foreground in a cell makes it foreground.
        lead, (mh, mw) = mask.shape[:-2], mask.shape[-2:]
        pooled = F.adaptive_avg_pool2d(mask.float().reshape(-1, mh, mw), (hh, ww))
        return (pooled != 0).float().reshape(*lead, hh, ww), None
    if mask.dtype == torch.bool:
        return mask.float(), None
    mask = mask.float()
    return mask, ((mask == 0) | (mask == 1)).all()


def _binary_mask_error(mask):
    bad = mask[(mask != 0) & (mask != 1)][0].item()
    return ValueError(
        f"mask must hold only 0 (background) and 1 (foreground); found {bad:g}.\n"
        "For a 0/255 mask divide it by 255, for a soft mask threshold it (e.g. (mask > 0.5).float())."
    )


_MEANINGS = {
    "cut": "the lower bound C1 on each class's foreground relevance, which also scales the foreground loss "
           "(1/cut**2): it must be finite and > 0, e.g. cut=1",
    "cut2": "the upper bound C2 on each class's foreground relevance: it must be finite and > 0, e.g. cut2=25",
    "E": "the background activation's constant, g / (g + E): it must be finite and > 0, e.g. E=1",
}


def _check_number(name, value):
    """Raises unless a float argument is finite and > 0; tensors are checked with the one host sync."""
    if torch.is_tensor(value):
        return
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        per_class = " or a 1-D per-class tensor (torch.tensor([...]))" if name != "E" else ""
        raise TypeError(f"{name} must be a number{per_class}, got {type(value).__name__}")
    if not value > 0 or math.isinf(value):
        raise ValueError(f"{name}={value!r}: {_MEANINGS[name]}")


def _check_decay(d):
    if isinstance(d, bool) or not isinstance(d, numbers.Real):
        raise TypeError(f"d must be a number in (0, 1], got {type(d).__name__}")
    if not 0 < d <= 1:
        raise ValueError(
            f"d={d!r}: the GWRP decay must be in (0, 1] (d=1 is the plain mean of the background, smaller d "
            "weighs its largest relevance more; d > 1 overflows to NaN)"
        )


def _cut_order_error(low, high):
    return ValueError(
        f"cut2 must be >= cut, the foreground relevance range [cut, cut2] is empty: got cut={_values(low)}, "
        f"cut2={_values(high)}"
    )


def _values(t):
    """A per-class tensor or a float, short, for messages."""
    values = t.flatten().tolist()
    text = ", ".join(f"{v:g}" for v in values[:4]) + (", ..." if len(values) > 4 else "")
    return text if len(values) == 1 else f"[{text}]"


def _check_args(heatmap, mask, reduction, multiMask, alternativeCut, cut):
    for name, value in (("heatmap", heatmap), ("mask", mask)):
        if not torch.is_tensor(value):
            kind = f"{type(value).__module__}.{type(value).__name__}"
            raise TypeError(
                f"{name} must be a torch tensor, got {kind}; convert a numpy array with "
                f"torch.from_numpy({name}) (and move it to the heatmap's device)"
            )
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
    # (the reference accepts this too), and another H x W (it is then resized).
    ok = mask.dim() == len(expected) and all(
        m == e or (i == len(expected) - 3 and m == 1) or (i >= len(expected) - 2 and m > 0)
        for i, (m, e) in enumerate(zip(mask.shape, expected))
    )
    if not ok:
        raise ValueError(
            f"mask must have shape {expected} ({layout}{', multiMask=True' if multiMask else ''}; "
            f"channels may be 1, H x W may differ) for a heatmap of shape {tuple(heatmap.shape)}; "
            f"got {tuple(mask.shape)}"
        )
    if alternativeCut and torch.is_tensor(cut):
        raise ValueError("alternativeCut=True needs a float cut, not a per-class tensor")


def heatmap_loss(heatmap, mask, cut=1, cut2=25, reduction='mean', norm=True, A=1, B=3, E=1, d=0.9,
                 normRoI=True, var=False, alternativeCut=False, detachNorm=False, multiMask=False,
                 eps=1e-10, alternativeForeground='L2'):
    """ISNet heatmap loss (drop-in for ``LRPLossCEValleysGWRP``).

    Penalises relevance outside the foreground mask and keeps the total
    foreground relevance of each class between ``cut`` and ``cut2``.

    Args:
        heatmap: ``B x C x ch x H x W`` relevance, one map per class.
        mask: ``B x ch x h x w`` foreground mask (1 = foreground, 0 = background)
            shared by the classes, or ``B x C x ch x h x w`` when ``multiMask``.
            ``ch`` may be 1. A torch tensor (a numpy array raises TypeError: pass
            ``torch.from_numpy(mask)``) of any real dtype or bool, holding only 0
            and 1 (anything else raises ValueError). If ``h x w`` differs from the
            heatmap's ``H x W`` the mask is resized as in the newer reference:
            adaptive average pooling to ``H x W``, then every nonzero cell becomes
            1 (any foreground in a cell keeps it foreground; a resized mask is not
            checked for 0/1 values, it is binarised).
        cut, cut2: lower (C1) and upper (C2) bounds on the foreground relevance
            sum; floats or 1-D per-class tensors of length C.
        reduction: ``'mean'``, ``'sum'`` or ``'none'`` (one loss per image).
        norm: normalisation of the heatmap before the background term.

            * ``True`` (the original's): by its standard deviation if ``var``, by
              its mean inside the mask if ``normRoI``, else by its mean; of the
              absolute relevance.
            * ``'absRoIMean'`` (newer reference): absolute value, then divide by
              its mean inside the mask; the same as ``True`` with the default
              ``var=False, normRoI=True``.
            * ``'RoIMean'`` (newer reference): divide the *signed* heatmap by its
              signed mean inside the mask, then take the absolute value.
            * ``False`` or ``'none'``: no normalisation; the absolute heatmap is
              scaled by ``ch*H*W``.

            ``var`` and ``normRoI`` only apply to ``norm=True``; a string norm
            other than ``'none'`` with ``var=True`` or ``normRoI=False`` raises
            ValueError. An unknown string raises ValueError.
        A, B: weights (W1, W2) of the background and foreground terms.
        E: background activation constant, ``g / (g + E)``.
        d: GWRP decay; the background is pooled as ``sum d**i x_(i) / sum d**i``
            over its pixels in descending order.
        normRoI, var: see ``norm``.
        alternativeCut: apply ``cut`` to the sum over classes instead of per class.
        detachNorm: stop the gradient through the normalisation denominator
            (for every ``norm`` but ``'none'``).
        multiMask: one mask per class (``B x C x ch x h x w``).
        eps: numerical stabiliser.
        alternativeForeground: upper side of the foreground term, per class, with
            ``F`` the class's absolute foreground relevance sum (newer reference):

            * ``'L2'`` (default, the original's): ``(max(F, cut2) - cut2)**2 / cut**2``.
            * ``'L1'``: ``|max(F, cut2) - cut2|``, not divided by ``cut``.
            * ``'hybrid'`` (the Faster ISNet paper): ``|F - (cut + cut2)| + 1``
              (not divided by ``cut``) where ``F > cut + cut2`` (compared without
              gradient), else the ``'L2'`` term; the two meet at 1.

            ``True`` means ``'L1'`` and ``False`` ``'L2'`` (the newer reference's
            backward compatibility). The lower side ``(min(F, cut) - cut)**2 / cut**2``
            is the same for all three; both sides are averaged over the classes.

    The loss is computed in float32 with autocast disabled, whatever the input
    dtype. NaN relevance is replaced by the batch's mean finite relevance inside
    the mask and +-inf by its largest finite value (no gradient flows there); with
    ``norm='RoIMean'`` the replacements are signed, as in the newer reference (NaN
    by the signed mean inside the mask, +inf by the largest and -inf by the
    smallest finite value).

    Checks: ``cut``, ``cut2`` and ``E`` must be > 0 and ``d`` in (0, 1] (``d=1``
    pools the background by its plain mean), and ``cut2 >= cut`` (per class;
    not with ``alternativeCut``, whose ``cut`` bounds the sum over classes),
    else ValueError naming the argument. Heatmaps without a single finite value
    (all NaN or Inf, e.g. from a diverged model) raise
    :class:`NonFiniteHeatmapError` (a ValueError): there the replacements above
    would give a constant loss without gradient. Partly non-finite heatmaps
    are replaced as described. The checks of tensor values (the mask's 0/1
    values, the heatmap's finiteness, per-class ``cut``/``cut2``/``E``) share
    one host sync.

    As in the original, a per-class tensor ``cut`` with ``alternativeForeground='L2'``
    divides the per-image foreground loss by ``cut**2`` through plain broadcasting
    (image ``i`` by class ``i``'s value), which needs batch size == C or either
    equal to 1. With ``'L1'`` and ``'hybrid'`` (newer reference only) each class's
    terms are divided by its own ``cut``, as that reference does.

    A single-channel mask counts once, not once per heatmap channel, in the means
    inside the mask (normalisation and NaN replacement), as in the original; the
    newer reference repeats it over the channels first.
    """
    _check_args(heatmap, mask, reduction, multiMask, alternativeCut, cut)
    for name, value in (("cut", cut), ("cut2", cut2), ("E", E)):
        _check_number(name, value)
    _check_decay(d)
    foreground = _foreground_mode(alternativeForeground)
    norm_mode = _norm_mode(norm, var, normRoI)
    n_batch, n_classes, ch, hh, ww = heatmap.shape
    low = _as_class_values(cut, "cut", n_classes, heatmap)
    high = _as_class_values(cut2, "cut2", n_classes, heatmap)
    if foreground == "L2" and low.numel() not in (1, n_batch) and n_batch != 1:
        raise ValueError(
            f"a per-class cut of length {low.numel()} rescales the per-image foreground loss "
            f"(batch size {n_batch}) by broadcasting, as the reference does; this needs "
            "batch size == number of classes or either equal to 1. Use a float cut instead."
        )

    with torch.autocast(device_type=heatmap.device.type, enabled=False):
        original_mask = mask
        mask, binary = _prepare_mask(mask, heatmap)
        # Every check of tensor values in one host sync; the messages are built on the error path only.
        checks = {"finite": torch.isfinite(heatmap).any()}
        if binary is not None:
            checks["binary"] = binary
        tensors = {"cut": low if torch.is_tensor(cut) else None, "cut2": high if torch.is_tensor(cut2) else None,
                   "E": E.detach().to(heatmap.device) if torch.is_tensor(E) else None}
        for name, value in tensors.items():
            if value is not None:
                checks[name] = ((value > 0) & torch.isfinite(value)).all()
        if not alternativeCut:
            if tensors["cut"] is not None or tensors["cut2"] is not None:
                checks["order"] = (high >= low).all()
            elif cut2 < cut:
                raise _cut_order_error(low, high)
        flags = torch.stack([flag.to(heatmap.device) for flag in checks.values()])
        passed = dict(zip(checks, flags.tolist()))  # the one host sync
        if not all(passed.values()):
            if not passed.get("binary", True):
                raise _binary_mask_error(original_mask.float())
            for name, value in tensors.items():
                if not passed.get(name, True):
                    bad = value[~((value > 0) & torch.isfinite(value))].flatten()[0].item()
                    raise ValueError(f"{name} holds {bad:g}: {_MEANINGS[name]}"
                                     + (" (for every class)" if name != "E" else ""))
            if not passed.get("order", True):
                raise _cut_order_error(low, high)
            raise NonFiniteHeatmapError(
                f"the heatmaps hold no finite value (all {heatmap.numel()} entries are NaN or Inf): the model's "
                "relevance pass diverged, usually with its weights (too high a learning rate?) or its inputs; "
                "check them for NaN"
            )
        if not multiMask:  # a view; the batch-wide RoI mean below counts it once per class, as the reference
            mask = mask.unsqueeze(1).expand(-1, n_classes, -1, -1, -1)
        background = 1 - mask
        dims = (-3, -2, -1)

        # Replace non-finite relevance with detached constants: no host sync,
        # and (like nan_to_num) no gradient through the replaced entries.
        if norm_mode == "RoIMean":
            signed = heatmap.float()
            finite = torch.nan_to_num(signed, nan=0.0, posinf=0.0, neginf=0.0)
            roi_mean = ((finite * mask).sum() / (mask.sum() + eps)).detach()
            signed = torch.where(
                torch.isnan(signed),
                roi_mean,
                torch.where(
                    signed == math.inf,
                    finite.max().detach(),
                    torch.where(signed == -math.inf, finite.min().detach(), signed),
                ),
            )
            h = signed.abs()
        else:
            h = heatmap.float().abs()
            finite = torch.nan_to_num(h, nan=0.0, posinf=0.0, neginf=0.0)
            roi_mean = ((finite * mask).sum() / (mask.sum() + eps)).detach()
            h = torch.where(torch.isnan(h), roi_mean, torch.where(torch.isinf(h), finite.max().detach(), h))
        raw = h

        if norm_mode == "none":
            h = h * (ch * hh * ww)
        else:
            source = signed if norm_mode == "RoIMean" else h
            if norm_mode == "var":
                denom = torch.var(h, dim=dims, keepdim=True).sqrt()
            elif norm_mode == "mean":
                denom = h.mean(dims, keepdim=True)
            else:  # absRoIMean, RoIMean: mean inside the mask
                denom = (source * mask).sum(dims, keepdim=True) / (mask.sum(dims, keepdim=True) + eps)
            if detachNorm:
                denom = denom.detach()
            h = source / (denom + eps)
            if norm_mode == "RoIMean":
                h = h.abs()

        # Background: pooled relevance outside the mask per (image, class, channel),
        # squashed to [0, 1) and penalised with a cross-entropy towards 0.
        pooled = _gwrp((h * background).flatten(-2), d)
        act = torch.clamp(pooled / (pooled + E), max=1 - 1e-7)
        loss_bg = -torch.log(1 - act).mean(dim=(-2, -1))

        # Foreground: unnormalised relevance inside the mask, per (image, class),
        # pushed above cut and below cut2.
        fg = (raw * mask).sum(dims)
        low_t = low.expand_as(fg)
        high_t = high.expand_as(fg)
        if foreground == "L2":
            # The original: per-image sums divided by cut**2 (a per-class cut broadcasts against the batch).
            if alternativeCut:
                total = fg.sum(-1)
                loss_fg = (torch.clamp(total, max=low.expand_as(total)) - low) ** 2
            else:
                loss_fg = ((torch.clamp(fg, max=low_t) - low_t) ** 2).mean(-1)
            loss_fg = loss_fg / low**2 + ((torch.clamp(fg, min=high_t) - high_t) ** 2).mean(-1) / low**2
        else:
            # The newer reference: each class's squared terms divided by its own cut**2.
            if alternativeCut:
                total = fg.sum(-1)
                lower = (torch.clamp(total, max=low.expand_as(total)) - low) ** 2 / low**2
            else:
                lower = ((torch.clamp(fg, max=low_t) - low_t) ** 2 / low_t**2).mean(-1)
            if foreground == "L1":
                upper = (torch.clamp(fg, min=high_t) - high_t).abs()
            else:  # hybrid
                top = low_t + high_t
                square = (torch.clamp(fg, min=high_t) - high_t) ** 2 / low_t**2
                upper = torch.where(fg.detach() > top, (fg - top).abs() + 1, square)
            loss_fg = lower + upper.mean(-1)

        loss = A * loss_bg + B * loss_fg
        if reduction == "sum":
            return loss.sum()
        if reduction == "mean":
            return loss.mean()
        return loss
