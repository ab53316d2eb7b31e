"""IsDenseFast: the ISNet DenseNet with a fast, exact relevance pass."""

from __future__ import annotations

import contextlib
import math
import numbers
import os
import pickle
import re
import zipfile
from collections import OrderedDict
from typing import Any, List, Mapping, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn

from .engine import torch_ops
from .engine.densenet.forward import check_input, run_forward
from .engine.output import check_classes, check_variant, classifier_input_relevance, explained_classes
from .engine.densenet.relevance import relevance
from .engine.densenet.plan import build_plan

BACKENDS = ("auto", "torch", "triton")
DENSENET_PREFIX = "DenseNet."  # IsDenseFast's state-dict keys: the wrapped network's, prefixed


class ISNetFast(nn.Module):
    """What IsDenseFast and IsResNetFast share: the settings and their checks, the variants,
    ``forward`` and checkpoint loading. A subclass says where its network sits
    (``network_attribute``: the references' names, so their state dicts' keys match), reads it
    into a plan (``_read_plan``) and supplies its architecture's steps: the input check, the
    forward pass keeping the activations, the relevance pass below the classifier, and why a
    state dict does not fit.
    """

    network_attribute: str  # set by each subclass
    bias_detached_in_all = False  # explain="all" from the logits with the classifier's bias detached

    def _configure(self, network: nn.Module, e: float, heat: bool, Zb: bool, explain: str, selective: bool,
                   backend: str, generator: Optional[torch.Generator], check_finite: bool) -> None:
        self.e = e  # the properties below check these
        self.heat = heat
        self.Zb = Zb
        self.check_finite = check_finite
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        plan = self._read_plan(network)  # fail now, not at the first forward
        check_variant(explain, selective, plan.classifier.out_features)
        setattr(self, self.network_attribute, network)
        self._explain = explain
        self._selective = selective
        self.backend = backend
        self.generator = generator

    @property
    def network(self) -> nn.Module:
        """The wrapped classifier (``DenseNet`` or ``resnet``, as the references name it)."""
        return getattr(self, self.network_attribute)

    # The architecture's steps
    def _read_plan(self, network: nn.Module):
        raise NotImplementedError

    def _check_input(self, x: torch.Tensor, plan) -> None:
        raise NotImplementedError

    def _forward_pass(self, plan, x: torch.Tensor):
        raise NotImplementedError

    def _relevance(self, plan, acts, at_classifier_input: torch.Tensor, ops) -> torch.Tensor:
        raise NotImplementedError

    def _state_dict_mismatch(self, state_dict: Mapping[str, Any], strict: bool) -> Optional[str]:
        raise NotImplementedError

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
        return self._read_plan(self.network).classifier.out_features

    def explained_classes(self, y: torch.Tensor, classes: Optional[torch.Tensor] = None) -> Optional[torch.Tensor]:
        """The class each image's one map explains for logits ``y`` (drawing for "random"), or
        None when there is a map per class ("all") or one for the sum of the logits ("sum")."""
        return explained_classes(y, self._explain, classes, self.generator)

    def forward(self, x: torch.Tensor, classes: Optional[torch.Tensor] = None):
        plan = self._read_plan(self.network)
        self._check_input(x, plan)
        if classes is not None:
            check_classes(classes, x.shape[0], plan.classifier.out_features)
        if not self.heat:
            return self.network(x)
        ops = ops_for(self.backend, x)
        channels_last = ops is torch_ops and x.device.type == "cpu"
        if channels_last:
            # oneDNN's convolutions (the bulk of the work) run fastest with the channels last;
            # the torch ops keep every relevance tensor in that layout.
            x = x.contiguous(memory_format=torch.channels_last)
        acts = self._forward_pass(plan, x)
        explained = explained_classes(acts.y, self._explain, classes, self.generator)
        at_classifier_input = classifier_input_relevance(plan.classifier, acts.classifier_input, acts.y, self._e,
                                                         self._explain, self._selective, explained,
                                                         bias_detached_in_all=self.bias_detached_in_all)
        heatmaps = self._relevance(plan, acts, at_classifier_input, ops)
        return acts.y, heatmaps.contiguous() if channels_last else heatmaps

    def load_state_dict(self, state_dict: Mapping[str, torch.Tensor], strict: bool = True, assign: bool = False):
        """Loads our checkpoints, the references' (IsDense, LRPResNet) and their Lightning modules'.

        Keys may carry a ``model.`` prefix (Lightning); the references' duplicate ``LRPBlock.*``
        entries (aliases of the network's own parameters) and a Lightning module's ``Cweight``
        are ignored. A state dict that does not fit (another architecture, another number of
        classes) raises :class:`StateDictMismatchError` (a RuntimeError, as torch's, and a
        ValueError) in a few lines: both architectures, and the first keys that differ.
        """
        cleaned = OrderedDict()
        for key, value in state_dict.items():
            if key.startswith("model."):
                key = key[len("model."):]
            if key.startswith("LRPBlock.") or ".LRPBlock." in key or key == "Cweight":
                continue  # aliases of the network's weights; the Lightning module's class weights
            cleaned[key] = value
        problem = self._state_dict_mismatch(cleaned, strict)
        if problem:
            raise StateDictMismatchError(problem)
        return super().load_state_dict(cleaned, strict=strict, assign=assign)


    @classmethod
    def _from_checkpoint(cls, path: Union[str, os.PathLike], network: nn.Module, map_location, kwargs):
        checkpoint = load_checkpoint_file(path, map_location=map_location)
        state_dict = checkpoint.get("state_dict", checkpoint) if isinstance(checkpoint, Mapping) else None
        if not isinstance(state_dict, Mapping):
            raise ValueError(f"{path} holds no state dict; expected a dict of tensors or {{'state_dict': ...}}")
        model = cls(network, **kwargs)
        model.load_state_dict(state_dict)
        return model


class IsDenseFast(ISNetFast):
    """Drop-in for the original ``IsDense(DenseNet, e, heat, Zb)``, and the Faster ISNet variants.

    ``forward(x, classes=None)`` returns ``(y, R)``: logits ``B x K`` and heatmaps
    ``B x M x 3 x H x W``, by LRP with the epsilon rule (``e``) and, when ``Zb``, the z^B rule at
    the input; or only ``y`` when ``heat`` is false.

    Which quantity each map explains (``isnet_fast.engine.output``):

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

    ``reference_quirks`` (default True) keeps the two places where the original's heatmaps
    differ from LRP as written: the choice of consumers in dense blocks of ten or more layers
    (see ``isnet_fast.engine.densenet.plan.consumer_pairs``), and the max-pool un-pooling, where the pooled
    positions that chose the same pixel overwrite each other (the last in raster order wins)
    instead of adding up. ``reference_quirks=False`` gives the rules as written: every consumer
    paired, the un-pooling summing (deterministic on both backends). Then, in eval mode with
    ``Zb=False`` and ``e`` -> 0, the maps of ``explain="all"`` summed over the classes equal
    gradient x input. ``reference_pairing`` names the first quirk alone (its older name):
    None (default) follows ``reference_quirks``; ``reference_pairing=False`` fixes only the
    pairing (the un-pooling still overwrites); ``reference_quirks=False`` with
    ``reference_pairing=True`` is refused. Both can be changed on the instance; setting
    ``reference_quirks`` sets the pairing with it. ``backend`` picks the kernels: "auto" (Triton
    on CUDA tensors, torch ops on the CPU), "triton" or "torch".

    With the torch ops on the CPU the network and the relevance pass run channels_last, where
    oneDNN's convolutions are fastest; the heatmaps come back contiguous, and the numbers are
    those of the usual layout up to float rounding in the convolutions' sums.
    """


    network_attribute = "DenseNet"  # the original IsDense's name

    def __init__(self, DenseNet: nn.Module, e: float = 1e-2, heat: bool = True, Zb: bool = True,
                 explain: str = "all", selective: bool = False, reference_pairing: Optional[bool] = None,
                 backend: str = "auto", generator: Optional[torch.Generator] = None, check_finite: bool = True,
                 reference_quirks: bool = True):
        super().__init__()
        self._reference_quirks, self._reference_pairing = resolve_reference_quirks(reference_quirks,
                                                                                   reference_pairing)
        self._configure(DenseNet, e, heat, Zb, explain, selective, backend, generator, check_finite)

    @property
    def reference_quirks(self) -> bool:
        """The original's max-pool un-pooling (overwriting), and its dense pairing unless
        ``reference_pairing`` was set to False; False: the LRP rules as written."""
        return self._reference_quirks

    @reference_quirks.setter
    def reference_quirks(self, value: bool) -> None:
        self._reference_quirks, self._reference_pairing = resolve_reference_quirks(value, None)

    @property
    def reference_pairing(self) -> bool:
        """The original's choice of consumers in dense blocks of ten or more layers."""
        return self._reference_pairing

    @reference_pairing.setter
    def reference_pairing(self, value: bool) -> None:
        self._reference_quirks, self._reference_pairing = resolve_reference_quirks(self._reference_quirks, value)

    def _read_plan(self, network: nn.Module):
        return build_plan(network, self._reference_pairing)

    def _check_input(self, x: torch.Tensor, plan) -> None:
        check_input(x, plan, self._check_finite)

    def _forward_pass(self, plan, x: torch.Tensor):
        return run_forward(plan, x)

    def _relevance(self, plan, acts, at_classifier_input: torch.Tensor, ops) -> torch.Tensor:
        return relevance(plan, acts, self._e, self._Zb, ops, at_classifier_input,
                         overwrite_unpool=self._reference_quirks)

    def _state_dict_mismatch(self, state_dict: Mapping[str, Any], strict: bool) -> Optional[str]:
        return state_dict_mismatch(self, state_dict, strict)

    @classmethod
    def from_checkpoint(cls, path: Union[str, os.PathLike], DenseNet: nn.Module, map_location="cpu", **kwargs):
        """Builds an IsDenseFast around ``DenseNet`` and loads a checkpoint file into it.

        Takes a bare state dict, or a dict holding one under ``state_dict`` (Lightning,
        ``torch.save({'state_dict': ...})``). Keyword arguments go to the constructor. A file
        that is empty, truncated or no torch checkpoint raises a ValueError naming it
        (:func:`load_checkpoint_file`).
        """
        return cls._from_checkpoint(path, DenseNet, map_location, kwargs)


class StateDictMismatchError(RuntimeError, ValueError):
    """A state dict that does not fit the model: another architecture, or another number of classes.

    A RuntimeError, as torch's own ``load_state_dict`` error, and a ValueError (bad input).
    """


_ZIP_MAGIC = b"PK\x03\x04"  # torch.save's format: a zip archive
_PICKLE_MAGIC = b"\x80"  # torch's legacy format (and plain pickles): pickle protocol 2 or later


def load_checkpoint_file(path, map_location="cpu") -> Any:
    """``torch.load(path, map_location, weights_only=True)``, with errors that say what is wrong with the file.

    A file that is empty, truncated, no torch checkpoint at all, or holds Python objects other
    than tensors and plain data (which ``weights_only=True`` refuses on purpose: loading them
    can run code) raises a ValueError naming the file, in one line. A missing file raises
    FileNotFoundError, as ``open`` does.
    """
    name = os.fspath(path) if isinstance(path, (str, os.PathLike)) else "the checkpoint"
    head, size = _file_head(path)
    if size == 0:
        raise ValueError(f"{name} is empty (0 bytes), not a torch checkpoint: was its writing interrupted? "
                         "Use a complete copy")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:  # torch raises many kinds for a broken or foreign file
        problem = _load_problem(path, name, head, error)
        if problem is None:
            raise
        raise ValueError(problem) from None


def _file_head(path, n: int = 16):
    """The first ``n`` bytes of a file (path or seekable file object) and its size; (None, None) if unknown."""
    if isinstance(path, (str, os.PathLike)):
        with open(path, "rb") as file:  # FileNotFoundError, IsADirectoryError, PermissionError: clear as they are
            return file.read(n), os.fstat(file.fileno()).st_size
    try:
        position = path.tell()
        head = path.read(n)
        end = path.seek(0, os.SEEK_END)
        path.seek(position)
        return head, end - position
    except (AttributeError, OSError, ValueError):
        return None, None


def _zip_intact(path) -> bool:
    """Whether a zip archive's central directory, at its end, can be read (it cannot when truncated)."""
    position = None if isinstance(path, (str, os.PathLike)) else path.tell()
    try:
        if position is not None:
            path.seek(position)
        zipfile.ZipFile(path).close()
        return True
    except (zipfile.BadZipFile, OSError, EOFError, ValueError):
        return False
    finally:
        if position is not None:
            with contextlib.suppress(OSError, ValueError):
                path.seek(position)


def _unsafe_global(error: BaseException) -> Optional[str]:
    """The global a weights-only unpickler refused ('posix.system'), or None."""
    for candidate in (error, error.__context__, error.__cause__):
        if candidate is not None:
            match = re.search(r"GLOBAL ([\w.]+)", str(candidate))
            if match:
                return match.group(1)
    return None


def _load_problem(path, name: str, head: Optional[bytes], error: BaseException) -> Optional[str]:
    """What is wrong with a file ``torch.load`` failed on, in one line; None for errors that are not the file's."""
    intact = "Use a complete copy, or save it again"
    if head is not None and head.startswith(_ZIP_MAGIC):
        if not _zip_intact(path):
            return f"{name} is truncated or corrupt (an incomplete zip archive: was its writing interrupted?). " \
                   f"{intact}"
        refused = _unsafe_global(error)
        if refused is not None:
            return (f"{name} holds Python objects other than tensors and plain data ({refused}), which are not "
                    "loaded: unpickling them could run code. Save a state dict (model.state_dict()) instead")
        if "TorchScript" in str(error):
            return (f"{name} is a TorchScript archive (torch.jit.save), not a checkpoint of tensors: load it with "
                    "torch.jit.load, or save the model's state_dict() instead")
        if isinstance(error, (pickle.UnpicklingError, EOFError)):
            return f"{name} is corrupt: its pickled data cannot be read ({type(error).__name__}). {intact}"
        if "weights_only" in str(error):  # torch's advice to turn the safety off is not passed on
            return f"{name} cannot be loaded safely (as tensors and plain data only): {type(error).__name__}"
        return None  # not the file's fault (a map_location torch cannot use, ...): torch's error says it
    if head is not None and head.startswith(_PICKLE_MAGIC):  # torch's legacy format
        refused = _unsafe_global(error)
        what = f" or holds Python objects other than tensors and plain data ({refused})" if refused else ""
        return (f"{name} (a legacy-format torch file or a pickle) is truncated or corrupt{what}; it cannot be "
                f"loaded safely. {intact}")
    if head is not None:
        return (f"{name} is not a torch checkpoint: torch.save writes a zip archive (starting b'PK'), this file "
                f"starts with {head[:12]!r}")
    refused = _unsafe_global(error)
    if refused is not None:
        return f"{name} holds Python objects other than tensors and plain data ({refused}), which are not loaded"
    text = str(error).strip().splitlines()
    return f"cannot read {name}: {text[0][:150] if text else type(error).__name__}"


def state_dict_mismatch(model: nn.Module, state_dict: Mapping[str, Any], strict: bool = True) -> Optional[str]:
    """Why ``state_dict`` does not fit ``model``, in a few short lines; None when it fits.

    The keys ``model.load_state_dict(state_dict, strict)`` would refuse (missing or unexpected
    ones when ``strict``, and any of another shape), counted, with the first two of each, and
    the architecture each side looks like.
    """
    expected = model.state_dict(keep_vars=True)
    missing, unexpected, reshaped = key_mismatches(expected, state_dict, strict, DENSENET_PREFIX)
    if not (missing or unexpected or reshaped):
        return None
    ours = {key: tuple(value.shape) for key, value in expected.items() if torch.is_tensor(value)}
    theirs = {key: tuple(value.shape) for key, value in state_dict.items() if torch.is_tensor(value)}
    lines = [f"the state dict does not fit the model: it looks like {_architecture(theirs)}; "
             f"the model is {_architecture(ours, model=True)}"]
    if any(key.startswith(DENSENET_PREFIX) for key in expected) and state_dict and \
            not any(str(key).startswith(DENSENET_PREFIX) for key in state_dict):
        lines.append("its keys lack the 'DenseNet.' prefix: for a bare DenseNet's state dict use "
                     "model.DenseNet.load_state_dict(state_dict)")
        return "\n".join(lines)
    classifier = [item for item in reshaped if item.startswith("classifier.")]  # the likeliest reason: shown first
    return "\n".join(lines + mismatch_lines(missing, unexpected, reshaped, DENSENET_PREFIX, first=classifier[:1]))


def key_mismatches(expected: Mapping[str, Any], state_dict: Mapping[str, Any], strict: bool,
                   prefix: str) -> Tuple[List[str], List[str], List[str]]:
    """The missing and unexpected keys (none unless ``strict``) and a line per value of another
    shape or no tensor at all, keys shown without the wrapper's ``prefix``."""
    missing = [key for key in expected if key not in state_dict and not key.endswith("num_batches_tracked")]
    unexpected = [key for key in state_dict if key not in expected]
    if not strict:
        missing, unexpected = [], []
    reshaped = []
    for key, param in expected.items():
        if key not in state_dict or isinstance(param, nn.parameter.UninitializedParameter):
            continue
        value = state_dict[key]
        if not torch.is_tensor(value):
            reshaped.append(f"{_short(key, prefix)} is a {type(value).__name__}, not a tensor")
        elif value.shape != param.shape and not (param.dim() == 0 and tuple(value.shape) == (1,)):
            reshaped.append(f"{_short(key, prefix)} {tuple(value.shape)} vs the model's {tuple(param.shape)}")
    return missing, unexpected, reshaped


def mismatch_lines(missing: List[str], unexpected: List[str], reshaped: List[str], prefix: str,
                   first: Sequence[str] = ()) -> List[str]:
    """The counted keys, the first two of each, and one size mismatch (``first``'s if given) and how many more."""
    lines = []
    parts = [f"{len(keys)} {what} key{'s' if len(keys) > 1 else ''} ({_first_two(keys, prefix)})"
             for what, keys in (("missing", missing), ("unexpected", unexpected)) if keys]
    if parts:
        lines.append("; ".join(parts))
    if reshaped:
        more = f" (and {len(reshaped) - 1} more)" if len(reshaped) > 1 else ""
        lines.append(f"size mismatch: {(list(first) or reshaped)[0]}{more}")
    return lines


def _short(key, prefix: str = DENSENET_PREFIX) -> str:
    """A key without the wrapper's prefix ('DenseNet.', 'resnet.'), for messages."""
    key = str(key)
    return key[len(prefix):] if key.startswith(prefix) else key


def _first_two(keys: List[str], prefix: str = DENSENET_PREFIX) -> str:
    return ", ".join(_short(key, prefix) for key in keys[:2]) + (", ..." if len(keys) > 2 else "")


def _architecture(shapes: Mapping[str, tuple], model: bool = False) -> str:
    """'DenseNet blocks 6-12-24-16, growth 32, classifier 1000x1024', read from the keys' shapes."""
    keys = {_short(key): shape for key, shape in shapes.items()}
    blocks = []
    while f"features.denseblock{len(blocks) + 1}.denselayer1.conv2.weight" in keys:
        block = f"features.denseblock{len(blocks) + 1}"
        layers = 1
        while f"{block}.denselayer{layers + 1}.conv2.weight" in keys:
            layers += 1
        blocks.append(layers)
    classifier = keys.get("classifier.weight", keys.get("classifier.1.weight"))
    if not blocks:
        return ("no DenseNet" if model else "no DenseNet (no features.denseblock1.denselayer1.conv2.weight)") + \
            (f", classifier {classifier[0]}x{classifier[1]}" if classifier and len(classifier) == 2 else "")
    growth = keys["features.denseblock1.denselayer1.conv2.weight"][0]
    text = f"{'' if model else 'DenseNet '}blocks {'-'.join(map(str, blocks))}, growth {growth}"
    if classifier is not None and len(classifier) == 2:
        text += f", classifier {classifier[0]}x{classifier[1]}"
    return text


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


def resolve_reference_quirks(reference_quirks: bool, reference_pairing: Optional[bool]):
    """``(reference_quirks, reference_pairing)`` as ``IsDenseFast`` keeps them: the pairing
    follows the quirks unless given; False alone fixes only the pairing. Raises for
    ``reference_quirks=False`` with ``reference_pairing=True``, which contradict each other."""
    check_flag("reference_quirks", reference_quirks)
    if reference_pairing is None:
        return reference_quirks, reference_quirks
    check_flag("reference_pairing", reference_pairing)
    if reference_pairing and not reference_quirks:
        raise ValueError("reference_quirks=False gives the LRP rules as written, which pair every dense consumer, "
                         "but reference_pairing=True asks for the original's pairing: give reference_quirks=False "
                         "alone for the rules as written, or reference_quirks=True for the original's numbers "
                         "(reference_pairing=False then fixes only the pairing)")
    return reference_quirks, reference_pairing


def ops_for(backend: str, x: torch.Tensor):
    """The elementwise ops module for ``backend`` and the device of ``x``."""
    if backend == "torch" or (backend == "auto" and not x.is_cuda):
        return torch_ops
    if backend == "auto":
        try:
            from .engine import triton_ops
        except ImportError:  # no triton on this platform: the torch ops compute the same
            return torch_ops
        return triton_ops
    if not x.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError(
            "backend='triton' compiles its kernels for CUDA tensors; these are on the CPU. Use backend='torch' "
            "(or 'auto'), or run the kernels in Triton's interpreter by setting TRITON_INTERPRET=1 before "
            "importing isnet_fast (slow: for tests)")
    try:
        from .engine import triton_ops
    except ImportError as error:  # triton missing (not Linux, or not installed)
        raise RuntimeError(f"backend='triton' needs the triton package: {error}") from error
    return triton_ops
