"""IsResNetFast: the ISNet ResNet (the authors' ``LRPResNet``) with a fast, exact relevance pass.

The settings, variants, ``forward`` and checkpoint loading are IsDenseFast's (their shared base,
``model.ISNetFast``); around a ResNet in torchvision's layout (``isnet_fast.models.resnet``) this
adds the ResNet's steps (``isnet_fast.engine.resnet``).
"""

from __future__ import annotations

import os
from typing import Mapping, Optional, Union

import torch
import torch.nn as nn

from .model import ISNetFast, check_flag, key_mismatches, mismatch_lines
from .engine.resnet.plan import build_resnet_plan
from .engine.resnet.relevance import check_resnet_input, resnet_relevance, run_resnet_forward

RESNET_PREFIX = "resnet."  # IsResNetFast's state-dict keys: the wrapped network's, prefixed


class IsResNetFast(ISNetFast):
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

    network_attribute = "resnet"  # the authors' LRPResNet's name, so its state dicts' keys match
    bias_detached_in_all = True  # the authors' ResNet code detaches it in every variant

    def __init__(self, resnet: nn.Module, e: float = 1e-2, heat: bool = True, Zb: bool = True,
                 explain: str = "all", selective: bool = False, backend: str = "auto",
                 generator: Optional[torch.Generator] = None, check_finite: bool = True,
                 reference_quirks: bool = True):
        super().__init__()
        self.reference_quirks = reference_quirks
        self._configure(resnet, e, heat, Zb, explain, selective, backend, generator, check_finite)

    @property
    def reference_quirks(self) -> bool:
        """The authors' overwriting max-pool un-pooling (else the summing one of the LRP rules)."""
        return self._reference_quirks

    @reference_quirks.setter
    def reference_quirks(self, value: bool) -> None:
        check_flag("reference_quirks", value)
        self._reference_quirks = value

    def _read_plan(self, network: nn.Module):
        return build_resnet_plan(network)

    def _check_input(self, x: torch.Tensor, plan) -> None:
        check_resnet_input(x, plan, self._check_finite)

    def _forward_pass(self, plan, x: torch.Tensor):
        return run_resnet_forward(plan, x)

    def _relevance(self, plan, acts, at_classifier_input: torch.Tensor, ops) -> torch.Tensor:
        return resnet_relevance(plan, acts, self._e, self._Zb, at_classifier_input, ops,
                                overwrite_unpool=self._reference_quirks)

    def _state_dict_mismatch(self, state_dict: Mapping[str, object], strict: bool) -> Optional[str]:
        return resnet_state_dict_mismatch(self, state_dict, strict)

    @classmethod
    def from_checkpoint(cls, path: Union[str, os.PathLike], resnet: nn.Module, map_location="cpu", **kwargs):
        """Builds an IsResNetFast around ``resnet`` and loads a checkpoint file into it (a bare
        state dict, or a dict holding one under ``state_dict``). Keyword arguments go to the
        constructor; a broken file raises a ValueError naming it (``model.load_checkpoint_file``)."""
        return cls._from_checkpoint(path, resnet, map_location, kwargs)


def resnet_state_dict_mismatch(model: nn.Module, state_dict: Mapping[str, object],
                               strict: bool = True) -> Optional[str]:
    """Why ``state_dict`` does not fit ``model`` (an IsResNetFast), in a few lines; None when it fits."""
    expected = model.state_dict(keep_vars=True)
    if state_dict and not any(str(key).startswith(RESNET_PREFIX) for key in state_dict) and \
            any(f"{RESNET_PREFIX}{key}" in expected for key in state_dict):
        return ("the state dict does not fit the model: its keys lack the 'resnet.' prefix; for a bare ResNet's "
                "state dict use model.resnet.load_state_dict(state_dict)")
    missing, unexpected, reshaped = key_mismatches(expected, state_dict, strict, RESNET_PREFIX)
    if not (missing or unexpected or reshaped):
        return None
    lines = ["the state dict does not fit the model (another ResNet depth, width or number of classes?)"]
    return "\n".join(lines + mismatch_lines(missing, unexpected, reshaped, RESNET_PREFIX))
