"""IsResNetFast: the ISNet ResNet (the authors' ``LRPResNet``) with a fast, exact relevance pass.

It takes the settings, variants and checks of ``IsDenseFast`` (reusing its validation functions)
around a ResNet in torchvision's layout (``isnet_fast.resnet``). IsDenseFast is left as it is:
sharing its class would mean reshaping it while others build on it; the two keep the same
arguments and messages by calling the same checks.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from typing import List, Mapping, Optional, Union

import torch
import torch.nn as nn

from . import torch_ops
from .model import BACKENDS, StateDictMismatchError, check_e, check_flag, load_checkpoint_file, ops_for
from .output import check_classes, check_variant, classifier_input_relevance, explained_classes
from .resnet_plan import build_resnet_plan
from .resnet_relevance import check_resnet_input, resnet_relevance, run_resnet_forward


class IsResNetFast(nn.Module):
    """Drop-in for the authors' ``LRPResNet(network, heat, e, Zb, rule='e', ...)``.

    ``forward(x, classes=None)`` returns ``(y, R)``: logits ``B x K`` and heatmaps
    ``B x M x 3 x H x W`` by LRP with the epsilon rule (``e``) and, when ``Zb``, the z^B rule at
    the input; or only ``y`` when ``heat`` is false. The variants are IsDenseFast's (``explain``
    "all", "top", "lowest", "random", "sum"; ``selective``; ``classes``); the authors'
    ``multiple=True`` is ``explain="all"``, their Selective ISNet ``selective=True,
    explain="lowest"``, ``highest=True`` is ``explain="top"``. Unlike the DenseNet's original, every
    variant here, ``"all"`` included, starts from the logits with the classifier's bias detached,
    as the authors' ResNet code does: the heatmaps carry no gradient to ``fc``'s bias.

    ``reference_quirks`` (default True) keeps the authors' max-pool un-pooling, where the last
    pooled position (raster order) that chose a pixel takes all its relevance; False sums them, as
    the LRP rules read (with ``Zb=False`` and a tiny ``e`` the maps then approach gradient x input).
    ``backend``: "auto" (Triton on CUDA tensors, torch ops on the CPU), "triton" or "torch".
    ``e``, ``heat``, ``Zb``, ``explain``, ``selective``, ``check_finite``, ``reference_quirks`` and
    ``generator`` can be changed on the instance, checked as IsDenseFast checks them.
    """

    def __init__(self, resnet: nn.Module, e: float = 1e-2, heat: bool = True, Zb: bool = True,
                 explain: str = "all", selective: bool = False, backend: str = "auto",
                 generator: Optional[torch.Generator] = None, check_finite: bool = True,
                 reference_quirks: bool = True):
        super().__init__()
        self.e = e  # the properties below check these
        self.heat = heat
        self.Zb = Zb
        self.check_finite = check_finite
        self.reference_quirks = reference_quirks
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        plan = build_resnet_plan(resnet)  # fail now, not at the first forward
        check_variant(explain, selective, plan.classifier.out_features)
        self.resnet = resnet  # the authors' LRPResNet's name, so its state dicts' keys match
        self._explain = explain
        self._selective = selective
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
    def reference_quirks(self) -> bool:
        """The authors' overwriting max-pool un-pooling (else the summing one of the LRP rules)."""
        return self._reference_quirks

    @reference_quirks.setter
    def reference_quirks(self, value: bool) -> None:
        check_flag("reference_quirks", value)
        self._reference_quirks = value

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
        return build_resnet_plan(self.resnet).classifier.out_features

    def explained_classes(self, y: torch.Tensor, classes: Optional[torch.Tensor] = None) -> Optional[torch.Tensor]:
        """The class each image's one map explains for logits ``y`` (drawing for "random"), or
        None when there is a map per class ("all") or one for the sum of the logits ("sum")."""
        return explained_classes(y, self._explain, classes, self.generator)

    def forward(self, x: torch.Tensor, classes: Optional[torch.Tensor] = None):
        plan = build_resnet_plan(self.resnet)
        check_resnet_input(x, plan, self._check_finite)
        if classes is not None:
            check_classes(classes, x.shape[0], plan.classifier.out_features)
        if not self.heat:
            return self.resnet(x)
        ops = ops_for(self.backend, x)
        channels_last = ops is torch_ops and x.device.type == "cpu"
        if channels_last:  # oneDNN's convolutions run fastest so; the torch ops keep that layout
            x = x.contiguous(memory_format=torch.channels_last)
        acts = run_resnet_forward(plan, x)
        e = self._e
        explained = explained_classes(acts.y, self._explain, classes, self.generator)
        at_classifier_input = classifier_input_relevance(plan.classifier, acts.classifier_input, acts.y, e,
                                                         self._explain, self._selective, explained,
                                                         bias_detached_in_all=True)
        heatmaps = resnet_relevance(plan, acts, e, self._Zb, at_classifier_input, ops,
                                    overwrite_unpool=self._reference_quirks)
        return acts.y, heatmaps.contiguous() if channels_last else heatmaps

    def load_state_dict(self, state_dict: Mapping[str, torch.Tensor], strict: bool = True, assign: bool = False):
        """Loads our checkpoints, the authors' LRPResNet's and its Lightning module's.

        Keys may carry a ``model.`` prefix (Lightning); the LRP block's duplicate ``LRPBlock.*``
        entries (aliases of the ResNet's own parameters) and a Lightning module's ``Cweight`` are
        ignored. A state dict that does not fit raises :class:`StateDictMismatchError` in a few
        lines naming the first keys that differ.
        """
        cleaned = OrderedDict()
        for key, value in state_dict.items():
            if key.startswith("model."):
                key = key[len("model."):]
            if key.startswith("LRPBlock.") or ".LRPBlock." in key or key == "Cweight":
                continue
            cleaned[key] = value
        problem = resnet_state_dict_mismatch(self, cleaned, strict)
        if problem:
            raise StateDictMismatchError(problem)
        return super().load_state_dict(cleaned, strict=strict, assign=assign)

    @classmethod
    def from_checkpoint(cls, path: Union[str, os.PathLike], resnet: nn.Module, map_location="cpu", **kwargs):
        """Builds an IsResNetFast around ``resnet`` and loads a checkpoint file into it (a bare
        state dict, or a dict holding one under ``state_dict``). Keyword arguments go to the
        constructor; a broken file raises a ValueError naming it (``model.load_checkpoint_file``)."""
        checkpoint = load_checkpoint_file(path, map_location=map_location)
        state_dict = checkpoint.get("state_dict", checkpoint) if isinstance(checkpoint, Mapping) else None
        if not isinstance(state_dict, Mapping):
            raise ValueError(f"{path} holds no state dict; expected a dict of tensors or {{'state_dict': ...}}")
        model = cls(resnet, **kwargs)
        model.load_state_dict(state_dict)
        return model


def resnet_state_dict_mismatch(model: nn.Module, state_dict: Mapping[str, object],
                               strict: bool = True) -> Optional[str]:
    """Why ``state_dict`` does not fit ``model`` (an IsResNetFast), in a few lines; None when it fits."""
    expected = model.state_dict(keep_vars=True)
    prefix = "resnet."
    if state_dict and not any(str(key).startswith(prefix) for key in state_dict) and \
            any(f"{prefix}{key}" in expected for key in state_dict):
        return ("the state dict does not fit the model: its keys lack the 'resnet.' prefix; for a bare ResNet's "
                "state dict use model.resnet.load_state_dict(state_dict)")
    missing = [key for key in expected if key not in state_dict and not key.endswith("num_batches_tracked")]
    unexpected = [key for key in state_dict if key not in expected]
    if not strict:
        missing, unexpected = [], []
    reshaped = []
    for key, param in expected.items():
        value = state_dict.get(key)
        if value is None:
            continue
        if not torch.is_tensor(value):
            reshaped.append(f"{_short(key)} is a {type(value).__name__}, not a tensor")
        elif value.shape != param.shape and not (param.dim() == 0 and tuple(value.shape) == (1,)):
            reshaped.append(f"{_short(key)} {tuple(value.shape)} vs the model's {tuple(param.shape)}")
    if not (missing or unexpected or reshaped):
        return None
    lines = ["the state dict does not fit the model (another ResNet depth, width or number of classes?)"]
    parts = [f"{len(keys)} {what} key{'s' if len(keys) > 1 else ''} ({_first_two(keys)})"
             for what, keys in (("missing", missing), ("unexpected", unexpected)) if keys]
    if parts:
        lines.append("; ".join(parts))
    if reshaped:
        more = f" (and {len(reshaped) - 1} more)" if len(reshaped) > 1 else ""
        lines.append(f"size mismatch: {reshaped[0]}{more}")
    return "\n".join(lines)


def _short(key) -> str:
    key = str(key)
    return key[len("resnet."):] if key.startswith("resnet.") else key


def _first_two(keys: List[str]) -> str:
    return ", ".join(_short(key) for key in keys[:2]) + (", ..." if len(keys) > 2 else "")
