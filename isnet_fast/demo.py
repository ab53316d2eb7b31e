"""``isnet-fast demo``: a plain DenseNet and an ISNet on digits with a class-coloured marker.

Both networks (the same small DenseNet, from the same initial weights) learn from the biased
digits of :mod:`isnet_fast.data`, where a coloured square beside each digit names its class.
The plain one is trained on the classification loss alone (P = 0); the ISNet adds the heatmap
loss (P > 0), which penalises relevance outside the digit's square. Both are then tested on
the biased test set, without markers, and with each marker of another class, and their
heatmaps (LRP, through IsDenseFast) are scored by the share of positive relevance on the digit.

``--variant`` picks how the ISNet is trained: the Original ISNet (one heatmap per class, the
default), the Selective ISNet (``selective=True, explain="lowest"``) or the Stochastic ISNet
(``explain="random"``); several variants train the plain model once and one ISNet each. Every
model is scored on its top class's logit heatmap, so the figures compare across variants.

Everything runs on the CPU in minutes; ``--quick`` is a seconds-long smoke test.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Dict, Optional, Sequence

import torch

from .argtypes import positive_int
from .devices import resolve_device
from . import __version__
from .data import MARKER_COLOUR_NAMES, MARKER_COLOURS, TEST_VARIANTS, make_biased_digits
from .explain import ExplainError, draw_heatmap, draw_image, new_figure, relevance_inside_mask
from .model import IsDenseFast
from .training import TrainConfig, build_densenet, evaluate, train

__all__ = ["DEFAULT_SETTINGS", "ISNET_VARIANTS", "QUICK_SETTINGS", "DemoSettings", "add_demo_parser", "model_name",
           "run_demo", "run_experiment"]

@dataclasses.dataclass(frozen=True)
class DemoSettings:
    """What the demo builds and how it trains (the models share all but ``P`` and the ISNet variant).

    The defaults were tuned on this task to fit the CPU budget (about 3 minutes on 2 threads):
    a 32x32 canvas costs a quarter of a 64x64 one per epoch; with P = 0.3 or lr = 5e-3 the ISNet
    learned the digits more slowly (0.79 to 0.85 test accuracy after 40 epochs, against 0.87).
    """

    canvas_size: int = 32
    digit_scale: int = 2
    marker_size: int = 4
    growth_rate: int = 8
    block_config: tuple = (2, 2, 2)
    num_init_features: int = 16
    bn_size: int = 2
    epochs: int = 40
    batch_size: int = 32
    optimizer: str = "adam"
    lr: float = 1e-2
    lr_schedule: str = "cosine"
    P: float = 0.2  # the ISNet's; the plain model has P = 0
    # The input layer's LRP rule for training and scoring: the epsilon rule (Zb=False) gives the
    # black background no relevance, so the heatmap loss acts on the marker alone. The z^B rule
    # also lends relevance to black pixels next to bright ones (its bounds, not the pixel,
    # carry it), a rim around every digit that the loss would fight; it is scored too.
    zb: bool = False
    heatmap_loss_kwargs: Dict[str, Any] = dataclasses.field(default_factory=dict)
    limit: Optional[int] = None  # digits kept from scikit-learn's 1797
    grid_images: int = 6
    heatmap_batch_size: int = 64

    def densenet_config(self) -> Dict[str, Any]:
        return {"growth_rate": self.growth_rate, "block_config": list(self.block_config),
                "num_init_features": self.num_init_features, "bn_size": self.bn_size, "drop_rate": 0.0,
                "num_classes": len(MARKER_COLOURS), "classifier_dropout": None}

    def train_config(self, P: float, seed: int, progress: bool) -> TrainConfig:
        return TrainConfig(epochs=self.epochs, batch_size=self.batch_size, P=P, optimizer=self.optimizer,
                           lr=self.lr, lr_schedule=self.lr_schedule,
                           heatmap_loss_kwargs=dict(self.heatmap_loss_kwargs), seed=seed,
                           progress=progress)


DEFAULT_SETTINGS = DemoSettings()
# Seconds, not minutes: a tiny network, a hundred digits, one epoch. Checks the plumbing only.
QUICK_SETTINGS = DemoSettings(growth_rate=4, block_config=(1, 1), num_init_features=8, epochs=1, limit=120,
                              grid_images=3)

# The ISNet variants the demo trains, as IsDenseFast settings (the maps the heatmap loss sees).
ISNET_VARIANTS: Dict[str, Dict[str, Any]] = {
    "original": {"explain": "all", "selective": False},     # the Original ISNet: one map per class
    "selective": {"explain": "lowest", "selective": True},  # the Selective ISNet, as its authors run it
    "stochastic": {"explain": "random", "selective": False},  # the Stochastic ISNet
}
VARIANT_TITLES = {"plain": "plain DenseNet", "original": "ISNet", "selective": "Selective ISNet",
                  "stochastic": "Stochastic ISNet"}
MODELS = ("plain", "isnet")  # the models of the default run (--variant original)
RULES = ("epsilon", "zb")  # LRP rules at the input layer
RULE_NAMES = {"epsilon": "epsilon rule at the input (Zb=False)", "zb": "z^B rule at the input (Zb=True)"}


def model_name(variant: str) -> str:
    """The name of the model trained as ``variant`` (files and results keys): "isnet" for the
    Original ISNet, as before the variants, else "isnet-<variant>"."""
    return "isnet" if variant == "original" else f"isnet-{variant}"


def run_experiment(settings: DemoSettings, out: Path, seed: int = 0, device: str = "cpu",
                   progress: bool = True, log=None, variants: Sequence[str] = ("original",)) -> Dict[str, Any]:
    """Trains the plain model and one ISNet per variant, evaluates them, writes checkpoints, logs,
    the PNG grid and ``results.json``.

    ``variants``: names in :data:`ISNET_VARIANTS` ("original", "selective", "stochastic"); each
    ISNet starts from the same initial weights as the plain model. ``log(message)`` receives
    progress lines (default: stderr). Returns the results record. Torch's global random state
    is left as it was.
    """
    log = log or (lambda message: sys.stderr.write(message + "\n"))
    variants = list(dict.fromkeys(variants))  # in order, once each
    unknown = [variant for variant in variants if variant not in ISNET_VARIANTS]
    if unknown or not variants:
        raise ValueError(f"variants must be some of {tuple(ISNET_VARIANTS)}, got {variants!r}")
    started = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    data = make_biased_digits(seed, canvas_size=settings.canvas_size, digit_scale=settings.digit_scale,
                              marker_size=settings.marker_size, limit=settings.limit)
    train_set = data["train"]
    log(f"biased digits: {len(train_set)} training and {len(data['biased'])} test images of "
        f"{settings.canvas_size}x{settings.canvas_size}")

    plan = [("plain", "plain")] + [(model_name(variant), variant) for variant in variants]
    models: Dict[str, IsDenseFast] = {}
    seconds: Dict[str, float] = {}
    seconds_per_epoch: Dict[str, float] = {}
    described: Dict[str, Dict[str, Any]] = {}
    for name, variant in plan:
        P = 0.0 if variant == "plain" else settings.P
        lrp = ISNET_VARIANTS.get(variant, ISNET_VARIANTS["original"])  # the plain model makes no maps in training
        # Same initial weights for all: the only differences are the heatmap loss and its maps.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = IsDenseFast(build_densenet(settings.densenet_config()), Zb=settings.zb, **lrp).to(device)
        what = "plain DenseNet (P=0)" if variant == "plain" else f"{VARIANT_TITLES[variant]} (P={P:g})"
        log(f"training the {what} for {settings.epochs} epoch{'s' if settings.epochs != 1 else ''}")
        model_started = time.perf_counter()
        # The Stochastic ISNet draws its classes from torch's global generator: seeded here (and
        # restored after), so each model's run is reproducible whatever ran before it.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            history = train(model, train_set.images, train_set.labels, train_set.masks,
                            settings.train_config(P, seed, progress), checkpoint_path=out / f"{name}.pt",
                            log_path=out / f"{name}-log.jsonl",
                            on_epoch_end=lambda record, name=name: log(_epoch_line(name, record)))
        seconds[name] = time.perf_counter() - model_started
        seconds_per_epoch[name] = statistics.median(r["seconds"] for r in history) if history else 0.0
        described[name] = {"variant": variant, "P": P,
                           "explain": None if variant == "plain" else lrp["explain"],
                           "selective": None if variant == "plain" else lrp["selective"]}
        models[name] = model.eval()

    accuracy = {name: {test: evaluate(model, data[test].images, data[test].labels) for test in TEST_VARIANTS}
                for name, model in models.items()}
    log("scoring the heatmaps")
    relevance = {rule: {} for rule in RULES}
    shown = {}
    for name, model in models.items():
        for rule in RULES:
            model.Zb = rule == "zb"
            relevance[rule][name] = {}
            for test in ("biased", "shuffled"):
                predictions, heatmaps = _top_class_heatmaps(model, data[test].images, settings.heatmap_batch_size)
                relevance[rule][name][test] = relevance_inside_mask(heatmaps, data[test].masks).mean().item()
                if test == "shuffled" and model.Zb == settings.zb:
                    shown[name] = (predictions[:settings.grid_images], heatmaps[:settings.grid_images])
        model.Zb = settings.zb
    mask_area = data["biased"].masks[:, 0].mean().item()

    grid_path = out / "heatmaps.png"
    titles = {name: VARIANT_TITLES[info["variant"]] for name, info in described.items()}
    _write_grid(grid_path, data["shuffled"], shown, settings.grid_images, titles)
    results = {
        "isnet_fast_version": __version__,
        "seed": seed,
        "device": str(device),
        "torch_threads": torch.get_num_threads(),
        "machine": f"{platform.machine()}, {os.cpu_count()} logical CPUs",
        "settings": dataclasses.asdict(settings),
        "variants": variants,
        # Per model: its variant ("plain", or the ISNet's), P and the IsDenseFast settings it trained with.
        "models": described,
        "accuracy": accuracy,
        # Mean share of the top class's positive relevance inside the digit's square, by the LRP
        # rule at the input layer ("epsilon" or "zb"), model and test set. Always the heatmap of
        # the top class's logit, whatever maps a model trained with, so the models compare.
        "relevance_inside_mask": relevance,
        "relevance_rules": RULE_NAMES,
        "isnet_trained_with_rule": "zb" if settings.zb else "epsilon",
        "mask_area_fraction": mask_area,
        "train_seconds": seconds,
        # Median wall time of a training epoch: robust to the first epoch's warm-up and to a busy
        # machine's outliers (the per-epoch logs hold each one).
        "seconds_per_epoch": seconds_per_epoch,
        "wall_seconds": time.perf_counter() - started,
        "files": {"grid": str(grid_path), "checkpoints": {name: str(out / f"{name}.pt") for name in models},
                  "logs": {name: str(out / f"{name}-log.jsonl") for name in models}},
    }
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    return results


def _epoch_line(name: str, record: Dict[str, Any]) -> str:
    return (f"  {name} epoch {record['epoch']}: loss {record['loss']:.4f} (classification "
            f"{record['classification_loss']:.4f}, heatmap {record['heatmap_loss']:.4f}), training accuracy "
            f"{record['accuracy']:.3f}, {record['seconds']:.1f} s")


@torch.no_grad()
def _top_class_heatmaps(model: IsDenseFast, images: torch.Tensor, batch_size: int):
    """Predicted classes and the heatmap of each image's predicted class's logit (``N x 3 x H x W``,
    on the CPU), whichever variant the model trained as (its settings are restored after)."""
    device = next(model.parameters()).device
    predictions, heatmaps = [], []
    explain, selective = model.explain, model.selective
    model.selective = False  # valid with every explain mode; then the top logit's one map
    model.explain = "top"
    try:
        for start in range(0, len(images), batch_size):
            logits, maps = model(images[start:start + batch_size].to(device))
            predictions.append(logits.argmax(1).cpu())
            heatmaps.append(maps[:, 0].cpu())
    finally:
        model.explain = explain
        model.selective = selective
    return torch.cat(predictions), torch.cat(heatmaps)


def _write_grid(path: Path, test_set, shown: Dict[str, Any], n_images: int,
                titles: Optional[Dict[str, str]] = None) -> None:
    """Columns: shuffled-marker test images; rows: the image, then each model's heatmaps (plain first)."""
    titles = titles or {"plain": "plain DenseNet", "isnet": "ISNet"}
    names = list(shown)
    n_images = min(n_images, len(test_set))
    figure = new_figure(1.8 * n_images + 0.6, 2.35 * (len(names) + 1))
    axes = figure.subplots(len(names) + 1, n_images, squeeze=False)
    for column in range(n_images):
        label = int(test_set.labels[column])
        marker = int(test_set.marker_classes[column])
        draw_image(axes[0][column], test_set.images[column], f"digit {label}\n{MARKER_COLOUR_NAMES[marker]} marker "
                                                             f"(class {marker})")
        for row, name in enumerate(names, start=1):
            predictions, heatmaps = shown[name]
            predicted = int(predictions[column])
            verdict = "right" if predicted == label else ("marker's class" if predicted == marker else "wrong")
            inside = relevance_inside_mask(heatmaps[column:column + 1], test_set.masks[column:column + 1]).item()
            draw_heatmap(axes[row][column], heatmaps[column],
                         f"predicts {predicted} ({verdict})\n{inside:.0%} on digit")
            # The digit's square, the region the heatmap loss asks relevance to stay in.
            axes[row][column].contour(test_set.masks[column, 0].numpy(), levels=[0.5], colors="black",
                                      linewidths=0.7, linestyles="dashed")
    axes[0][0].set_ylabel("shuffled-marker\ntest image", fontsize=9)
    for row, name in enumerate(names, start=1):
        axes[row][0].set_ylabel(f"{titles.get(name, name)}\nheatmap", fontsize=9)
    figure.suptitle("Test digits whose marker names another class, and top-class LRP heatmaps\n"
                    "(red: for the class, blue: against; dashed: the digit's square)", fontsize=9)
    figure.savefig(path)


def format_results(results: Dict[str, Any]) -> str:
    """The accuracy, heatmap and timing table the command prints."""
    epsilon, zb = (results["relevance_inside_mask"][rule] for rule in RULES)
    models = results.get("models") or {"plain": {"variant": "plain"}, "isnet": {"variant": "original"}}
    per_epoch = results.get("seconds_per_epoch", {})
    lines = [f"{'':<16}{'':<12}{'test accuracy':^30}   relevance on digit (shuffled)",
             f"{'model':<16}{'variant':<12}{'biased':>9}{'no marker':>11}{'shuffled':>10}   {'epsilon rule':>14}"
             f"{'z^B rule':>10}{'s/epoch':>10}"]
    for name, info in models.items():
        title = "plain DenseNet" if info["variant"] == "plain" else f"ISNet (P={results['settings']['P']:g})"
        variant = "-" if info["variant"] == "plain" else info["variant"]
        acc = results["accuracy"][name]
        seconds = f"{per_epoch[name]:>10.2f}" if name in per_epoch else f"{'':>10}"
        lines.append(f"{title:<16}{variant:<12}{acc['biased']:>9.3f}{acc['no_marker']:>11.3f}"
                     f"{acc['shuffled']:>10.3f}   {epsilon[name]['shuffled']:>14.3f}{zb[name]['shuffled']:>10.3f}"
                     f"{seconds}")
    lines.append(f"10 classes: chance is 0.1. Relevance on digit: the share of the top class's positive LRP\n"
                 f"relevance inside the digit's square ({results['mask_area_fraction']:.0%} of the image), with the "
                 f"epsilon or the z^B rule\nat the input layer; the ISNet's heatmap loss used the "
                 f"{'z^B' if results['settings']['zb'] else 'epsilon'} rule. Variants: original (a map per class), "
                 f"selective\n(the selective quantity of the lowest logit), stochastic (one randomly drawn logit); "
                 f"all scored\non the top class's logit. s/epoch: median seconds per training epoch.")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- command


DEMO_DESCRIPTION = """\
Trains a plain DenseNet and an ISNet (the same small DenseNet plus ISNet's heatmap loss) on
scikit-learn's digits, each pasted beside a coloured square whose colour names the class in
the training set. Prints each model's accuracy on test digits with that marker, without it,
and with the marker of another class, how much of its positive LRP relevance (the top class's)
lies on the digit, and its seconds per training epoch. --variant trains the ISNet as the
Original (a heatmap per class), the Selective or the Stochastic ISNet, or several of them
(e.g. --variant original selective stochastic). Writes checkpoints, per-epoch logs,
results.json and heatmaps.png to --out.
Needs scikit-learn and matplotlib (pip install isnet-fast[demo]).
"""



def add_demo_parser(subparsers) -> argparse.ArgumentParser:
    """Adds ``demo`` to an argparse subparsers object; its handler is :func:`run_demo`."""
    parser = subparsers.add_parser("demo", help="train a plain DenseNet and an ISNet on biased digits (CPU, minutes)",
                                   description=DEMO_DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.set_defaults(handler=run_demo, subparser=parser)
    parser.add_argument("--out", default="isnet-demo", metavar="DIR",
                        help="folder for the results (default ./isnet-demo)")
    parser.add_argument("--epochs", type=positive_int,
                        help=f"epochs for each model (default {DEFAULT_SETTINGS.epochs}; "
                             f"{QUICK_SETTINGS.epochs} with --quick)")
    parser.add_argument("--seed", type=int, default=0, help="data split, markers and initial weights (default 0)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default cpu)")
    parser.add_argument("--threads", type=positive_int, help="torch.set_num_threads for the CPU (default: torch's)")
    parser.add_argument("--quick", action="store_true",
                        help="a smoke test in seconds (tiny network, 120 digits, one epoch): checks the "
                             "plumbing, says nothing about ISNet")
    parser.add_argument("--variant", dest="variants", nargs="+", choices=tuple(ISNET_VARIANTS),
                        default=["original"], metavar="VARIANT",
                        help="how the ISNet trains: original (one heatmap per class, the default), selective "
                             "(the Selective ISNet: selective=True, explain='lowest') or stochastic (the "
                             "Stochastic ISNet: explain='random'); several train one ISNet each beside one "
                             "plain DenseNet")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    return parser


def run_demo(args: argparse.Namespace, parser: Optional[argparse.ArgumentParser] = None) -> int:
    """Runs ``isnet-fast demo``; returns the exit code (2 with a one-line message on bad input)."""
    settings = QUICK_SETTINGS if args.quick else DEFAULT_SETTINGS
    if args.epochs is not None:
        settings = dataclasses.replace(settings, epochs=args.epochs)
    try:
        device = resolve_device(args.device)
    except ValueError as error:
        return _fail(f"--device: {error}")
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        results = run_experiment(settings, Path(args.out), seed=args.seed, device=device,
                                 progress=not args.no_progress,
                                 variants=getattr(args, "variants", None) or ("original",))
    except (ImportError, ExplainError) as error:  # scikit-learn or matplotlib missing
        return _fail(str(error))
    print(format_results(results))
    print(f"wrote {results['files']['grid']} and {Path(args.out) / 'results.json'} "
          f"({results['wall_seconds']:.0f} s)")
    return 0


def _fail(message: str) -> int:
    sys.stderr.write(f"isnet-fast demo: error: {message}\n")
    return 2


def main(argv=None) -> int:
    """``python -m isnet_fast.demo [options]``: the demo without the ``isnet-fast`` entry point."""
    parser = argparse.ArgumentParser(prog="python -m isnet_fast")
    add_demo_parser(parser.add_subparsers(dest="command", required=True))
    return run_demo(parser.parse_args(["demo", *(sys.argv[1:] if argv is None else argv)]))


if __name__ == "__main__":
    sys.exit(main())
