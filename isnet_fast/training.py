"""Training helpers: ISNet's compound loss, a training loop, atomic checkpoints and resume.

The loss is the original's ``(1 - P) * classification + P * heatmap_loss``. ``P = 0`` trains a
plain classifier (an ``IsDenseFast`` then runs with ``heat=False``, so no heatmaps are made).
Gradients are clipped to norm 1, as the original recommends.

Every ISNet variant trains here: the variant is the ``IsDenseFast``'s own setting
(``explain``, ``selective``): the Original ISNet (``explain="all"``, one map per class), the
Selective ISNet (``selective=True, explain="lowest"``), the Stochastic ISNet
(``explain="random"``), or any other combination the model accepts. ``TrainConfig.explain_labels``
explains each image's label instead (``model(x, classes=labels)``). The heatmap loss takes the
one map of the one-map variants (``B x 1 x 3 x H x W``) with the same masks.

A checkpoint is a dict that ``torch.load(..., weights_only=True)`` reads, so
``IsDenseFast.from_checkpoint`` loads its weights directly (key ``state_dict``). It also holds
the optimizer, the completed epoch, the RNG states, the per-epoch history, the training
settings, the DenseNet's configuration (``densenet_config``; a ResNet's: ``resnet_config``), the
IsDenseFast's LRP settings (``isdensefast``, an IsResNetFast's too: e, Zb, reference_pairing (the
DenseNet only), reference_quirks, explain, selective) and the training image size, from which
:func:`load_model` and ``isnet-fast explain`` rebuild the model. A ResNet trains as a DenseNet
does: pass an ``IsResNetFast`` (or, for ``P = 0``, a bare ResNet) instead. A resumed run takes the
variant (explain, selective) from the checkpoint; checkpoints written before the variants existed
read as the Original ISNet (``explain="all"``, ``selective=False``).

Nothing fails silently: a step whose loss, heatmaps or gradients are not finite stops training
with a :class:`NonFiniteError` (the checkpoint of the last complete epoch stays as it was), or is
skipped with ``TrainConfig(skip_nonfinite=True)``; weights that went non-finite are never saved.
A resume refuses a checkpoint of another run (optimizer and its settings, batch size, data), and
a checkpoint file that is empty, truncated or no torch checkpoint raises a ValueError naming it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import os
import re
import sys
import time
import uuid
import warnings
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from .architectures import ISNET_MODELS, build_resnet, is_resnet, resnet_config
from .models.densenet import DenseNet
from .loss import NonFiniteHeatmapError, heatmap_loss
from .model import IsDenseFast, load_checkpoint_file
from .resnet_model import IsResNetFast

__all__ = [
    "CHECKPOINT_FORMAT",
    "NonFiniteError",
    "TrainConfig",
    "build_densenet",
    "classification_loss",
    "compound_loss",
    "densenet_config",
    "evaluate",
    "isdensefast_settings",
    "load_checkpoint",
    "load_model",
    "resnet_config",
    "save_checkpoint",
    "scheduled_lr",
    "train",
]

CHECKPOINT_FORMAT = "isnet-fast-training-v1"
OPTIMIZERS = ("sgd", "adam")
LR_SCHEDULES = ("constant", "cosine")
PathLike = Union[str, os.PathLike]


class NonFiniteError(RuntimeError):
    """Training went non-finite: the loss, the heatmaps or the gradients of a step (or the weights
    after an epoch) hold NaN or Inf.

    ``epoch`` and ``step`` are 1-based; ``what`` is "loss", "heatmaps", "gradients" or "weights".
    Raised before the optimizer step (or, for the weights, before the checkpoint is written), so
    the checkpoint of the last complete epoch is left as it was.
    """

    def __init__(self, message: str, epoch: int, step: int, what: str):
        super().__init__(message)
        self.epoch, self.step, self.what = epoch, step, what


@dataclasses.dataclass
class TrainConfig:
    """Settings of :func:`train`.

    Args:
        epochs: epochs to reach in total (a resumed run continues up to this number).
        batch_size: images per optimizer step.
        P: weight of the heatmap loss, ``(1 - P) * classification + P * heatmap``; 0 for a
            plain classifier.
        optimizer: "sgd" (with ``momentum``) or "adam".
        lr, momentum, weight_decay: the optimizer's settings.
        lr_schedule: "constant", or "cosine": the learning rate falls from ``lr`` to 0 along a
            half cosine over all the steps of ``epochs`` (it settles the weights, and with them
            the BatchNorm running statistics that evaluation uses).
        clip_norm: gradient norm clipping (the original recommends 1); None or 0 to turn it off.
        multilabel: binary cross-entropy with logits on ``B x C`` 0/1 targets instead of the
            cross-entropy on class indices.
        heatmap_loss_kwargs: keyword arguments of :func:`isnet_fast.heatmap_loss` (cut, cut2, A,
            B, E, d, norm, alternativeForeground, ...), passed through unchanged.
        explain_labels: the heatmaps explain each image's label (``model(x, classes=labels)``,
            one map per image, the authors' ``labelLogit``) instead of what the IsDenseFast's
            ``explain``/``selective`` select. Single-label only: with ``multilabel`` there is no
            one class per image, and the config raises a ValueError.
        seed: seeds the order of the batches. Dropout draws from torch's global generator:
            seed it (``torch.manual_seed``) for a reproducible run.
        progress: a progress bar (tqdm, to stderr) or, without tqdm, a line every
            ``log_every`` batches; False for silence.
        skip_nonfinite: a step whose loss, heatmaps or gradients are not finite is skipped (no
            optimizer step; the BatchNorm running statistics are put back as they were before
            it) and counted in the epoch's ``skipped_steps``, instead of stopping training with a
            :class:`NonFiniteError`. An epoch of nothing but such steps still stops it.
    """

    epochs: int = 10
    batch_size: int = 32
    P: float = 0.7
    optimizer: str = "sgd"
    lr: float = 1e-3
    momentum: float = 0.9
    weight_decay: float = 0.0
    lr_schedule: str = "constant"
    clip_norm: Optional[float] = 1.0
    multilabel: bool = False
    heatmap_loss_kwargs: Dict[str, Any] = dataclasses.field(default_factory=dict)
    seed: int = 0
    progress: bool = True
    log_every: int = 20
    explain_labels: bool = False
    skip_nonfinite: bool = False

    def __post_init__(self):
        if not 0 <= self.P <= 1:
            raise ValueError(f"P must be in [0, 1], got {self.P}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"lr_schedule must be one of {LR_SCHEDULES}, got {self.lr_schedule!r}")
        if self.epochs < 0 or self.batch_size < 1:
            raise ValueError(f"need epochs >= 0 and batch_size >= 1, got {self.epochs} and {self.batch_size}")
        if self.explain_labels and self.multilabel:
            raise ValueError("explain_labels explains one class per image, its label; multilabel targets name "
                             "several or none. Leave explain_labels off (the IsDenseFast's explain setting then "
                             "picks the maps), or pass single-label class indices")


# ----------------------------------------------------------------------------- loss


def classification_loss(logits: torch.Tensor, labels: torch.Tensor, multilabel: bool = False) -> torch.Tensor:
    """Cross-entropy on class indices, or BCE with logits on ``B x C`` targets when ``multilabel``."""
    if multilabel:
        return F.binary_cross_entropy_with_logits(logits, labels.to(logits.dtype))
    return F.cross_entropy(logits, labels)


def compound_loss(logits: torch.Tensor, heatmaps: Optional[torch.Tensor], labels: torch.Tensor,
                  masks: Optional[torch.Tensor], P: float, multilabel: bool = False,
                  **heatmap_loss_kwargs) -> Dict[str, torch.Tensor]:
    """ISNet's loss ``(1 - P) * classification + P * heatmap_loss(heatmaps, masks, **kwargs)``.

    Returns ``{"loss", "classification", "heatmap"}``. With ``P == 0`` the heatmaps and masks
    may be None and the heatmap term is 0 (not computed).
    """
    classification = classification_loss(logits, labels, multilabel)
    if P == 0:
        return {"loss": classification, "classification": classification,
                "heatmap": torch.zeros((), device=logits.device)}
    if heatmaps is None or masks is None:
        raise ValueError("P > 0 needs the heatmaps (an IsDenseFast with heat=True) and the foreground masks")
    heat = heatmap_loss(heatmaps, masks, **heatmap_loss_kwargs)
    return {"loss": (1 - P) * classification + P * heat, "classification": classification, "heatmap": heat}


def accuracy(logits: torch.Tensor, labels: torch.Tensor, multilabel: bool = False) -> float:
    """Share of correct top-1 predictions, or of correct 0/1 decisions (logit > 0) when ``multilabel``."""
    return _accuracy(logits, labels, multilabel).item()


def _accuracy(logits: torch.Tensor, labels: torch.Tensor, multilabel: bool = False) -> torch.Tensor:
    """:func:`accuracy` as a 0-d tensor, without a host sync."""
    if multilabel:
        return ((logits > 0) == (labels > 0.5)).float().mean()
    return (logits.argmax(1) == labels).float().mean()


# ----------------------------------------------------------------------------- models


def densenet_config(model: nn.Module) -> Dict[str, Any]:
    """The :class:`DenseNet` arguments that rebuild ``model`` (a DenseNet or an IsDenseFast around one).

    Read from the layers themselves, so models built by ``densenet121`` & co. describe themselves
    too. ``classifier_dropout`` is the p of a ``Sequential(Dropout, Linear)`` classifier, or None.
    """
    net = model.DenseNet if isinstance(model, IsDenseFast) else model
    features = net.features
    blocks = [module for name, module in features.named_children() if name.startswith("denseblock")]
    first_layer = next(iter(blocks[0].values()))
    growth_rate = first_layer.conv2.out_channels
    classifier = net.classifier
    dropout = None
    if isinstance(classifier, nn.Sequential):
        dropout = next((m.p for m in classifier if isinstance(m, nn.Dropout)), None)
        classifier = classifier[-1]
    return {
        "growth_rate": growth_rate,
        "block_config": [len(block) for block in blocks],
        "num_init_features": features.conv0.out_channels,
        "bn_size": first_layer.conv1.out_channels // growth_rate,
        "drop_rate": first_layer.drop_rate,
        "num_classes": classifier.out_features,
        "classifier_dropout": dropout,
    }


def build_densenet(config: Mapping[str, Any]) -> DenseNet:
    """A :class:`DenseNet` from :func:`densenet_config`'s dict."""
    config = dict(config)
    dropout = config.pop("classifier_dropout", None)
    config["block_config"] = tuple(config["block_config"])
    net = DenseNet(**config)
    if dropout is not None:
        net.classifier = nn.Sequential(nn.Dropout(p=dropout), net.classifier)
    return net


def _model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@contextlib.contextmanager
def _heat(model: nn.Module, on: bool):
    """Sets an IsDenseFast's or IsResNetFast's ``heat`` for the duration (other models are left alone)."""
    if not isinstance(model, ISNET_MODELS):
        yield
        return
    previous = model.heat
    model.heat = on
    try:
        yield
    finally:
        model.heat = previous


@torch.no_grad()
def evaluate(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 256,
             multilabel: bool = False) -> float:
    """Accuracy of ``model`` in eval mode (heatmaps off for an IsDenseFast); restores its mode."""
    was_training = model.training
    device = _model_device(model)
    model.eval()
    correct = 0.0
    try:
        with _heat(model, False):
            for start in range(0, len(labels), batch_size):
                logits = model(images[start:start + batch_size].to(device))
                batch_labels = labels[start:start + batch_size].to(device)
                correct += accuracy(logits, batch_labels, multilabel) * len(batch_labels)
    finally:
        model.train(was_training)
    return correct / max(len(labels), 1)


def scheduled_lr(config: TrainConfig, step: int, total_steps: int) -> float:
    """The learning rate at optimizer step ``step`` (0-based) of ``total_steps``.

    A pure function of the step, so a resumed run needs no scheduler state to continue exactly.
    """
    if config.lr_schedule == "cosine":
        return config.lr * 0.5 * (1 + math.cos(math.pi * min(step, total_steps) / max(total_steps, 1)))
    return config.lr


def make_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    if config.optimizer == "sgd":
        return torch.optim.SGD(model.parameters(), lr=config.lr, momentum=config.momentum,
                               weight_decay=config.weight_decay)
    return torch.optim.Adam(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)


# ----------------------------------------------------------------------------- checkpoints


def save_checkpoint(path: PathLike, checkpoint: Mapping[str, Any]) -> None:
    """Writes ``checkpoint`` with ``torch.save`` so that a crash never leaves a broken file.

    The data go to a temporary file in the same folder, are flushed to disk, and only then
    replace ``path`` (``os.replace`` is atomic on one file system): ``path`` holds either the
    previous checkpoint or the new one, whole. A failed write removes its temporary file; one
    left by a process that died while writing (``.NAME.<32 hex digits>.tmp`` beside ``path``) is
    removed by the next successful save to the same ``path``, so one path must have one writer.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # A fresh name opened exclusively (not tempfile.mkstemp, whose files are private, 0600): the
    # checkpoint gets the permissions any file written here would get.
    temporary = path.with_name(_temporary_name(path.name, uuid.uuid4().hex))
    try:
        with open(temporary, "xb") as file:
            torch.save(dict(checkpoint), file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        raise
    _remove_stale_temporaries(path)
    _fsync_directory(path.parent)


def _temporary_name(name: str, token: str) -> str:
    return f".{name}.{token}.tmp"


def _remove_stale_temporaries(path: Path) -> None:
    """Removes the temporary files of earlier, interrupted saves to ``path`` (its naming only)."""
    pattern = re.compile(r"\." + re.escape(path.name) + r"\.[0-9a-f]{32}\.tmp\Z")  # _temporary_name's
    try:
        entries = list(os.scandir(path.parent))
    except OSError:
        return
    for entry in entries:
        if pattern.match(entry.name):
            with contextlib.suppress(OSError):
                if entry.is_file(follow_symlinks=False):
                    os.unlink(entry.path)


def _fsync_directory(folder: Path) -> None:
    """Makes the rename itself durable; not possible (nor needed) on every platform."""
    if not hasattr(os, "O_DIRECTORY"):
        return
    try:
        descriptor = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)


def load_checkpoint(path: PathLike, map_location="cpu") -> Dict[str, Any]:
    """Reads a checkpoint written by :func:`train` (tensors and plain data only).

    A file that is empty, truncated or no torch checkpoint raises a ValueError naming it, as does
    a torch file that is not one of ours.
    """
    checkpoint = load_checkpoint_file(path, map_location=map_location)
    if not isinstance(checkpoint, Mapping) or checkpoint.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path} is not an isnet-fast training checkpoint (no format '{CHECKPOINT_FORMAT}')")
    return dict(checkpoint)


def _rng_state(shuffle_generator: torch.Generator, model: Optional[nn.Module] = None) -> Dict[str, Any]:
    state = {"shuffle": shuffle_generator.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    generator = getattr(model, "generator", None) if isinstance(model, ISNET_MODELS) else None
    if generator is not None:  # the Stochastic ISNet's own generator, when it has one
        state["isdensefast_generator"] = generator.get_state()
    return state


def _restore_rng_state(state: Mapping[str, Any], shuffle_generator: torch.Generator,
                       model: Optional[nn.Module] = None) -> None:
    shuffle_generator.set_state(state["shuffle"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    generator = getattr(model, "generator", None) if isinstance(model, ISNET_MODELS) else None
    if generator is not None and "isdensefast_generator" in state:
        generator.set_state(state["isdensefast_generator"])


# ----------------------------------------------------------------------------- loop


def train(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, masks: Optional[torch.Tensor] = None,
          config: Optional[TrainConfig] = None, checkpoint_path: Optional[PathLike] = None,
          resume: bool = False, log_path: Optional[PathLike] = None,
          validation: Optional[Mapping[str, Any]] = None,
          on_epoch_end: Optional[Callable[[Dict[str, Any]], None]] = None) -> List[Dict[str, Any]]:
    """Trains ``model`` (an IsDenseFast or IsResNetFast for ``P > 0``) on in-memory tensors; returns the history.

    Args:
        images, labels, masks: the training set, on any device (batches move to the model's).
            ``masks`` (1 = foreground, shaped like the images) are needed when ``P > 0``.
        checkpoint_path: written (atomically) after every epoch.
        resume: continue from ``checkpoint_path`` if it exists: model, optimizer, RNG states
            (the batch order's, torch's global one, which dropout and the Stochastic ISNet's
            draw use, and the IsDenseFast's own ``generator`` if it has one), the variant
            (``explain``, ``selective``; a warning when the model was set otherwise) and history
            are restored and training goes on from the saved epoch up to ``config.epochs``.
            The result equals that of an uninterrupted run. A checkpoint of another run, one whose
            optimizer or its settings (momentum, weight_decay), batch size or data (number and
            shape of the images, a fingerprint of the labels) differ from this one, is refused
            with a ValueError naming what differs; another ``lr`` resumes with a warning (lowering
            it is how a run that went non-finite goes on). Checkpoints written before the data
            were recorded resume with a warning that the data cannot be checked.
        log_path: a JSON-lines file with one record per epoch; rewritten from the history at
            the start, so after a resume it matches the checkpoint.
        validation: ``{"images": ..., "labels": ...}``; its accuracy is logged each epoch.
        on_epoch_end: called with each epoch's record.

    The history is a list of per-epoch dicts: epoch, loss, classification_loss, heatmap_loss,
    accuracy (on the training batches, in training mode), lr (the last step's), seconds,
    skipped_steps (see ``TrainConfig.skip_nonfinite``) and val_accuracy.

    A step whose loss, heatmaps or gradients are not finite raises :class:`NonFiniteError`
    (naming the epoch, the step and which went non-finite) before its optimizer step, unless
    ``config.skip_nonfinite``; weights that are not finite after an epoch raise it before that
    epoch's checkpoint is written. Either way the checkpoint on disk is the last good one. The
    check costs one host sync per step, which also reads the step's figures for the log.
    """
    config = config or TrainConfig()
    if config.P > 0 and not isinstance(model, ISNET_MODELS):
        raise TypeError(f"P > 0 needs heatmaps: wrap the network in IsDenseFast (a DenseNet) or IsResNetFast "
                        f"(a ResNet) (got {type(model).__name__})")
    if config.P > 0 and masks is None:
        raise ValueError("P > 0 needs foreground masks")
    if config.explain_labels and config.P > 0 and (labels.dim() != 1 or labels.dtype.is_floating_point
                                                   or labels.dtype == torch.bool):
        raise ValueError(f"explain_labels needs one class index per image (a 1-D LongTensor), got labels of "
                         f"shape {tuple(labels.shape)} and dtype {labels.dtype}")
    if len(images) != len(labels) or (masks is not None and len(masks) != len(images)):
        raise ValueError(f"images, labels and masks differ in length: {len(images)}, {len(labels)}, "
                         f"{None if masks is None else len(masks)}")

    device = _model_device(model)
    optimizer = make_optimizer(model, config)
    shuffle_generator = torch.Generator().manual_seed(config.seed)
    run = _run_record(config, images, labels)
    history: List[Dict[str, Any]] = []
    start_epoch = 0
    if resume and checkpoint_path is not None and Path(checkpoint_path).exists():
        checkpoint = load_checkpoint(checkpoint_path, map_location=device)
        _check_same_run(checkpoint, run, checkpoint_path)
        model.load_state_dict(checkpoint["state_dict"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        _restore_rng_state(checkpoint["rng"], shuffle_generator, model)
        _restore_variant(model, checkpoint)
        history = list(checkpoint["history"])
        start_epoch = int(checkpoint["epoch"])
    if log_path is not None:
        Path(log_path).write_text("".join(json.dumps(record) + "\n" for record in history))

    saved_epoch = start_epoch if start_epoch > 0 else None  # the epoch the checkpoint on disk holds
    model.train()
    with _heat(model, config.P > 0):
        for epoch in range(start_epoch, config.epochs):
            last_good = _last_good(checkpoint_path, saved_epoch)
            record = _train_epoch(model, optimizer, images, labels, masks, config, shuffle_generator, epoch, device,
                                  last_good)
            _check_finite_weights(model, epoch, last_good)
            if validation is not None:
                record["val_accuracy"] = evaluate(model, validation["images"], validation["labels"],
                                                  multilabel=config.multilabel)
            history.append(record)
            if checkpoint_path is not None:
                save_checkpoint(checkpoint_path, {
                    "format": CHECKPOINT_FORMAT,
                    "epoch": epoch + 1,
                    "state_dict": model.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "rng": _rng_state(shuffle_generator, model),
                    "history": history,
                    "train_config": dataclasses.asdict(config),
                    "run": run,
                    **_architecture_record(model),
                    "isdensefast": _isdensefast_settings(model),
                    "image_size": list(images.shape[-2:]),
                })
                saved_epoch = epoch + 1
            if log_path is not None:
                with open(log_path, "a", encoding="utf-8") as log:
                    log.write(json.dumps(record) + "\n")
            if on_epoch_end is not None:
                on_epoch_end(record)
    return history


def _architecture_record(model: nn.Module) -> Dict[str, Any]:
    """What a checkpoint records of the network, to rebuild it: ``resnet_config`` for a ResNet,
    ``densenet_config`` for a DenseNet (bare or wrapped)."""
    if is_resnet(model):
        return {"resnet_config": resnet_config(model)}
    return {"densenet_config": densenet_config(model)}


def _isdensefast_settings(model: nn.Module) -> Optional[Dict[str, Any]]:
    """What a checkpoint records of an IsDenseFast or IsResNetFast: its LRP rules and its variant
    (under the key ``isdensefast`` for both; a ResNet has no ``reference_pairing``)."""
    if not isinstance(model, ISNET_MODELS):
        return None
    settings = {"e": float(model.e), "Zb": bool(model.Zb), "reference_quirks": bool(model.reference_quirks),
                "explain": str(model.explain), "selective": bool(model.selective)}
    if isinstance(model, IsDenseFast):
        settings["reference_pairing"] = bool(model.reference_pairing)
    return settings


# What checkpoints written before the settings existed mean: the Original ISNet's defaults.
_SETTING_DEFAULTS = {"e": 1e-2, "Zb": True, "reference_pairing": True, "reference_quirks": True, "explain": "all",
                     "selective": False}


def isdensefast_settings(checkpoint: Mapping[str, Any]) -> Dict[str, Any]:
    """The IsDenseFast keyword arguments a training checkpoint (a dict, as :func:`load_checkpoint`
    returns it) was trained with: ``e``, ``Zb``, ``reference_pairing``, ``reference_quirks``,
    ``explain`` and ``selective``.

    Keys an older checkpoint lacks take the defaults (``explain="all"``, ``selective=False``: the
    Original ISNet). Pass them on: ``IsDenseFast.from_checkpoint(path, net, **isdensefast_settings(c))``.
    For a ResNet's checkpoint (``resnet_config``) they are IsResNetFast's, without ``reference_pairing``.
    """
    recorded = checkpoint.get("isdensefast")
    recorded = recorded if isinstance(recorded, Mapping) else {}
    settings = {key: recorded.get(key, default) for key, default in _SETTING_DEFAULTS.items()}
    settings["e"] = float(settings["e"])
    for key in ("Zb", "reference_pairing", "reference_quirks", "selective"):
        settings[key] = bool(settings[key])
    settings["explain"] = str(settings["explain"])
    if isinstance(checkpoint.get("resnet_config"), Mapping):
        del settings["reference_pairing"]  # the DenseNet's alone: IsResNetFast takes no such argument
    return settings


def load_model(path: PathLike, map_location="cpu", **overrides) -> Union[IsDenseFast, IsResNetFast]:
    """The IsDenseFast (or, for a ResNet, IsResNetFast) a training checkpoint holds: its network
    (rebuilt from ``densenet_config`` or ``resnet_config``), weights, LRP rules and variant
    (:func:`isdensefast_settings`), in eval mode.

    ``overrides`` replace recorded IsDenseFast / IsResNetFast arguments (e.g. ``explain="all"``
    for a map per class, or ``backend``).
    """
    checkpoint = load_checkpoint(path, map_location=map_location)
    settings = dict(isdensefast_settings(checkpoint), **overrides)
    if isinstance(checkpoint.get("resnet_config"), Mapping):
        model = IsResNetFast(build_resnet(checkpoint["resnet_config"]), **settings)
    elif isinstance(checkpoint.get("densenet_config"), Mapping):
        model = IsDenseFast(build_densenet(checkpoint["densenet_config"]), **settings)
    else:
        raise ValueError(f"{path} does not record its network's configuration (densenet_config or resnet_config)")
    state_dict = checkpoint["state_dict"]
    prefix = "resnet." if isinstance(model, IsResNetFast) else "DenseNet."
    if not any(str(key).startswith(prefix) for key in state_dict):  # a bare network's (P = 0, no wrapper)
        state_dict = {prefix + str(key): value for key, value in state_dict.items()}
    model.load_state_dict(state_dict)
    return model.to(map_location if isinstance(map_location, (str, torch.device)) else "cpu").eval()


def _restore_variant(model: nn.Module, checkpoint: Mapping[str, Any]) -> None:
    """A resumed IsDenseFast or IsResNetFast continues with the variant its checkpoint was trained with."""
    if not isinstance(model, ISNET_MODELS) or not isinstance(checkpoint.get("isdensefast"), Mapping):
        return
    recorded = isdensefast_settings(checkpoint)
    wanted = (recorded["explain"], recorded["selective"])
    if (model.explain, model.selective) == wanted:
        return
    warnings.warn(f"resuming a checkpoint trained with explain={wanted[0]!r}, selective={wanted[1]}: the model "
                  f"(explain={model.explain!r}, selective={model.selective}) continues with the checkpoint's "
                  "variant", stacklevel=3)
    model.selective = False  # every explain mode accepts selective=False; then set both
    model.explain = wanted[0]
    model.selective = wanted[1]


# ----------------------------------------------------------------------------- resume checks


# How _check_same_run names the recorded items.
_RUN_ITEMS = {"images": "number of images", "image_shape": "image shape"}


def _run_record(config: TrainConfig, images: torch.Tensor, labels: torch.Tensor) -> Dict[str, Any]:
    """What a resumed run must share with the checkpoint's: the optimizer, its settings, the batch
    size and the data (the number and shape of the images, a fingerprint of the labels in order).
    Only the learning rate may change (with a warning): lowering it is how a run that went
    non-finite recovers."""
    return {
        "optimizer": config.optimizer,
        "lr": float(config.lr),
        "momentum": float(config.momentum) if config.optimizer == "sgd" else None,  # Adam has none
        "weight_decay": float(config.weight_decay),
        "batch_size": int(config.batch_size),
        "images": int(len(images)),
        "image_shape": [int(n) for n in images.shape[1:]],
        "labels": _fingerprint(labels),
    }


def _fingerprint(tensor: torch.Tensor) -> str:
    """A short hash of a tensor's dtype, shape and values (one copy to the host, no float rounding)."""
    data = tensor.detach().contiguous().cpu().flatten()
    digest = hashlib.sha256(f"{data.dtype}{tuple(tensor.shape)}".encode())
    digest.update(data.view(torch.uint8).numpy().tobytes() if data.numel() else b"")
    return digest.hexdigest()[:16]


def _check_same_run(checkpoint: Mapping[str, Any], run: Mapping[str, Any], path: PathLike) -> None:
    """Refuses to resume a checkpoint whose run differs from this one (an exact resume would be lost)."""
    recorded = checkpoint.get("run")
    if not isinstance(recorded, Mapping):  # written before the run was recorded: what the settings tell
        old = checkpoint.get("train_config")
        old = old if isinstance(old, Mapping) else {}
        recorded = {key: old[key] for key in ("optimizer", "lr", "weight_decay", "batch_size") if key in old}
        if old.get("optimizer") == "sgd" and "momentum" in old:
            recorded["momentum"] = old["momentum"]
        warnings.warn(f"{path} was written before checkpoints recorded their data: resuming without checking "
                      "that the images and labels are those it was trained on", stacklevel=3)
    differences = []
    for key, value in run.items():
        if key not in recorded or recorded[key] == value:
            continue
        theirs = recorded[key]
        if key == "optimizer":
            differences = [f"optimizer ({theirs!r} in the checkpoint, {value!r} now)"]
            break  # its settings differ in meaning too
        if key == "lr":
            warnings.warn(f"resuming {path} with lr={value!r} (it was trained with lr={theirs!r}): the result "
                          "differs from that of an uninterrupted run", stacklevel=3)
        elif key == "labels":
            differences.append("labels (other labels, or another order: their fingerprints differ)")
        elif not (key == "momentum" and None in (theirs, value)):
            differences.append(f"{_RUN_ITEMS.get(key, key)} ({theirs!r} in the checkpoint, {value!r} now)")
    if differences:
        raise ValueError(f"cannot resume from {path}: this run differs from the checkpoint's in "
                         f"{', '.join(differences)}. Resume with its settings and data, or start a new run "
                         "(another checkpoint_path, or resume=False)")


# ----------------------------------------------------------------------------- non-finite steps


def _last_good(checkpoint_path: Optional[PathLike], saved_epoch: Optional[int]) -> str:
    """Where the last good state is, for NonFiniteError's message."""
    if checkpoint_path is None:
        return "nothing was saved (no checkpoint_path)"
    if saved_epoch is None:
        return f"no checkpoint was written yet to {checkpoint_path}"
    return f"the checkpoint of epoch {saved_epoch} in {checkpoint_path} is intact (resume from it)"


_ADVICE = ("Lower the learning rate (a resume may change it), check the data for NaN, or skip such steps with "
           "TrainConfig(skip_nonfinite=True)")


def _check_finite_weights(model: nn.Module, epoch: int, last_good: str) -> None:
    """Raises NonFiniteError (before the checkpoint is written) if a weight or BatchNorm statistic is not finite."""
    named = [(name, t) for name, t in list(model.named_parameters()) + list(model.named_buffers())
             if t.is_floating_point()]
    if not named:
        return
    finite = torch.stack([torch.isfinite(t).all() for _, t in named])
    if bool(finite.all()):  # one host sync per epoch
        return
    first = named[int((~finite).nonzero()[0])][0]
    raise NonFiniteError(f"epoch {epoch + 1}: the weights went non-finite ({first} holds NaN or Inf) in an "
                         f"optimizer step, and were not saved; {last_good}. {_ADVICE}",
                         epoch + 1, 0, "weights")


def _nonfinite_error(epoch: int, step: int, n_steps: int, what: str, detail: str, last_good: str) -> NonFiniteError:
    return NonFiniteError(f"epoch {epoch + 1}, step {step + 1} of {n_steps}: the {what} went non-finite ({detail}); "
                          f"stopped before its optimizer step; {last_good}. {_ADVICE}",
                          epoch + 1, step + 1, what)


def _diagnose(losses: Optional[Mapping[str, torch.Tensor]], logits: torch.Tensor,
              heatmaps: Optional[torch.Tensor], norm: Optional[float]):
    """(what, detail) of a non-finite step; on the error path only, so its host syncs cost nothing."""
    if heatmaps is not None and not bool(torch.isfinite(heatmaps).all()):
        share = 1 - torch.isfinite(heatmaps).float().mean().item()
        return "heatmaps", f"{share:.0%} NaN or Inf"
    if losses is None or not math.isfinite(losses["loss"].item()):
        if not bool(torch.isfinite(logits).all()):
            return "loss", "the logits hold NaN or Inf"
        return "loss", f"the loss is {losses['loss'].item() if losses is not None else float('nan')}"
    return "gradients", f"their norm is {norm}"


def _train_epoch(model, optimizer, images, labels, masks, config: TrainConfig, shuffle_generator, epoch, device,
                 last_good: str = ""):
    started = time.perf_counter()
    order = torch.randperm(len(labels), generator=shuffle_generator)
    n_batches = math.ceil(len(labels) / config.batch_size)
    totals = {"loss": 0.0, "classification_loss": 0.0, "heatmap_loss": 0.0, "accuracy": 0.0}
    seen = 0
    skipped = 0
    lr = optimizer.param_groups[0]["lr"]
    parameters = [p for p in model.parameters() if p.requires_grad]
    progress = _Progress(n_batches, f"epoch {epoch + 1}/{config.epochs}", config.progress, config.log_every)
    try:
        for batch in range(n_batches):
            lr = scheduled_lr(config, epoch * n_batches + batch, config.epochs * n_batches)
            for group in optimizer.param_groups:
                group["lr"] = lr
            index = order[batch * config.batch_size:(batch + 1) * config.batch_size]
            x = images[index].to(device)
            y = labels[index].to(device)
            # A skipped step must not leave its batch in the BatchNorm running statistics either.
            buffers = [b.detach().clone() for b in model.buffers()] if config.skip_nonfinite else None
            if config.explain_labels and config.P > 0:
                output = model(x, classes=y)  # one map per image, for its label
            else:
                output = model(x)
            logits, heatmaps = output if isinstance(output, tuple) else (output, None)
            batch_masks = masks[index].to(device) if (masks is not None and config.P > 0) else None
            try:
                losses = compound_loss(logits, heatmaps, y, batch_masks, config.P, config.multilabel,
                                       **config.heatmap_loss_kwargs)
            except NonFiniteHeatmapError:  # not one finite value: the loss cannot be computed
                losses = None
            figures, norm = None, None
            if losses is not None:
                optimizer.zero_grad(set_to_none=True)
                losses["loss"].backward()
                if config.clip_norm:
                    total_norm = torch.nn.utils.clip_grad_norm_(parameters, config.clip_norm)
                else:
                    total_norm = _total_norm(parameters, losses["loss"])
                stats = [losses["loss"], losses["classification"], losses["heatmap"],
                         _accuracy(logits.detach(), y, config.multilabel),
                         torch.isfinite(losses["loss"]) & torch.isfinite(total_norm).to(losses["loss"].device),
                         total_norm.to(losses["loss"].device)]
                dtype = torch.float64 if any(t.dtype == torch.float64 for t in stats) else torch.float32
                figures = torch.stack([t.detach().reshape(()).to(dtype) for t in stats]).tolist()  # the one sync
                norm = figures[5]
            if figures is None or not figures[4]:
                what, detail = _diagnose(losses, logits, heatmaps, norm)
                if not config.skip_nonfinite:
                    raise _nonfinite_error(epoch, batch, n_batches, what, detail, last_good)
                skipped += 1
                optimizer.zero_grad(set_to_none=True)
                with torch.no_grad():
                    for buffer, before in zip(model.buffers(), buffers):
                        buffer.copy_(before)
                progress.update(loss=totals["loss"] / max(seen, 1), accuracy=totals["accuracy"] / max(seen, 1))
                continue
            optimizer.step()

            n = len(index)
            seen += n
            totals["loss"] += figures[0] * n
            totals["classification_loss"] += figures[1] * n
            totals["heatmap_loss"] += figures[2] * n
            totals["accuracy"] += figures[3] * n
            progress.update(loss=totals["loss"] / seen, accuracy=totals["accuracy"] / seen)
    finally:
        progress.close()
    if n_batches and skipped == n_batches:
        raise NonFiniteError(f"epoch {epoch + 1}: all {n_batches} steps went non-finite and were skipped "
                             f"(skip_nonfinite), so training cannot go on; {last_good}. Lower the learning rate, "
                             "or check the data and weights for NaN", epoch + 1, n_batches, what)
    record = {"epoch": epoch + 1}
    record.update({key: value / max(seen, 1) for key, value in totals.items()})
    record["lr"] = lr
    record["seconds"] = time.perf_counter() - started
    record["skipped_steps"] = skipped
    return record


def _total_norm(parameters: List[torch.Tensor], like: torch.Tensor) -> torch.Tensor:
    """The gradients' total 2-norm, as ``clip_grad_norm_`` computes it, without clipping."""
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return torch.zeros((), device=like.device)
    return torch.nn.utils.get_total_norm(grads)


class _Progress:
    """A tqdm bar on stderr when tqdm is installed, else a plain line every ``log_every`` batches."""

    def __init__(self, total: int, description: str, enabled: bool, log_every: int):
        self.total, self.description, self.enabled, self.log_every = total, description, enabled, max(log_every, 1)
        self.done = 0
        self.bar = None
        if enabled:
            try:
                from tqdm.auto import tqdm
            except ImportError:
                tqdm = None
            if tqdm is not None:
                self.bar = tqdm(total=total, desc=description, file=sys.stderr, leave=False, dynamic_ncols=True)

    def update(self, **figures: float) -> None:
        self.done += 1
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.set_postfix({key: f"{value:.4f}" for key, value in figures.items()}, refresh=False)
            self.bar.update(1)
        elif self.done % self.log_every == 0 or self.done == self.total:
            shown = " ".join(f"{key} {value:.4f}" for key, value in figures.items())
            sys.stderr.write(f"{self.description}: batch {self.done}/{self.total} {shown}\n")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
