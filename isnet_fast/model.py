"""IsDenseFast: the ISNet DenseNet with a fast, exact relevance pass."""

from __future__ import annotations

import os
from collections import OrderedDict
from typing import Mapping, Union

import torch
import torch.nn as nn

from . import torch_ops
from .forward import check_input, run_forward
from .relevance import relevance
from .structure import build_plan

BACKENDS = ("auto", "torch", "triton")


class IsDenseFast(nn.Module):
    """Drop-in for the original ``IsDense(DenseNet, e, heat, Zb)``.

    ``forward(x)`` returns ``(y, R)``: logits ``B x C`` and heatmaps ``B x C x 3 x H x W``, one
    per class, by LRP with the epsilon rule (``e``) and, when ``Zb``, the z^B rule at the input;
    or only ``y`` when ``heat`` is false. ``e`` and ``heat`` can be changed on the instance.

    ``reference_pairing`` keeps the original's choice of consumers in dense blocks of ten or
    more layers (see ``isnet_fast.structure.consumer_pairs``); set it to False for the pairing
    the LRP rules describe. ``backend`` picks the kernels: "auto" (Triton on CUDA tensors, torch
    ops on the CPU), "triton" or "torch".

    With the torch ops on the CPU the network and the relevance pass run channels_last, where
    oneDNN's convolutions are fastest; the heatmaps come back contiguous, and the numbers are
    those of the usual layout up to float rounding in the convolutions' sums.
    """

    def __init__(self, DenseNet: nn.Module, e: float = 1e-2, heat: bool = True, Zb: bool = True,
                 reference_pairing: bool = True, backend: str = "auto"):
        super().__init__()
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        build_plan(DenseNet, reference_pairing)  # fail now, not at the first forward
        self.DenseNet = DenseNet
        self.e = e
        self.heat = heat
        self.Zb = Zb
        self.reference_pairing = reference_pairing
        self.backend = backend

    def forward(self, x: torch.Tensor):
        plan = build_plan(self.DenseNet, self.reference_pairing)
        check_input(x, plan)
        if not self.heat:
            return self.DenseNet(x)
        ops = ops_for(self.backend, x)
        channels_last = ops is torch_ops and x.device.type == "cpu"
        if channels_last:
            # oneDNN's convolutions (the bulk of the work) run fastest with the channels last;
            # the torch ops keep every relevance tensor in that layout.
            x = x.contiguous(memory_format=torch.channels_last)
        acts = run_forward(plan, x)
        heatmaps = relevance(plan, acts, float(self.e), bool(self.Zb), ops)
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
