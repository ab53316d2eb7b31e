"""IsDenseFast: the ISNet DenseNet with a fast, exact relevance pass."""

from __future__ import annotations

import math
import numbers
import os
from collections import OrderedDict
from typing import Mapping, Optional, Union

import torch
import torch.nn as nn

from . import torch_ops
from .forward import check_input, run_forward
from .output import check_classes, check_variant, classifier_input_relevance, explained_classes
from .relevance import relevance
from .structure import build_plan

BACKENDS = ("auto", "torch", "triton")


class IsDenseFast(nn.Module):
    """Drop-in for the original ``IsDense(DenseNet, e, heat, Zb)``, and the Faster ISNet variants.

    ``forward(x, classes=None)`` returns ``(y, R)``: logits ``B x K`` and heatmaps
    ``B x M x 3 x H x W``, by LRP with the epsilon rule (``e``) and, when ``Zb``, the z^B rule at
    the input; or only ``y`` when ``heat`` is false.

    Which quantity each map explains (``isnet_fast.output``):

    * ``explain="all"`` (default): one map per class (M = K), the original ISNet.
    * ``"top"`` / ``"lowest"``: one map (M = 1), the logit of argmax(y) / argmin(y).
    * ``"random"``: the Stochastic ISNet's draw, from ``generator`` (torch's default generator
      when None, so ``torch.manual_seed`` reproduces it).
    * ``"sum"``: one map, all logits together.
    * ``classes`` (a LongTensor, one index per image): one map per image for that class,
      whatever ``explain`` says (explaining labels, or replaying a draw).
    * ``selective=True``: the class-selective quantity instead of the logit (the Selective
      ISNet is ``selective=True, explain="lowest"``, as the authors' code runs it), with
      ``top``, ``lowest``, ``random``, ``all`` or ``classes``.

    The one-map variants start from the logits with the classifier's bias detached, as the
    authors' newer code does. ``e``, ``heat``, ``Zb``, ``explain``, ``selective``,
    ``check_finite`` and ``generator`` can be changed on the instance; ``e`` must be a finite
    number > 0 and the flags True or False, checked at construction and on every change (a
    refused change keeps the old value).

    ``check_finite`` (default True) makes ``forward`` reject a batch holding NaN or Inf pixels
    with a ValueError naming the first bad image, whether ``heat`` is on or not: in training one
    such image turns the whole batch's outputs and the BatchNorms' running statistics into NaN.
    The check costs one device sync per call; set it to False in loops where that matters.

    ``reference_pairing`` keeps the original's choice of consumers in dense blocks of ten or
    more layers (see ``isnet_fast.structure.consumer_pairs``); set it to False for the pairing
    the LRP rules describe. ``backend`` picks the kernels: "auto" (Triton on CUDA tensors, torch
    ops on the CPU), "triton" or "torch".

    With the torch ops on the CPU the network and the relevance pass run channels_last, where
    oneDNN's convolutions are fastest; the heatmaps come back contiguous, and the numbers are
    those of the usual layout up to float rounding in the convolutions' sums.
    """

    def __init__(self, DenseNet: nn.Module, e: float = 1e-2, heat: bool = True, Zb: bool = True,
                 explain: str = "all", selective: bool = False, reference_pairing: bool = True,
                 backend: str = "auto", generator: Optional[torch.Generator] = None, check_finite: bool = True):
        super().__init__()
        self.e = e  # the properties below check these
        self.heat = heat
        self.Zb = Zb
        self.check_finite = check_finite
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        plan = build_plan(DenseNet, reference_pairing)  # fail now, not at the first forward
        check_variant(explain, selective, plan.classifier.out_features)
        self.DenseNet = DenseNet
        self._explain = explain
        self._selective = selective
        self.reference_pairing = reference_pairing
        self.backend = backend
        self.generator = generator

    @property
    def e(self) -> float:
        """The epsilon rule's stabiliser, a finite number > 0."""
        return self._e

    @e.setter
    def e(self, value: float) -> None:
        check_e(value)
        self._e = float(value)

    @property
    def heat(self) -> bool:
        """Whether ``forward`` computes heatmaps (else it returns only the logits)."""
        return self._heat

    @heat.setter
    def heat(self, value: bool) -> None:
        check_flag("heat", value)
        self._heat = value

    @property
    def Zb(self) -> bool:
        """The z^B rule at the input (else the epsilon rule)."""
        return self._Zb

    @Zb.setter
    def Zb(self, value: bool) -> None:
        check_flag("Zb", value)
        self._Zb = value

    @property
    def check_finite(self) -> bool:
        """Whether ``forward`` rejects images holding NaN or Inf (one device sync per call)."""
        return self._check_finite

    @check_finite.setter
    def check_finite(self, value: bool) -> None:
        check_flag("check_finite", value)
        self._check_finite = value

    @property
    def explain(self) -> str:
        """Which logit or quantity the maps explain: "all", "top", "lowest", "random" or "sum"."""
        return self._explain

    @explain.setter
    def explain(self, value: str) -> None:
        check_variant(value, self._selective, self._num_classes())
        self._explain = value

    @property
    def selective(self) -> bool:
        """Explain the class-selective quantity instead of the logit."""
        return self._selective

    @selective.setter
    def selective(self, value: bool) -> None:
        check_variant(self._explain, value, self._num_classes())
        self._selective = value

    @property
    def maps_per_image(self) -> int:
        """M, the heatmaps each image gets without ``classes``: K for "all", else 1."""
        return self._num_classes() if self._explain == "all" else 1

    def _num_classes(self) -> int:
        return build_plan(self.DenseNet, self.reference_pairing).classifier.out_features

    def explained_classes(self, y: torch.Tensor, classes: Optional[torch.Tensor] = None) -> Optional[torch.Tensor]:
        """The class each image's one map explains for logits ``y`` (drawing for "random"), or
        None when there is a map per class ("all") or one for the sum of the logits ("sum")."""
        return explained_classes(y, self._explain, classes, self.generator)

    def forward(self, x: torch.Tensor, classes: Optional[torch.Tensor] = None):
        plan = build_plan(self.DenseNet, self.reference_pairing)
        check_input(x, plan, self._check_finite)
        num_classes = plan.classifier.out_features
        if classes is not None:
            check_classes(classes, x.shape[0], num_classes)
        if not self.heat:
            return self.DenseNet(x)
        ops = ops_for(self.backend, x)
        channels_last = ops is torch_ops and x.device.type == "cpu"
        if channels_last:
            # oneDNN's convolutions (the bulk of the work) run fastest with the channels last;
            # the torch ops keep every relevance tensor in that layout.
            x = x.contiguous(memory_format=torch.channels_last)
        acts = run_forward(plan, x)
        e = self._e
        explained = explained_classes(acts.y, self._explain, classes, self.generator)
        at_classifier_input = classifier_input_relevance(plan.classifier, acts.classifier_input, acts.y, e,
                                                         self._explain, self._selective, explained)
        heatmaps = relevance(plan, acts, e, self._Zb, ops, at_classifier_input)
        return acts.y, heatmaps.contiguous() if channels_last else heatmaps

    def load_state_dict(self, state_dict: Mapping[str, torch.Tensor], strict: bool = True, assign: bool = False):
        """Loads our checkpoints, the original IsDense's and its Lightning module's.

        Keys may carry a ``model.`` prefix (Lightning); the original's duplicate ``LRPBlock.*``
        entries (aliases of the DenseNet's own parameters) and a Lightning module's ``Cweight``
        are ignored.
        """
        cleaned = OrderedDict()
        for key, value in state_dict.items():
            if key.startswith("model."):
                key = key[len("model."):]
            if key.startswith("LRPBlock.") or ".LRPBlock." in key or key == "Cweight":
                continue  # aliases of the DenseNet's weights; the Lightning module's class weights
            cleaned[key] = value
        return super().load_state_dict(cleaned, strict=strict, assign=assign)

    @classmethod
    def from_checkpoint(cls, path: Union[str, os.PathLike], DenseNet: nn.Module, map_location="cpu", **kwargs):
        """Builds an IsDenseFast around ``DenseNet`` and loads a checkpoint file into it.

        Takes a bare state dict, or a dict holding one under ``state_dict`` (Lightning,
        ``torch.save({'state_dict': ...})``). Keyword arguments go to the constructor.
        """
        checkpoint = torch.load(path, map_location=map_location, weights_only=True)
        state_dict = checkpoint.get("state_dict", checkpoint) if isinstance(checkpoint, Mapping) else None
        if not isinstance(state_dict, Mapping):
            raise ValueError(f"{path} holds no state dict; expected a dict of tensors or {{'state_dict': ...}}")
        model = cls(DenseNet, **kwargs)
        model.load_state_dict(state_dict)
        return model


def _shown(value) -> str:
    """``repr(value)`` cut to one short line, for error messages."""
    text = " ".join(repr(value).split())
    return text if len(text) <= 40 else text[:37] + "..."


def check_e(e) -> None:
    """Raises unless ``e``, the epsilon rule's stabiliser, is a real number, finite and > 0."""
    if isinstance(e, bool) or not isinstance(e, numbers.Real):
        raise TypeError(f"e must be a number > 0 (the epsilon rule's stabiliser, e.g. e=1e-2), "
                        f"got {_shown(e)} of type {type(e).__name__}")
    if not math.isfinite(e) or e <= 0:
        raise ValueError(f"e must be a finite number > 0 (the epsilon rule's stabiliser, e.g. e=1e-2), got {e!r}"
                         + ("; e=0 divides by zero wherever a layer's output is 0" if e == 0 else ""))


def check_flag(name: str, value) -> None:
    """Raises unless ``value`` is True or False."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {_shown(value)} of type {type(value).__name__}")


def ops_for(backend: str, x: torch.Tensor):
    """The elementwise ops module for ``backend`` and the device of ``x``."""
    if backend == "torch" or (backend == "auto" and not x.is_cuda):
        return torch_ops
    if backend == "auto":
        try:
            from . import triton_ops
        except ImportError:  # no triton on this platform: the torch ops compute the same
            return torch_ops
        return triton_ops
    if not x.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError(
            "backend='triton' compiles its kernels for CUDA tensors; these are on the CPU. Use backend='torch' "
            "(or 'auto'), or run the kernels in Triton's interpreter by setting TRITON_INTERPRET=1 before "
            "importing isnet_fast (slow: for tests)")
    try:
        from . import triton_ops
    except ImportError as error:  # triton missing (not Linux, or not installed)
        raise RuntimeError(f"backend='triton' needs the triton package: {error}") from error
    return triton_ops
