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
settings, the DenseNet's configuration (``densenet_config``), the IsDenseFast's LRP settings
(``isdensefast``: e, Zb, reference_pairing, explain, selective) and the training image size, from
which :func:`load_model` and ``isnet-fast explain`` rebuild the model. A resumed run takes the
variant (explain, selective) from the checkpoint; checkpoints written before the variants existed
read as the Original ISNet (``explain="all"``, ``selective=False``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import sys
import time
import uuid
import warnings
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from .densenet import DenseNet
from .loss import heatmap_loss
from .model import IsDenseFast

__all__ = [
    "CHECKPOINT_FORMAT",
    "TrainConfig",
    "build_densenet",
    "classification_loss",
    "compound_loss",
    "densenet_config",
    "evaluate",
    "isdensefast_settings",
    "load_checkpoint",
    "load_model",
    "save_checkpoint",
    "scheduled_lr",
    "train",
]

CHECKPOINT_FORMAT = "isnet-fast-training-v1"
OPTIMIZERS = ("sgd", "adam")
LR_SCHEDULES = ("constant", "cosine")
PathLike = Union[str, os.PathLike]


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
    if multilabel:
        return ((logits > 0) == (labels > 0.5)).float().mean().item()
    return (logits.argmax(1) == labels).float().mean().item()


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
    """Sets an IsDenseFast's ``heat`` for the duration (other models are left alone)."""
    if not isinstance(model, IsDenseFast):
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
    previous checkpoint or the new one, whole.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # A fresh name opened exclusively (not tempfile.mkstemp, whose files are private, 0600): the
    # checkpoint gets the permissions any file written here would get.
    temporary = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
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
    _fsync_directory(path.parent)


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
    """Reads a checkpoint written by :func:`train` (tensors and plain data only)."""
    checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    if not isinstance(checkpoint, Mapping) or checkpoint.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path} is not an isnet-fast training checkpoint (no format '{CHECKPOINT_FORMAT}')")
    return dict(checkpoint)


def _rng_state(shuffle_generator: torch.Generator, model: Optional[nn.Module] = None) -> Dict[str, Any]:
    state = {"shuffle": shuffle_generator.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    generator = getattr(model, "generator", None) if isinstance(model, IsDenseFast) else None
    if generator is not None:  # the Stochastic ISNet's own generator, when it has one
        state["isdensefast_generator"] = generator.get_state()
    return state


def _restore_rng_state(state: Mapping[str, Any], shuffle_generator: torch.Generator,
                       model: Optional[nn.Module] = None) -> None:
    shuffle_generator.set_state(state["shuffle"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    generator = getattr(model, "generator", None) if isinstance(model, IsDenseFast) else None
    if generator is not None and "isdensefast_generator" in state:
        generator.set_state(state["isdensefast_generator"])


# ----------------------------------------------------------------------------- loop


def train(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, masks: Optional[torch.Tensor] = None,
          config: Optional[TrainConfig] = None, checkpoint_path: Optional[PathLike] = None,
          resume: bool = False, log_path: Optional[PathLike] = None,
          validation: Optional[Mapping[str, Any]] = None,
          on_epoch_end: Optional[Callable[[Dict[str, Any]], None]] = None) -> List[Dict[str, Any]]:
    """Trains ``model`` (an IsDenseFast for ``P > 0``) on in-memory tensors; returns the history.

    Args:
        images, labels, masks: the training set, on any device (batches move to the model's).
            ``masks`` (1 = foreground, shaped like the images) are needed when ``P > 0``.
        checkpoint_path: written (atomically) after every epoch.
        resume: continue from ``checkpoint_path`` if it exists: model, optimizer, RNG states
            (the batch order's, torch's global one, which dropout and the Stochastic ISNet's
            draw use, and the IsDenseFast's own ``generator`` if it has one), the variant
            (``explain``, ``selective``; a warning when the model was set otherwise) and history
            are restored and training goes on from the saved epoch up to ``config.epochs``.
            The result equals that of an uninterrupted run.
        log_path: a JSON-lines file with one record per epoch; rewritten from the history at
            the start, so after a resume it matches the checkpoint.
        validation: ``{"images": ..., "labels": ...}``; its accuracy is logged each epoch.
        on_epoch_end: called with each epoch's record.

    The history is a list of per-epoch dicts: epoch, loss, classification_loss, heatmap_loss,
    accuracy (on the training batches, in training mode), lr (the last step's), seconds, and
    val_accuracy.
    """
    config = config or TrainConfig()
    if config.P > 0 and not isinstance(model, IsDenseFast):
        raise TypeError(f"P > 0 needs heatmaps: wrap the network in IsDenseFast (got {type(model).__name__})")
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
    history: List[Dict[str, Any]] = []
    start_epoch = 0
    if resume and checkpoint_path is not None and Path(checkpoint_path).exists():
        checkpoint = load_checkpoint(checkpoint_path, map_location=device)
        model.load_state_dict(checkpoint["state_dict"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        _restore_rng_state(checkpoint["rng"], shuffle_generator, model)
        _restore_variant(model, checkpoint)
        history = list(checkpoint["history"])
        start_epoch = int(checkpoint["epoch"])
    if log_path is not None:
        Path(log_path).write_text("".join(json.dumps(record) + "\n" for record in history))

    model.train()
    with _heat(model, config.P > 0):
        for epoch in range(start_epoch, config.epochs):
            record = _train_epoch(model, optimizer, images, labels, masks, config, shuffle_generator, epoch, device)
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
                    "densenet_config": densenet_config(model),
                    "isdensefast": _isdensefast_settings(model),
                    "image_size": list(images.shape[-2:]),
                })
            if log_path is not None:
                with open(log_path, "a", encoding="utf-8") as log:
                    log.write(json.dumps(record) + "\n")
            if on_epoch_end is not None:
                on_epoch_end(record)
    return history


def _isdensefast_settings(model: nn.Module) -> Optional[Dict[str, Any]]:
    """What a checkpoint records of an IsDenseFast: its LRP rules and its variant."""
    if not isinstance(model, IsDenseFast):
        return None
    return {"e": float(model.e), "Zb": bool(model.Zb), "reference_pairing": bool(model.reference_pairing),
            "explain": str(model.explain), "selective": bool(model.selective)}


# What checkpoints written before the settings existed mean: the Original ISNet's defaults.
_SETTING_DEFAULTS = {"e": 1e-2, "Zb": True, "reference_pairing": True, "explain": "all", "selective": False}


def isdensefast_settings(checkpoint: Mapping[str, Any]) -> Dict[str, Any]:
    """The IsDenseFast keyword arguments a training checkpoint (a dict, as :func:`load_checkpoint`
    returns it) was trained with: ``e``, ``Zb``, ``reference_pairing``, ``explain`` and
    ``selective``.

    Keys an older checkpoint lacks take the defaults (``explain="all"``, ``selective=False``: the
    Original ISNet). Pass them on: ``IsDenseFast.from_checkpoint(path, net, **isdensefast_settings(c))``.
    """
    recorded = checkpoint.get("isdensefast")
    recorded = recorded if isinstance(recorded, Mapping) else {}
    settings = {key: recorded.get(key, default) for key, default in _SETTING_DEFAULTS.items()}
    settings["e"] = float(settings["e"])
    for key in ("Zb", "reference_pairing", "selective"):
        settings[key] = bool(settings[key])
    settings["explain"] = str(settings["explain"])
    return settings


def load_model(path: PathLike, map_location="cpu", **overrides) -> IsDenseFast:
    """The IsDenseFast a training checkpoint holds: its DenseNet (rebuilt from ``densenet_config``),
    weights, LRP rules and variant (:func:`isdensefast_settings`), in eval mode.

    ``overrides`` replace recorded IsDenseFast arguments (e.g. ``explain="all"`` for a map per
    class, or ``backend``).
    """
    checkpoint = load_checkpoint(path, map_location=map_location)
    if not isinstance(checkpoint.get("densenet_config"), Mapping):
        raise ValueError(f"{path} does not record its DenseNet's configuration (densenet_config)")
    settings = dict(isdensefast_settings(checkpoint), **overrides)
    model = IsDenseFast(build_densenet(checkpoint["densenet_config"]), **settings)
    model.load_state_dict(checkpoint["state_dict"])
    return model.to(map_location if isinstance(map_location, (str, torch.device)) else "cpu").eval()


def _restore_variant(model: nn.Module, checkpoint: Mapping[str, Any]) -> None:
    """A resumed IsDenseFast continues with the variant its checkpoint was trained with."""
    if not isinstance(model, IsDenseFast) or not isinstance(checkpoint.get("isdensefast"), Mapping):
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


def _train_epoch(model, optimizer, images, labels, masks, config: TrainConfig, shuffle_generator, epoch, device):
    started = time.perf_counter()
    order = torch.randperm(len(labels), generator=shuffle_generator)
    n_batches = math.ceil(len(labels) / config.batch_size)
    totals = {"loss": 0.0, "classification_loss": 0.0, "heatmap_loss": 0.0, "accuracy": 0.0}
    seen = 0
    lr = optimizer.param_groups[0]["lr"]
    progress = _Progress(n_batches, f"epoch {epoch + 1}/{config.epochs}", config.progress, config.log_every)
    try:
        for batch in range(n_batches):
            lr = scheduled_lr(config, epoch * n_batches + batch, config.epochs * n_batches)
            for group in optimizer.param_groups:
                group["lr"] = lr
            index = order[batch * config.batch_size:(batch + 1) * config.batch_size]
            x = images[index].to(device)
            y = labels[index].to(device)
            if config.explain_labels and config.P > 0:
                output = model(x, classes=y)  # one map per image, for its label
            else:
                output = model(x)
            logits, heatmaps = output if isinstance(output, tuple) else (output, None)
            batch_masks = masks[index].to(device) if (masks is not None and config.P > 0) else None
            losses = compound_loss(logits, heatmaps, y, batch_masks, config.P, config.multilabel,
                                   **config.heatmap_loss_kwargs)
            optimizer.zero_grad(set_to_none=True)
            losses["loss"].backward()
            if config.clip_norm:
                torch.nn.utils.clip_grad_norm_(model.parameters(), config.clip_norm)
            optimizer.step()

            n = len(index)
            seen += n
            totals["loss"] += losses["loss"].item() * n
            totals["classification_loss"] += losses["classification"].item() * n
            totals["heatmap_loss"] += losses["heatmap"].item() * n
            totals["accuracy"] += accuracy(logits.detach(), y, config.multilabel) * n
            progress.update(loss=totals["loss"] / seen, accuracy=totals["accuracy"] / seen)
    finally:
        progress.close()
    record = {"epoch": epoch + 1}
    record.update({key: value / max(seen, 1) for key, value in totals.items()})
    record["lr"] = lr
    record["seconds"] = time.perf_counter() - started
    return record


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
