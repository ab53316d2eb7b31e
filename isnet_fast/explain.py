"""``isnet-fast explain``: LRP heatmap PNGs for images, from a checkpoint of ours or of the original.

Checkpoints written by :func:`isnet_fast.training.train` record the DenseNet's (or ResNet's)
configuration, so nothing else is needed. The original ISNet's checkpoints (``IsDense`` state
dicts, keys ``DenseNet.*`` and ``LRPBlock.*``; the authors' ``LRPResNet``'s, keys ``resnet.*`` and
``LRPBlock.*``; or Lightning's with a ``model.`` prefix) need ``--arch`` (and ``--classes`` when it
differs from the checkpoint's classifier); without it the error names the ``--arch`` their shapes fit.

Also home to the heatmap helpers the demo uses: :func:`pixel_relevance`,
:func:`relevance_inside_mask` and :func:`draw_heatmap`.
"""

from __future__ import annotations

import argparse
import sys
from collections import OrderedDict
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn as nn

from .architectures import (DENSENET_ARCHITECTURES, RESNET_ARCHITECTURES, build_resnet, classifier_outputs,
                            infer_resnet_config, is_resnet, known_resnet_name, wrap_network)
from .argtypes import positive_int
from .devices import resolve_device
from .models.densenet import convert_torchvision_state_dict
from .engine.densenet.forward import minimum_input_size
from .model import IsDenseFast, load_checkpoint_file
from .resnet_model import IsResNetFast
from .engine.densenet.plan import build_plan
from .training import build_densenet

__all__ = [
    "ARCHITECTURES",
    "ExplainError",
    "add_explain_parser",
    "densenet_state_dict",
    "draw_heatmap",
    "infer_densenet_config",
    "load_explained_model",
    "pixel_relevance",
    "relevance_inside_mask",
    "resnet_state_dict",
    "run_explain",
]

ARCHITECTURES = {**DENSENET_ARCHITECTURES, **RESNET_ARCHITECTURES}
# The torchvision-style configurations, to name the architecture a checkpoint's shapes fit.
_KNOWN_CONFIGS = {
    "densenet121": (32, (6, 12, 24, 16), 64),
    "densenet161": (48, (6, 12, 36, 24), 96),
    "densenet169": (32, (6, 12, 32, 32), 64),
    "densenet201": (32, (6, 12, 48, 32), 64),
}


class ExplainError(Exception):
    """A problem with the user's input (image, checkpoint, options): reported in one line, exit code 2."""


# ----------------------------------------------------------------------------- heatmap helpers


def pixel_relevance(heatmaps: torch.Tensor) -> torch.Tensor:
    """Relevance per pixel: the sum over the colour channels (``... x 3 x H x W`` -> ``... x H x W``)."""
    return heatmaps.sum(-3)


def relevance_inside_mask(heatmaps: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Per image, the share of positive pixel relevance that falls inside the mask.

    ``heatmaps``: ``B x 3 x H x W`` (one class per image); ``masks``: ``B x 3 x H x W`` or
    ``B x H x W`` with 1 on the foreground. Images without positive relevance count as 0.
    """
    positive = pixel_relevance(heatmaps).clamp(min=0)
    foreground = masks[:, 0] if masks.dim() == 4 else masks
    total = positive.sum((-2, -1))
    inside = (positive * foreground).sum((-2, -1))
    return torch.where(total > 0, inside / total.clamp(min=torch.finfo(total.dtype).tiny), torch.zeros_like(total))


def draw_heatmap(axes, heatmap: torch.Tensor, title: Optional[str] = None) -> None:
    """Shows one class's ``3 x H x W`` heatmap on matplotlib ``axes``: red positive, blue negative.

    The colour scale is symmetric around 0 and spans the map's largest magnitude, as in ISNet's figures.
    """
    pixels = pixel_relevance(heatmap.detach().float().cpu()).numpy()
    limit = float(np.abs(pixels).max()) or 1.0
    axes.imshow(pixels, cmap="seismic", vmin=-limit, vmax=limit, interpolation="nearest")
    axes.set_xticks([])
    axes.set_yticks([])
    if title:
        axes.set_title(title, fontsize=8)


def draw_image(axes, image: torch.Tensor, title: Optional[str] = None) -> None:
    """Shows a ``3 x H x W`` image in [0, 1] on matplotlib ``axes``."""
    axes.imshow(image.detach().float().cpu().clamp(0, 1).permute(1, 2, 0).numpy(), interpolation="nearest")
    axes.set_xticks([])
    axes.set_yticks([])
    if title:
        axes.set_title(title, fontsize=8)


def new_figure(width: float, height: float):
    """A matplotlib Figure (constrained layout) drawn by Agg: no pyplot, no global figure registry, no display."""
    try:
        from matplotlib.figure import Figure
    except ImportError as error:
        raise ExplainError("drawing heatmaps needs matplotlib; install it with: pip install isnet-fast[demo]") \
            from error
    return Figure(figsize=(width, height), dpi=100, layout="constrained")


# ----------------------------------------------------------------------------- checkpoints


def densenet_state_dict(state_dict: Mapping[str, torch.Tensor]) -> "OrderedDict[str, torch.Tensor]":
    """The DenseNet's own keys from ours, IsDense's or Lightning's state dicts.

    Drops the ``model.`` (Lightning) and ``DenseNet.`` (IsDense / IsDenseFast) prefixes and the
    original's ``LRPBlock.*`` entries (aliases of the DenseNet's parameters); renames old
    torchvision keys and a dropout classifier's ``classifier.1.*``.
    """
    cleaned = OrderedDict()
    for key, value in state_dict.items():
        if key.startswith("model."):
            key = key[len("model."):]
        if key.startswith("LRPBlock.") or ".LRPBlock." in key:
            continue
        if key.startswith("DenseNet."):
            key = key[len("DenseNet."):]
        cleaned[key] = value
    return convert_torchvision_state_dict(cleaned)


def resnet_state_dict(state_dict: Mapping[str, torch.Tensor]) -> "OrderedDict[str, torch.Tensor]":
    """The ResNet's own keys from ours (IsResNetFast), the authors' LRPResNet's or Lightning's state dicts.

    Drops the ``model.`` (Lightning) and ``resnet.`` (LRPResNet / IsResNetFast) prefixes, the LRP
    block's ``LRPBlock.*`` entries (aliases of the ResNet's parameters) and a Lightning module's
    ``Cweight``; a dropout classifier's ``fc.1.*`` becomes ``fc.*`` (dropout is off in eval).
    """
    cleaned = OrderedDict()
    for key, value in state_dict.items():
        if key.startswith("model."):
            key = key[len("model."):]
        if key.startswith("LRPBlock.") or ".LRPBlock." in key or key == "Cweight":
            continue
        if key.startswith("resnet."):
            key = key[len("resnet."):]
        if key in ("fc.1.weight", "fc.1.bias"):
            key = "fc." + key.split(".")[-1]
        cleaned[key] = value
    return cleaned


def infer_densenet_config(state_dict: Mapping[str, torch.Tensor]) -> Optional[Dict[str, Any]]:
    """The DenseNet configuration a (cleaned) state dict's shapes fit, or None if they do not tell."""
    try:
        blocks = []
        b = 1
        while f"features.denseblock{b}.denselayer1.conv2.weight" in state_dict:
            n_layers = 1
            while f"features.denseblock{b}.denselayer{n_layers + 1}.conv2.weight" in state_dict:
                n_layers += 1
            blocks.append(n_layers)
            b += 1
        conv2 = state_dict["features.denseblock1.denselayer1.conv2.weight"]
        conv1 = state_dict["features.denseblock1.denselayer1.conv1.weight"]
        growth = conv2.shape[0]
        return {
            "growth_rate": int(growth),
            "block_config": blocks,
            "num_init_features": int(state_dict["features.conv0.weight"].shape[0]),
            "bn_size": int(conv1.shape[0] // growth),
            "drop_rate": 0.0,
            "num_classes": int(state_dict["classifier.weight"].shape[0]),
            "classifier_dropout": None,
        }
    except (KeyError, IndexError, AttributeError):
        return None


def _suggestion(state_dict: Mapping[str, torch.Tensor]) -> str:
    """Which options fit a checkpoint's weights (its state dict as stored), a DenseNet's or a ResNet's."""
    resnet = infer_resnet_config(resnet_state_dict(state_dict))
    if resnet is not None:
        name = known_resnet_name(resnet)
        if name is not None:
            return f"its weights fit --arch {name} --classes {resnet['num_classes']}"
        return (f"its weights fit none of {', '.join(RESNET_ARCHITECTURES)} ({resnet['block']} blocks, layers "
                f"{'-'.join(map(str, resnet['layers']))}, widths {'-'.join(map(str, resnet['widths']))}, stem "
                f"width {resnet['stem_width']}, {resnet['num_classes']} classes)")
    config = infer_densenet_config(densenet_state_dict(state_dict))
    if config is None:
        return "the checkpoint's keys look like neither a DenseNet's nor a ResNet's"
    shape = (config["growth_rate"], tuple(config["block_config"]), config["num_init_features"])
    for name, known in _KNOWN_CONFIGS.items():
        if known == shape and config["bn_size"] == 4:
            return f"its weights fit --arch {name} --classes {config['num_classes']}"
    return (f"its weights fit none of {', '.join(DENSENET_ARCHITECTURES)} (growth {shape[0]}, blocks "
            f"{'-'.join(map(str, shape[1]))}, {shape[2]} initial features, {config['num_classes']} classes)")


def _mismatches(model: nn.Module, state_dict: Mapping[str, torch.Tensor]) -> List[str]:
    expected = model.state_dict()
    problems = []
    for key, value in expected.items():
        if key not in state_dict:
            problems.append(f"{key} missing")
        elif tuple(state_dict[key].shape) != tuple(value.shape):
            problems.append(f"{key}: checkpoint {tuple(state_dict[key].shape)} vs model {tuple(value.shape)}")
    problems.extend(f"{key} unexpected" for key in state_dict if key not in expected)
    return problems


def _read_checkpoint(path: str) -> Mapping[str, Any]:
    if not Path(path).is_file():
        raise ExplainError(f"checkpoint {path} does not exist")
    try:
        checkpoint = load_checkpoint_file(path, map_location="cpu")  # says what is wrong with a broken file
    except ValueError as error:
        text = _first_line(error)
        if text.startswith(str(path)):  # the message names the file: once is enough
            text = "the file" + text[len(str(path)):]
        raise ExplainError(f"cannot read checkpoint {path}: {text}") from None
    except Exception as error:  # anything else torch raises: its first line, never its weights_only advice
        text = _first_line(error)
        raise ExplainError(f"cannot read checkpoint {path}: "
                           f"{text if 'weights_only' not in text else type(error).__name__}") from None
    state_dict = checkpoint.get("state_dict", checkpoint) if isinstance(checkpoint, Mapping) else None
    if not isinstance(state_dict, Mapping) or not all(torch.is_tensor(v) for v in state_dict.values()):
        raise ExplainError(f"checkpoint {path} holds no state dict (expected a dict of tensors or "
                           "{'state_dict': ...})")
    return checkpoint


def load_explained_model(checkpoint_path: str, arch: Optional[str] = None, classes: Optional[int] = None,
                         e: float = 1e-2,
                         Zb: bool = True) -> Tuple[Union[IsDenseFast, IsResNetFast], Mapping[str, Any]]:
    """An IsDenseFast (an IsResNetFast for a ResNet) in eval mode with the checkpoint's weights, and
    the checkpoint.

    The network is ``arch`` (a DenseNet or ResNet name) with ``classes`` outputs (default: as many
    as the checkpoint's classifier) or, without ``arch``, the configuration the checkpoint recorded
    (``densenet_config`` or ``resnet_config``). Raises :class:`ExplainError` naming the keys that
    do not fit, and the options that would.
    """
    checkpoint = _read_checkpoint(checkpoint_path)
    stored = checkpoint.get("state_dict", checkpoint)
    if arch is not None and arch not in ARCHITECTURES:
        raise ExplainError(f"unknown --arch {arch!r}; choose one of {', '.join(ARCHITECTURES)}")
    records = {key for key in ("densenet_config", "resnet_config") if isinstance(checkpoint.get(key), Mapping)}
    wants_resnet = arch in RESNET_ARCHITECTURES if arch is not None else "resnet_config" in records
    if wants_resnet:
        state_dict = resnet_state_dict(stored)
        inferred, classifier_key = infer_resnet_config(state_dict), "fc.weight"
    else:
        state_dict = densenet_state_dict(stored)
        inferred, classifier_key = infer_densenet_config(state_dict), "classifier.weight"
    if arch is not None:
        if classes is None:
            if inferred is None:
                other = infer_densenet_config(densenet_state_dict(stored)) if wants_resnet else \
                    infer_resnet_config(resnet_state_dict(stored))
                if other is not None:
                    family = "DenseNet" if wants_resnet else "ResNet"
                    raise ExplainError(f"checkpoint {checkpoint_path} holds a {family}'s weights, which do not fit "
                                       f"--arch {arch}: {_suggestion(stored)}")
                raise ExplainError(f"checkpoint {checkpoint_path} has no {classifier_key} to count the "
                                   "classes from; pass --classes")
            classes = inferred["num_classes"]
        network = ARCHITECTURES[arch](num_classes=classes)
        described = f"--arch {arch} --classes {classes}"
    elif "resnet_config" in records:
        config = dict(checkpoint["resnet_config"], dropout=None)  # dropout is off in eval anyway
        if classes is not None:
            config["num_classes"] = classes
        network = build_resnet(config)
        described = "the ResNet configuration saved in the checkpoint"
        if classes is not None:
            described += f" with --classes {classes}"
    elif "densenet_config" in records:
        config = dict(checkpoint["densenet_config"], classifier_dropout=None)  # dropout is off in eval anyway
        if classes is not None:
            config["num_classes"] = classes
        network = build_densenet(config)
        described = "the DenseNet configuration saved in the checkpoint"
        if classes is not None:
            described += f" with --classes {classes}"
    else:
        raise ExplainError(f"checkpoint {checkpoint_path} does not record its architecture; pass --arch "
                           f"({'/'.join(ARCHITECTURES)}) and --classes: {_suggestion(stored)}")

    problems = _mismatches(network, state_dict)
    if problems:
        shown = "; ".join(problems[:3]) + (f"; and {len(problems) - 3} more" if len(problems) > 3 else "")
        advice = _suggestion(stored)
        if arch is not None and records:
            advice = f"the checkpoint records its architecture: leave out --arch ({advice})"
        raise ExplainError(f"checkpoint {checkpoint_path} does not fit {described}: {len(problems)} key(s) differ "
                           f"({shown}); {advice}")
    network.load_state_dict(state_dict)
    return wrap_network(network, e=e, Zb=Zb).eval(), checkpoint


# ----------------------------------------------------------------------------- images


def read_image(path: str, size: Optional[Tuple[int, int]] = None) -> torch.Tensor:
    """An image file as a ``3 x H x W`` float tensor in [0, 1] (RGB), resized to ``size`` (H, W) if given."""
    try:
        from PIL import Image, UnidentifiedImageError
    except ImportError as error:
        raise ExplainError("reading images needs Pillow; install it with: pip install isnet-fast[demo]") from error
    if not Path(path).is_file():
        raise ExplainError(f"image {path} does not exist")
    try:
        with Image.open(path) as image:
            image = image.convert("RGB")
            if size is not None:
                image = image.resize((size[1], size[0]), Image.BILINEAR)
            pixels = np.asarray(image, dtype=np.float32) / 255.0
    except (UnidentifiedImageError, OSError, ValueError) as error:
        raise ExplainError(f"cannot read image {path}: {_first_line(error)}") from error
    return torch.from_numpy(pixels.copy()).permute(2, 0, 1)


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__


# ----------------------------------------------------------------------------- command


EXPLAIN_DESCRIPTION = """\
Writes LRP heatmaps (ISNet's epsilon and z^B rules) of each image as PNGs: the image beside
the heatmap of its top class, of --class K, or of every class (--all-classes). Red is relevance
for the class, blue against it.

Checkpoints written by isnet-fast's training helpers (e.g. by `isnet-fast demo`) record their
architecture, a DenseNet's or a ResNet's. For the original ISNet's checkpoints (IsDense, the
authors' LRPResNet or Lightning state dicts) pass --arch (densenet121, ..., resnet18, ...) and, if
the classifier differs, --classes; without --arch the error names the one that fits.
"""



def _size(text: str) -> Tuple[int, int]:
    """``N`` (square) or ``HxW``."""
    parts = text.lower().split("x")
    try:
        values = [int(part) for part in parts]
    except ValueError:
        values = []
    if len(values) not in (1, 2) or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected a size N or HxW in pixels, got {text!r}")
    return (values[0], values[-1])


def add_explain_parser(subparsers) -> argparse.ArgumentParser:
    """Adds ``explain`` to an argparse subparsers object; its handler is :func:`run_explain`."""
    parser = subparsers.add_parser("explain", help="write LRP heatmap PNGs of images for a checkpoint",
                                   description=EXPLAIN_DESCRIPTION,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.set_defaults(handler=run_explain, subparser=parser)
    parser.add_argument("images", nargs="+", metavar="IMAGE", help="image files (any format Pillow reads)")
    parser.add_argument("--checkpoint", required=True, metavar="CKPT",
                        help="our training checkpoint, or the original's IsDense / LRPResNet / Lightning "
                             "state dict")
    parser.add_argument("--out", default="isnet-heatmaps", metavar="DIR",
                        help="folder for the PNGs (default ./isnet-heatmaps)")
    parser.add_argument("--arch", choices=tuple(ARCHITECTURES),
                        help="the DenseNet or ResNet (default: the configuration our checkpoints record; "
                             "needed for the original's and the authors' LRPResNet checkpoints)")
    parser.add_argument("--classes", type=positive_int,
                        help="number of classes (default: the checkpoint's classifier)")
    parser.add_argument("--size", type=_size, metavar="N|HxW",
                        help="resize the images to this size (default: the size our checkpoint was trained "
                             "at, else each image's own)")
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--class", dest="class_index", type=int, metavar="K",
                       help="explain class K (0-based) instead of the top class")
    which.add_argument("--all-classes", action="store_true", help="one heatmap per class")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default cpu)")
    parser.add_argument("--e", type=float,
                        help="LRP epsilon (default: the one our checkpoint was trained with, else 0.01 as the "
                             "original)")
    parser.add_argument("--zb", action=argparse.BooleanOptionalAction, default=None,
                        help="the z^B rule at the input layer, or with --no-zb the epsilon rule (default: as our "
                             "checkpoint was trained, else z^B as the original)")
    return parser


def run_explain(args: argparse.Namespace, parser: Optional[argparse.ArgumentParser] = None) -> int:
    """Runs ``isnet-fast explain``; returns the exit code (2 with a one-line message on bad input)."""
    try:
        written = explain_images(args)
    except ExplainError as error:
        sys.stderr.write(f"isnet-fast explain: error: {error}\n")
        return 2
    for line in written:
        print(line)
    return 0


def explain_images(args: argparse.Namespace) -> List[str]:
    """Does the work of :func:`run_explain`; returns a settings line, then one summary line per image."""
    try:
        device = resolve_device(args.device)
    except ValueError as error:
        raise ExplainError(f"--device: {_first_line(error)}") from error
    model, checkpoint = load_explained_model(args.checkpoint, args.arch, args.classes)
    # LRP settings: the options, else those the checkpoint was trained with, else the original's.
    trained_with = checkpoint.get("isdensefast") if isinstance(checkpoint.get("isdensefast"), Mapping) else {}
    try:
        model.e = args.e if args.e is not None else float(trained_with.get("e", 1e-2))
    except (TypeError, ValueError) as error:
        raise ExplainError(f"--e: {_first_line(error)}") from None
    model.Zb = args.zb if args.zb is not None else bool(trained_with.get("Zb", True))
    n_classes = classifier_outputs(model)
    if args.class_index is not None and not 0 <= args.class_index < n_classes:
        raise ExplainError(f"--class {args.class_index} is out of range: the model has {n_classes} classes "
                           f"(0 to {n_classes - 1})")
    size = args.size
    if size is None and args.arch is None and checkpoint.get("image_size") is not None:
        size = tuple(int(s) for s in checkpoint["image_size"])
    # Read every image before the first heatmap, so a bad path fails at once.
    images = [read_image(path, size) for path in args.images]
    # A ResNet's padded, strided convolutions and pools keep a pixel of any input; a DenseNet's
    # unpadded poolings need a minimum size.
    smallest = 1 if is_resnet(model) else minimum_input_size(build_plan(model.DenseNet, model.reference_pairing))
    for path, image in zip(args.images, images):
        height, width = image.shape[-2:]
        if min(height, width) < smallest:
            raise ExplainError(f"image {path} is {height}x{width} pixels, too small for this DenseNet: every side "
                               f"must be at least {smallest}; resize it, e.g. with --size {max(smallest, 32)}")
    names = _output_stems(args.images)
    model = model.to(device)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    lines = [f"LRP with e={model.e:g} and the {'z^B' if model.Zb else 'epsilon'} rule at the input; "
             f"{n_classes} classes; images at {tuple(images[0].shape[-2:]) if size else 'their own size'}"]
    for path, stem, image in zip(args.images, names, images):
        try:
            with torch.no_grad():
                logits, heatmaps = model(image[None].to(device))
        except (TypeError, ValueError) as error:  # the model's input checks: one line, as every other error
            raise ExplainError(f"image {path}: {_first_line(error)}") from None
        logits, heatmaps = logits[0].cpu(), heatmaps[0].cpu()
        top = int(logits.argmax())
        if args.all_classes:
            chosen: Sequence[int] = range(n_classes)
        else:
            chosen = [top if args.class_index is None else args.class_index]
        written = []
        for k in chosen:
            target = out / f"{stem}_class{k}.png"
            _write_explanation(target, image, heatmaps[k], k, float(logits[k]), top)
            written.append(str(target))
        lines.append(f"{path}: top class {top} (logit {float(logits[top]):.3f}) -> {', '.join(written)}")
    return lines


def _output_stems(paths: Sequence[str]) -> List[str]:
    """File stems for the PNGs, numbered where two images share a name."""
    stems = [Path(path).stem for path in paths]
    repeated = {stem for stem in stems if stems.count(stem) > 1}
    return [f"{i}_{stem}" if stem in repeated else stem for i, stem in enumerate(stems)]


def _write_explanation(target: Path, image: torch.Tensor, heatmap: torch.Tensor, k: int, logit: float,
                       top: int) -> None:
    figure = new_figure(6, 3.2)
    image_axes, heat_axes = figure.subplots(1, 2)
    draw_image(image_axes, image, "input")
    suffix = " (top)" if k == top else ""
    draw_heatmap(heat_axes, heatmap, f"class {k}{suffix}: logit {logit:.3f}")
    figure.savefig(target)
