"""The ``isnet-fast`` command line.

Subcommands: ``bench`` (speed and memory of IsDenseFast and its variants against the gradient
floors, a plain training step, the original ISNet code and the authors' Selective ISNet), ``demo`` (an ISNet that learns to ignore a background shortcut) and
``explain`` (heatmap PNGs for images). Each subcommand adds its parser in an ``_add_<name>_parser`` function and
sets ``handler``, a function of the parsed arguments returning the exit code.

Exit codes: 0 success, 1 a measurement failed, 2 bad options (argparse's convention).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
import warnings
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch

from .argtypes import non_negative_int, positive_int
from . import __version__
from . import benchmark as bm
from .demo import add_demo_parser
from .explain import add_explain_parser

SWEEP_AXES = ("classes", "batch", "size")
# Values a sweep takes when --sweep-values is not given.
DEFAULT_SWEEP_VALUES = {
    "cpu": {"classes": (1, 2, 4, 8, 16), "batch": (1, 2, 4, 8), "size": (64, 128, 224, 320)},
    "cuda": {"classes": (1, 2, 4, 8, 16, 32), "batch": (1, 2, 4, 8, 16, 32), "size": (128, 224, 320, 448)},
}


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    arguments = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(arguments)
    args.command_line = shlex.join(["isnet-fast", *arguments])
    try:
        return args.handler(args, args.subparser)
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="isnet-fast", description="isnet-fast: a fast, exact drop-in for ISNet's DenseNet LRP block.")
    parser.add_argument("--version", action="version", version=f"isnet-fast {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    _add_bench_parser(subparsers)
    add_demo_parser(subparsers)
    add_explain_parser(subparsers)
    return parser


# ----------------------------------------------------------------------------- bench




BENCH_DESCRIPTION = """\
Times IsDenseFast on synthetic images with random weights, next to the floors (plain autograd
gradients w.r.t. the input, one per map), a plain DenseNet training step and, given the authors'
code (--reference), the original IsDense and the authors' Selective ISNet (for a ResNet, --arch
resnet50 etc.: IsResNetFast next to the authors' LRPResNet of code/, with one map per class as the
original and as their Selective ISNet). Cases: explain
(forward + heatmaps, no grad, eval mode), train (forward, heatmaps, 0.3 * cross-entropy + 0.7 *
heatmap loss, backward, SGD step, train mode), their floors, and train-plain (forward,
cross-entropy, backward, SGD: no heatmaps). Without options it runs a default sized for the
device found. All ratios are taken within this run.

Variants of ours: --explain picks which maps IsDenseFast computes (all: one per class, the
original ISNet; top, lowest, random (Stochastic ISNet), sum: one map) and --selective whether it
explains the class-selective quantity; the Selective ISNet is --explain lowest --selective.
Each case is compared with the floor of its own number of maps (K for all, 1 for the one-map
variants). The original runs next to ours with all maps, the authors' Selective ISNet next to
ours Selective. --variants runs the standard comparison in one command: ours with all maps, ours
Selective, the original, the authors' Selective ISNet, the floors for K and 1 maps and
train-plain, for example

  isnet-fast bench --variants --reference /path/to/ISNet --classes 10
  isnet-fast bench --variants --reference /path/to/ISNet --sweep classes --sweep-values 2 10 40 \\
      --cases explain train --batch 1 --plot sweep.png

Columns: x floor (time over the floor with the same number of maps), x plain (a train case's
time over train-plain's), vs original (the original's time, K maps, over ours, any variant) and
vs authors' sel. (their Selective ISNet's time over ours Selective).

On the CPU each case runs in its own process, so that its peak RSS is its own; on CUDA peak
memory is torch.cuda.max_memory_allocated.
"""

SELECTIVE_CHOICES = {"off": (False,), "on": (True,), "both": (False, True)}


def _add_bench_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "bench", help="measure speed and memory against the floor and the original",
        description=BENCH_DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.set_defaults(handler=run_bench, subparser=parser)
    model = parser.add_argument_group("what to measure")
    model.add_argument("--arch", choices=bm.ARCHS, default="densenet121",
                       help="architecture (default densenet121): a DenseNet, or a ResNet (IsResNetFast, next to "
                            "the authors' LRPResNet of code/ as the original and Selective ISNet); 'tiny' and "
                            "'tiny-resnet' are smoke-test networks for checking the tooling, not for figures")
    model.add_argument("--batch", type=positive_int, help="images per batch (default: 2 on CPU, 8 on CUDA)")
    model.add_argument("--classes", type=positive_int, nargs="+", metavar="N",
                       help="number(s) of classes K (default: 2 on CPU, 2 10 on CUDA)")
    model.add_argument("--size", type=positive_int, help="image side in pixels (default 224)")
    model.add_argument("--dtype", choices=tuple(bm.DTYPES), default="float32",
                       help="weights and images (default float32; bfloat16 and float16 only on CUDA)")
    model.add_argument("--cases", nargs="+", choices=bm.CASES, default=list(bm.CASES), metavar="CASE",
                       help=f"subset of {', '.join(bm.CASES)} (default: all)")
    model.add_argument("--explain", nargs="+", choices=bm.EXPLAIN_MODES, metavar="MODE",
                       help=f"which maps IsDenseFast computes, one or more of {', '.join(bm.EXPLAIN_MODES)}: all "
                            "(one per class, the original ISNet; default), top / lowest (the argmax / argmin "
                            "logit's), random (Stochastic ISNet), sum (all logits in one map)")
    model.add_argument("--selective", nargs="?", const="on", choices=tuple(SELECTIVE_CHOICES), metavar="off|on|both",
                       help="explain the class-selective quantity: off (default), on (alone: --selective), or "
                            "both (each --explain mode with and without it; not for sum). The Selective ISNet is "
                            "--explain lowest --selective")
    model.add_argument("--variants", action="store_true",
                       help="the standard comparison: ours with all maps and ours Selective (selective lowest), "
                            "next to the original and the authors' Selective ISNet (with --reference), the floors "
                            "for K and 1 maps and train-plain (use instead of --explain/--selective)")
    model.add_argument("--backend", choices=bm.BACKENDS, default="auto",
                       help="IsDenseFast kernels: auto (Triton on CUDA, torch ops on CPU), torch or triton")
    model.add_argument("--reference", metavar="PATH",
                       help="the authors' code, to measure it too (default: $" + bm.REFERENCE_ENV + "): a checkout "
                            "of the ISNet repository (github.com/PedroRASB/ISNet; its backup/ holds the original, "
                            "its code/ the Selective ISNet), or its backup/ folder alone (the original only)")
    model.add_argument("--no-reference", action="store_true", help=f"do not measure the authors' code, even if "
                                                                   f"${bm.REFERENCE_ENV} is set")
    run = parser.add_argument_group("how to measure")
    run.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda if available, else cpu)")
    run.add_argument("--threads", type=positive_int, help="torch.set_num_threads on the CPU (default: torch's)")
    run.add_argument("--warmup", type=non_negative_int, help="untimed runs first (default: 1 on CPU, 3 on CUDA)")
    run.add_argument("--repeat", type=positive_int, help="timed runs; the median is reported "
                                                          "(default: 3 on CPU, 10 on CUDA)")
    run.add_argument("--rounds", type=positive_int, default=1,
                     help="measure every case this many times in turn (each time with its warm-up and "
                          "--repeat runs) and pool the runs, so that a machine whose speed drifts moves "
                          "every case alike (default 1)")
    sweep = parser.add_argument_group("sweeps")
    sweep.add_argument("--sweep", choices=SWEEP_AXES,
                       help="measure across values of classes, batch or size, to see how time and memory grow")
    sweep.add_argument("--sweep-values", type=positive_int, nargs="+", metavar="N",
                       help="the values to sweep (default: --classes when it lists several, else a ladder "
                            "for the device)")
    sweep.add_argument("--plot", metavar="FILE.png",
                       help="where the sweep's plot goes, one line per case and variant (default: "
                            "isnet-fast-sweep-<axis>.png; needs matplotlib)")
    output = parser.add_argument_group("output")
    output.add_argument("--json", metavar="FILE", help="also write every figure and the environment to FILE")


def run_bench(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    settings, classes, sweep_values, references = _validated_settings(args, parser)
    variants, notes = _variants(args, parser, classes)
    original = references.original if bm.ORIGINAL_VARIANT in variants else None
    selective_reference = references.selective_reference if bm.SELECTIVE_ISNET in variants else None
    notes += _reference_notes(args, references, variants)
    specs = _bench_specs(args, settings, classes, sweep_values, variants, original, selective_reference)
    device = torch.device(settings["device"])
    if device.type == "cpu" and args.threads:
        torch.set_num_threads(args.threads)
    loaded = {}
    if device.type == "cuda":  # CUDA cases run in this process
        try:
            if original:
                loaded["original"] = bm.load_reference_for("original", args.arch, original)
            if selective_reference:
                loaded["selective_reference"] = bm.load_reference_for("selective_reference", args.arch,
                                                                      selective_reference)
        except bm.ReferenceFolderError as error:
            parser.error(str(error))

    started = time.perf_counter()
    _progress(f"isnet-fast bench: {len(specs)} case(s), {_describe(settings, device, args.sweep)}"
              + ("; each case in its own process" if device.type == "cpu" else ""))
    rounds = [[] for _ in specs]  # each case's result in every round
    with warnings.catch_warnings():
        bm.silence_original_deprecation_warnings()
        for round_index in range(1, args.rounds + 1):
            in_round = f"round {round_index}/{args.rounds}, " if args.rounds > 1 else ""
            for index, spec in enumerate(specs, 1):
                axes = ", ".join(f"{axis} {getattr(spec, axis)}" for axis in _table_axes(args))
                _progress(f"[{in_round}{index}/{len(specs)}] {axes}: {spec.label} ...", end="")
                case_started = time.perf_counter()
                result = bm.measure(spec, loaded.get(spec.implementation))
                if result.error:
                    _progress(f" failed: {result.error}")
                else:
                    _progress(f" {result.median_s * 1e3:.1f} ms/batch ({time.perf_counter() - case_started:.0f} s)")
                rounds[index - 1].append(result)
    results = [bm.pool_rounds(case_rounds) for case_rounds in rounds]
    wall_time = time.perf_counter() - started
    _progress(f"done in {wall_time:.0f} s")

    comparisons = bm.compare(results)
    print(_header(settings, device, args))
    print(format_table(comparisons, _table_axes(args)))
    print(RATIO_LEGEND)
    spread_note = bm.spread_warning(results)
    if spread_note:
        print(spread_note, file=sys.stderr)
    plot_path = None
    if args.sweep:
        plot_path, plot_note = _write_sweep_plot(comparisons, args.sweep,
                                                 args.plot or f"isnet-fast-sweep-{args.sweep}.png",
                                                 title=_describe(settings, device, args.sweep))
        notes.append(plot_note)
    for note in notes:
        print(note)
    failed = [r for r in results if r.error]
    if args.json:
        record = {
            "command_line": args.command_line,
            "environment": bm.environment_info(device),
            "settings": dict(settings, rounds=args.rounds, classes=list(classes), cases=list(args.cases),
                             variants=[{"explain": e, "selective": s, "name": bm.variant_name(e, s)}
                                       for e, s in variants],
                             reference=original, selective_reference=selective_reference,
                             sweep=args.sweep, sweep_values=list(sweep_values) if sweep_values else None),
            "results": [bm.comparison_record(c) for c in comparisons],
            "wall_time_s": wall_time,
            "plot": plot_path,
            "notes": notes,
        }
        Path(args.json).write_text(json.dumps(record, indent=2) + "\n")
        _progress(f"wrote {args.json}")
    if failed:
        where = "the JSON output holds" if args.json else "rerun with --json FILE for"
        _progress(f"{len(failed)} case(s) failed; {where} their tracebacks")
        return 1
    return 0


RATIO_LEGEND = ("spread: (slowest - fastest) / median of the timed runs; "
                "x floor: time / the floor with the same maps per image (K for all maps, 1 for one map); "
                "x plain: time / train-plain; vs original: the original's time (K maps) / ours; "
                "vs authors' sel.: the authors' selective time / ours selective.")


def _variants(args, parser, classes):
    """The (explain, selective) variants of ours to run, and notes on any left out for some K."""
    if args.variants:
        if args.explain or args.selective:
            parser.error("--variants picks its own variants (ours with all maps, and selective lowest); "
                         "leave out --explain and --selective, or drop --variants")
        candidates = list(bm.STANDARD_VARIANTS)
    else:
        selective = args.selective or "off"
        explains = list(dict.fromkeys(args.explain or ["all"]))
        if selective == "on" and "sum" in explains:
            parser.error("--selective explains one class per map and cannot explain 'sum'; drop sum from "
                         "--explain or use --selective both")
        candidates = [(explain, flag) for explain in explains for flag in SELECTIVE_CHOICES[selective]
                      if not (flag and explain == "sum")]
    notes = []
    for explain, selective in candidates:
        left_out = [k for k in classes if not bm.variant_is_valid(explain, selective, k)]
        if len(left_out) == len(classes):
            try:
                bm.check_variant(explain, selective, classes[0])
            except (ValueError, TypeError) as error:
                parser.error(f"{bm.variant_name(explain, selective)}: {error}")
        if left_out:
            notes.append(f"{bm.variant_name(explain, selective)}: not run for {', '.join(map(str, left_out))} "
                         f"class(es) (it needs at least two).")
    return candidates, notes


def _reference_notes(args, references, variants) -> List[str]:
    """One line per reference implementation that was not measured, and why."""
    notes = []
    given = _reference_folder(args) is not None
    if bm.ORIGINAL_VARIANT in variants and references.original is None:
        notes.append(references.note if given and references.note else
                     f"original: not measured; pass --reference PATH or {bm.REFERENCE_HINT}.")
    if bm.SELECTIVE_ISNET in variants and references.selective_reference is None:
        notes.append(references.note if given and references.note else
                     f"authors' Selective ISNet: not measured; pass --reference PATH or {bm.SELECTIVE_REFERENCE_HINT}.")
    if references.original and bm.ORIGINAL_VARIANT not in variants:
        notes.append("original: not measured; it computes all maps: add --explain all (or use --variants).")
    if references.selective_reference and bm.SELECTIVE_ISNET not in variants:
        notes.append("authors' Selective ISNet: not measured; it is ours with --explain lowest --selective "
                     "(or use --variants).")
    return list(dict.fromkeys(notes))


def _validated_settings(args, parser):
    """The CaseSpec settings, the classes, the sweep values and the authors' code found
    (bm.ReferenceFolders); parser.error (exit 2) on bad options."""
    try:
        device = bm.resolve_device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    except ValueError as error:
        parser.error(str(error))
    device_name = str(device)
    if args.dtype in bm.CUDA_ONLY_DTYPES and device.type != "cuda":
        parser.error(f"--dtype {args.dtype} needs a CUDA device; on the CPU use float32 or float64")
    if args.backend == "triton" and device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        parser.error("--backend triton needs a CUDA device (or TRITON_INTERPRET=1 for Triton's slow CPU interpreter); "
                     "use --backend torch or auto on the CPU")
    defaults = bm.default_settings(device_name)
    classes = tuple(dict.fromkeys(args.classes or defaults["classes"]))  # in order, without repeats
    settings = dict(arch=args.arch, batch=args.batch or defaults["batch"], size=args.size or defaults["size"],
                    dtype=args.dtype, device=device_name, backend=args.backend,
                    threads=(args.threads or torch.get_num_threads()) if device.type == "cpu" else args.threads,
                    warmup=defaults["warmup"] if args.warmup is None else args.warmup,
                    repeat=args.repeat or defaults["repeat"])

    smallest = bm.minimum_image_size(args.arch)
    sweep_values = None
    if args.sweep_values and not args.sweep:
        parser.error("--sweep-values needs --sweep classes|batch|size")
    if args.plot and not args.sweep:
        parser.error("--plot needs --sweep classes|batch|size")
    if args.sweep:
        if args.sweep_values:
            sweep_values = tuple(dict.fromkeys(args.sweep_values))
        elif args.sweep == "classes" and args.classes and len(classes) > 1:
            sweep_values = classes
        else:
            ladder = DEFAULT_SWEEP_VALUES[device.type][args.sweep]
            sweep_values = tuple(v for v in ladder if args.sweep != "size" or v >= smallest)
        if args.sweep == "classes":
            classes = sweep_values
    sizes = sweep_values if args.sweep == "size" else (settings["size"],)
    if min(sizes) < smallest:
        parser.error(f"image size {min(sizes)} is too small for {args.arch}: every side must be at least "
                     f"{smallest} pixels")
    references = bm.ReferenceFolders(None, None)
    reference = _reference_folder(args)
    if reference is not None:
        source, folder = reference
        try:
            references = bm.find_references(folder)
        except bm.ReferenceFolderError as error:
            parser.error(f"{source}: {error}")
        if bm.is_resnet(args.arch):  # the authors' ResNet ISNet, both variants, is in code/ only
            code = references.selective_reference
            references = bm.ReferenceFolders(code, code, None if code else (
                f"{folder} has no code/ folder: the authors' ResNet ISNet (code/ISNetLayersZe.py) is not measured"))
    for option, path in (("--json", args.json), ("--plot", args.plot)):
        if path and Path(path).is_dir():
            parser.error(f"{option} {path}: that is a folder; name a file")
        if path and not Path(path).resolve().parent.is_dir():
            parser.error(f"{option} {path}: the folder {str(Path(path).parent)!r} does not exist")
    return settings, classes, sweep_values, references


def _reference_folder(args):
    """(where it was given, path) of the authors' code, or None when it is not to be measured."""
    if args.no_reference:
        return None
    if args.reference:
        return "--reference", args.reference
    if os.environ.get(bm.REFERENCE_ENV):
        return f"${bm.REFERENCE_ENV}", os.environ[bm.REFERENCE_ENV]
    return None


def _bench_specs(args, settings, classes, sweep_values, variants, original, selective_reference) -> List[bm.CaseSpec]:
    references = dict(variants=variants, original=original, selective_reference=selective_reference)
    if args.sweep in ("batch", "size"):
        specs = []
        for value in sweep_values:
            specs += bm.case_specs(args.cases, classes, **references, **dict(settings, **{args.sweep: value}))
        return specs
    return bm.case_specs(args.cases, classes, **references, **settings)


def _table_axes(args) -> List[str]:
    """The columns that tell the table's rows apart besides the case: classes, and the swept axis."""
    return ["classes"] if args.sweep in (None, "classes") else [args.sweep, "classes"]


def _describe(settings: Dict, device: torch.device, sweep: Optional[str]) -> str:
    """The fixed settings in words; a swept axis is named as swept, not by its base value."""
    threads = settings["threads"]
    threads = f", {threads} thread{'s' if threads != 1 else ''}" if device.type == "cpu" else ""
    parts = [settings["arch"],
             "batch swept" if sweep == "batch" else f"batch {settings['batch']}",
             "size swept" if sweep == "size" else f"{settings['size']}x{settings['size']}",
             settings["dtype"], f"{device} ({bm.device_name(device)}{threads})", f"backend {settings['backend']}"]
    if sweep == "classes":
        parts.append("classes swept")
    return ", ".join(parts)


def _header(settings: Dict, device: torch.device, args) -> str:
    if args.rounds > 1:
        how = (f"median of {settings['repeat'] * args.rounds} runs in {args.rounds} rounds, each case's "
               f"{settings['repeat']} after {settings['warmup']} warmup")
    else:
        how = f"median of {settings['repeat']} after {settings['warmup']} warmup"
    return f"{_describe(settings, device, args.sweep)}; {how}; torch {torch.__version__}"


def _progress(message: str, end: str = "\n") -> None:
    print(message, end=end, file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- output


def format_memory(n_bytes: Optional[int]) -> str:
    if n_bytes is None:
        return "-"
    mib = n_bytes / 2**20
    return f"{mib / 1024:.1f} GiB" if mib >= 10 * 1024 else f"{mib:.0f} MiB"


def _ratio(value: Optional[float], speedup: bool = False) -> str:
    if value is None:
        return "-"
    return f"{value:.2f}x" if speedup else f"{value:.2f}"


def format_table(comparisons: Sequence[bm.Comparison], axes: Sequence[str]) -> str:
    """A plain-text table: the axes, case (with its variant), ms per batch, images/s, peak memory,
    the ratios to the floor and to train-plain, and the speedups against the authors' code.

    The "x plain" and "vs authors' sel." columns appear when a row has train-plain or the authors'
    Selective ISNet to be compared with.
    """
    memory_kinds = {c.result.memory_kind for c in comparisons if c.result.memory_kind}
    memory_title = "peak RSS" if memory_kinds == {"peak RSS"} else (
        "peak CUDA mem" if memory_kinds == {"max_memory_allocated"} else "peak memory")
    with_plain = any(c.result.spec.case == "train-plain" for c in comparisons)
    with_selective = any(c.result.spec.implementation == "selective_reference" for c in comparisons)
    titles = [*axes, "case", "ms/batch", "spread", "images/s", memory_title, "x floor"]
    titles += ["x plain"] * with_plain + ["vs original"] + ["vs authors' sel."] * with_selective
    rows = []
    for comparison in comparisons:
        result = comparison.result
        cells = [str(getattr(result.spec, axis)) for axis in axes] + [result.spec.label]
        if result.error:
            cells += ["failed: " + result.error]
        else:
            cells += [f"{result.median_s * 1e3:.1f}", "-" if result.spread is None else f"{result.spread:.0%}",
                      f"{result.images_per_s:.2f}",
                      format_memory(result.peak_memory_bytes), _ratio(comparison.floor_ratio)]
            cells += [_ratio(comparison.plain_ratio)] * with_plain
            cells += [_ratio(comparison.speedup_vs_original, speedup=True)]
            cells += [_ratio(comparison.speedup_vs_selective_reference, speedup=True)] * with_selective
        rows.append(cells)
    left_aligned = set(range(len(axes), len(axes) + 1))  # the case names
    widths = [max([len(titles[i])] + [len(r[i]) for r in rows if len(r) > i and not r[i].startswith("failed")])
              for i in range(len(titles))]

    def line(cells):
        out = []
        for i, cell in enumerate(cells):
            if cell.startswith("failed"):
                out.append(cell)
                break
            out.append(cell.ljust(widths[i]) if i in left_aligned else cell.rjust(widths[i]))
        return "  ".join(out).rstrip()

    return "\n".join([line(titles)] + [line(r) for r in rows])


def _sweep_series(comparisons: Sequence[bm.Comparison], axis: str) -> Dict[str, List]:
    """The sweep's lines: one per case, implementation and variant (the table's label), each a
    list of (axis value, ms per batch, peak MiB); failed cases are left out."""
    series: Dict[str, List] = {}
    several_classes = len({c.result.spec.classes for c in comparisons}) > 1 and axis != "classes"
    for comparison in comparisons:
        result = comparison.result
        if result.error:
            continue
        name = result.spec.label + (f", {result.spec.classes} classes" if several_classes else "")
        series.setdefault(name, []).append((getattr(result.spec, axis), result.median_s * 1e3,
                                            (result.peak_memory_bytes or 0) / 2**20))
    return series


def _write_sweep_plot(comparisons: Sequence[bm.Comparison], axis: str, path: str, title: str):
    """Writes time and peak memory against the swept axis; returns (path or None, a note for the user)."""
    try:
        from matplotlib.figure import Figure
        from matplotlib.ticker import NullLocator
    except ImportError:
        return None, "matplotlib is not installed, so no plot was written (pip install matplotlib)."
    series = _sweep_series(comparisons, axis)
    figure = Figure(figsize=(12, 5), layout="constrained")
    time_axes, memory_axes = figure.subplots(1, 2)
    for index, (name, points) in enumerate(series.items()):
        xs, times, memories = zip(*points)
        # Ours solid, the authors' code dashed, floors and the plain step dotted.
        style = "--" if name.endswith(("(original)", "(authors' selective)")) else (
            ":" if "-floor" in name or "-plain" in name else "-")
        colour = f"C{index % 10}"
        time_axes.plot(xs, times, marker="o", linestyle=style, color=colour, label=name)
        memory_axes.plot(xs, memories, marker="o", linestyle=style, color=colour, label=name)
    values = sorted({getattr(c.result.spec, axis) for c in comparisons})
    all_times = [t for points in series.values() for _, t, _ in points]
    if all_times and min(all_times) > 0 and max(all_times) / min(all_times) > 20:
        time_axes.set_yscale("log")  # explain, train and the authors' code differ by orders of magnitude
    time_axes.set(xlabel=axis, ylabel="ms per batch", title="time per batch (median)", xticks=values)
    memory_kind = comparisons[0].result.memory_kind if comparisons else ""
    memory_axes.set(xlabel=axis, ylabel="MiB", title=memory_kind or "peak memory", xticks=values)
    if len(values) > 2 and values[-1] / values[0] > 10:  # 2, 10, 40 classes: spread them evenly
        for panel in (time_axes, memory_axes):
            panel.set_xscale("log")
            panel.set_xticks(values, [str(v) for v in values])
            panel.xaxis.set_minor_locator(NullLocator())
    time_axes.legend(fontsize="x-small")
    figure.suptitle(title)
    figure.savefig(path, dpi=120)
    return path, f"plot: {path}"


if __name__ == "__main__":
    sys.exit(main())
