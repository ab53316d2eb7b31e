"""Output relevance: which quantity each heatmap explains, taken back to the classifier's input.

This is the only place that sees the number of classes K. It returns the relevance at the
classifier's input, ``B x M x F`` (M maps per image), and the pass below it (pool, blocks,
stem) is the same for every variant: with one map per image every later tensor is
``B x 1 x ...``, so a step's cost does not grow with K.

The variants (``explain``, ``selective``, ``classes``), as ISNet's authors name them:

* Original ISNet, ``explain="all"``: one map per class, map c explains logit c (``M = K``).
* ``"top"`` / ``"lowest"``: one map, the logit of argmax(y) / argmin(y).
* Stochastic ISNet, ``"random"``: per batch a fair coin; heads, every image explains its top
  class; tails, every image a class drawn uniformly among its other classes.
* ``"sum"``: one map explaining the sum of all logits.
* ``classes``: one map per image explaining the given class (the authors' ``labelLogit``).
* Selective ISNet, ``selective=True``: the class-selective quantity instead of the logit (below),
  for ``top``, ``lowest``, ``random``, ``classes`` or ``all``.

Every variant but the original's ``all`` starts from the logits with the classifier's bias
detached (``z = W a + b.detach()``), as the authors' newer code does: those heatmaps carry no
gradient to the bias.

The class-selective quantity of class c: with ``Z[c'] = z[c] - z[c']`` (a linear map with
weights ``W[c] - W[c']`` and a detached bias), ``R[c'] = Z[c'] exp(-Z[c']) / S``, where
``S = sum_c'' exp(-Z[c'']) - 1`` stabilised by ``1e-5 * sign(S)``; these go back to the
classifier's input by the epsilon rule:
``R_a[j] = a[j] * sum_c' (W[c] - W[c'])[j] R[c'] / stab(Z[c'])``, O(K x F) per map.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn

from .torch_ops import stabilize

EXPLAIN_MODES = ("all", "top", "lowest", "random", "sum")
SELECTIVE_MODES = ("all", "top", "lowest", "random")
SELECTIVE_STABILIZER = 1e-5  # the authors' fixed stabiliser of the selective quantity's denominator
LOW_PRECISION = (torch.float16, torch.bfloat16)


def check_variant(explain: str, selective: bool, num_classes: int) -> None:
    """Raises a ValueError for a combination the output layer cannot explain."""
    if explain not in EXPLAIN_MODES:
        raise ValueError(f"explain must be one of {EXPLAIN_MODES}, got {explain!r}")
    if not isinstance(selective, bool):
        raise TypeError(f"selective must be True or False, got {selective!r}")
    if selective and explain == "sum":
        raise ValueError("selective=True explains one class per map and cannot explain the sum of the logits; "
                         f"use explain='sum' with selective=False, or one of {SELECTIVE_MODES}")
    if num_classes < 2 and (selective or explain == "random"):
        what = "selective=True" if selective else "explain='random'"
        raise ValueError(f"{what} needs at least two classes; this classifier has {num_classes}")


def check_classes(classes: torch.Tensor, batch: int, num_classes: int) -> None:
    """Raises for ``classes`` that are not one class index in [0, K) per image (the range check,
    a host sync, is left out inside ``torch.compile``)."""
    if not isinstance(classes, torch.Tensor):
        raise TypeError(f"classes must be a LongTensor with one class index per image, got {type(classes).__name__}")
    if classes.dtype.is_floating_point or classes.dtype.is_complex or classes.dtype == torch.bool:
        raise TypeError(f"classes must hold integer class indices (a LongTensor), got {classes.dtype}; "
                        "use classes.long() on indices, or labels.argmax(1) on one-hot labels")
    if classes.shape != (batch,):
        raise ValueError(f"classes must have shape ({batch},), one class index per image, "
                         f"got {tuple(classes.shape)}")
    if batch and not torch.compiler.is_compiling() and bool(((classes < 0) | (classes >= num_classes)).any()):
        raise ValueError(f"classes must lie in [0, {num_classes}) for a classifier with {num_classes} classes; "
                         f"got values from {int(classes.min())} to {int(classes.max())}")


def stochastic_classes(y: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """The Stochastic ISNet's draw: a fair coin per batch; heads, each image's top class; tails,
    each image a class drawn uniformly among its other K - 1 classes.

    Draws from ``generator`` (torch's default generator when None, so ``torch.manual_seed``
    reproduces it), on the generator's device; the result is on ``y``'s device.
    """
    batch, num_classes = y.shape
    device = generator.device if generator is not None else torch.device("cpu")
    top = y.detach().argmax(dim=1)
    heads = (torch.rand((), generator=generator, device=device) < 0.5).to(y.device)
    # Uniform over the K - 1 other classes: draw in [0, K - 1) and skip the top class.
    other = torch.randint(0, num_classes - 1, (batch,), generator=generator, device=device).to(y.device)
    other = other + (other >= top).long()
    # Both sides are drawn and one is kept: no host sync, and torch.compile traces it in one graph.
    return torch.where(heads, top, other)


def explained_classes(y: torch.Tensor, explain: str, classes: Optional[torch.Tensor] = None,
                      generator: Optional[torch.Generator] = None) -> Optional[torch.Tensor]:
    """The class each image's one map explains (``B``), or None for ``all`` and ``sum``."""
    if classes is not None:
        return classes.to(y.device)
    if explain == "top":
        return y.detach().argmax(dim=1)
    if explain == "lowest":
        return y.detach().argmin(dim=1)
    if explain == "random":
        return stochastic_classes(y, generator)
    return None


def classifier_input_relevance(linear: nn.Linear, a: torch.Tensor, y: torch.Tensor, e: float, explain: str,
                               selective: bool, classes: Optional[torch.Tensor],
                               bias_detached_in_all: bool = False) -> torch.Tensor:
    """Relevance at the classifier's input ``a`` (``B x F``, after any dropout), ``B x M x F``.

    ``classes`` (``B``) picks each image's one map; None means ``explain`` is ``all`` or ``sum``.
    ``bias_detached_in_all``: the original's one map per class also starts from the logits with
    the bias detached (the authors' ResNet code does; their DenseNet's starts from y).
    Under autocast it computes in float32 (it is O(B x M x K x F), nothing per pixel): the
    selective quantity's exponentials and the stabilised divisions need the precision.
    """
    if a.dtype in LOW_PRECISION or y.dtype in LOW_PRECISION:
        with torch.autocast(a.device.type, enabled=False):
            return classifier_input_relevance(_Float32Linear(linear), a.float(), y.float(), e, explain,
                                              selective, classes, bias_detached_in_all)
    weight = linear.weight  # K x F
    if not selective and explain == "all" and classes is None:
        # The original ISNet: map c starts from y_c, over a denominator with the bias detached.
        z = y if linear.bias is None else y + (linear.bias.detach() - linear.bias)
        ratio = (z if bias_detached_in_all else y) / stabilize(z, e)  # B x K
        return a.unsqueeze(1) * weight.unsqueeze(0) * ratio.unsqueeze(-1)
    z = y if linear.bias is None else y + (linear.bias.detach() - linear.bias)  # the logits, bias detached
    if selective:
        return _selective_relevance(weight, a, z, e, classes)
    if classes is None:  # "sum": every logit in one map
        return (a * ((z / stabilize(z, e)) @ weight)).unsqueeze(1)
    zc = z.gather(1, classes.unsqueeze(1))  # B x 1
    return (a * weight[classes] * (zc / stabilize(zc, e))).unsqueeze(1)


def _selective_relevance(weight, a, z, e, classes):
    """The class-selective quantity's relevance at ``a``: one map per image for ``classes``
    (``B``), or one per class when ``classes`` is None."""
    batch, num_classes = z.shape
    if classes is None:
        explained = torch.arange(num_classes, device=z.device).expand(batch, num_classes)  # B x M, M = K
    else:
        explained = classes.unsqueeze(1)  # B x 1
    zc = z.gather(1, explained)  # B x M
    contrast = zc.unsqueeze(-1) - z.unsqueeze(1)  # Z: B x M x K, exactly 0 at c' = c
    # Z exp(-Z) / stab(S) with S = sum exp(-Z) - 1, all scaled by exp(-m), m = max(-Z) >= 0 (as
    # in a log-sum-exp): the same value, finite however far apart the logits are (exp(-Z) alone
    # overflows float32 once a logit is 88 above the explained one, e.g. argmin's).
    shift = (-contrast).amax(dim=-1, keepdim=True).detach()
    exp_neg = torch.exp(-contrast - shift)
    floor = torch.exp(-shift)  # the removed c' = c term, exp(0), scaled
    total = exp_neg.sum(dim=-1, keepdim=True) - floor
    sign = (total.detach() >= 0).to(total.dtype) * 2 - 1
    quantity = contrast * exp_neg / (total + SELECTIVE_STABILIZER * floor * sign)
    ratio = quantity / stabilize(contrast, e)  # B x M x K
    # sum_c' (W[c] - W[c']) ratio[c'] without a B x M x K x F difference tensor
    back = weight[explained] * ratio.sum(dim=-1, keepdim=True) - ratio @ weight  # B x M x F
    return a.unsqueeze(1) * back


class _Float32Linear:
    """The classifier's weight and bias in float32 (a view for a float32 classifier), for autocast."""

    def __init__(self, linear: nn.Linear):
        self.weight = linear.weight.float()
        self.bias = None if linear.bias is None else linear.bias.float()
