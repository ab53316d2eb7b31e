#!/usr/bin/env python
"""Compile every Triton kernel launch of a DenseNet-121 relevance pass for a GPU, without a GPU.

The table also holds a tiny ResNet's passes (``record_resnet_launches``: its residual-sum kernels).

    python bench/compile_table.py                    # the table for sm_80 and sm_90
    python bench/compile_table.py --arch 90 --json compile.json

How: the model runs on the ``meta`` device (shapes and strides, no data) with ``backend="triton"``;
``JITFunction.run``, which every ``kernel[grid](...)`` goes through, is replaced by a recorder, so
the launchers run (allocations, strides, block sizes) and no kernel executes. Each launch is
specialised as Triton's JIT would specialise it on a GPU (``triton.runtime.jit``'s own binder:
argument dtypes, integers equal to 1 or divisible by 16, 16-byte aligned pointers, constexprs,
``num_warps``); a meta tensor's ``data_ptr()`` is its byte offset, i.e. what it would be on a
16-byte aligned allocation (CUDA's allocator aligns to 512). Every distinct specialisation is then
compiled once with ``triton.compile`` for ``GPUTarget("cuda", arch, 32)``: Triton's whole
pipeline down to a cubin, ptxas included (it ships with the triton wheel).

Meta convolutions always return contiguous tensors; ``CudaMemoryFormats`` gives them (and their
backward) the layout cuDNN picks, channels_last for channels_last inputs or weights, so the
``channels_last`` runs see what they would on CUDA. Low precision runs as the pass runs on CUDA
under ``torch.autocast``: a float32 model whose convolutions and linear layers compute in
bfloat16/float16. Autocast has no meta backend, so ``MetaAutocast`` applies CUDA autocast's
casting rule to exactly those ops. (A model converted to bfloat16 as a whole does not run the
pass today: the z^B rule's convolution gets a float32 bias.)

Per specialisation it reports registers, spills (ptxas -v), shared memory, whether global loads
and stores are vectorised (``ld.global.v2/v4`` in the PTX), 32-bit integer multiplications in
the TTIR (an index product in int32 wraps at 2**31) and whether a tile's layout repeats lanes
(threads holding copies of one element). ``tests/test_compile.py`` runs this module in a
subprocess and asserts on its JSON.

This reads private parts of triton 3.9 (the JIT's binder, ``_pack_args``); written against it.
"""

from __future__ import annotations

import os

os.environ.pop("TRITON_INTERPRET", None)  # compile, do not interpret: must precede triton's import

import argparse  # noqa: E402
import collections  # noqa: E402
import concurrent.futures  # noqa: E402
import contextlib  # noqa: E402
import dataclasses  # noqa: E402
import functools  # noqa: E402
import importlib  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import multiprocessing  # noqa: E402
import re  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Dict, List, Tuple  # noqa: E402

import torch  # noqa: E402
import triton  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource, make_backend  # noqa: E402
from triton.runtime import jit as triton_jit  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import isnet_fast  # noqa: E402
import isnet_fast.model  # noqa: E402
from isnet_fast import IsDenseFast, IsResNetFast, ResNet, densenet121  # noqa: E402
from isnet_fast.engine import triton_ops  # noqa: E402

os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9's default, without its warning

PRECISIONS = ("float32", "float16", "bfloat16", "float64")
LOW_PRECISION = {"float16": torch.float16, "bfloat16": torch.bfloat16}
# (explain, selective, classes given): the model's variants; all but "all" give one map per image
VARIANTS = {"all": ("all", False, False), "all-selective": ("all", True, False), "top": ("top", False, False),
            "top-selective": ("top", True, False), "classes": ("all", False, True), "all-lrp": ("all", False, False)}
# variants with IsDenseFast(reference_quirks=False), the LRP rules as written: the summing un-pool's kernels
WITHOUT_QUIRKS = ("all-lrp",)


# ---------------------------------------------------------------------------------------------
# Recording the launches
# ---------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class TensorArg:
    """What a launch's specialisation reads of a tensor: its dtype and where it starts."""
    dtype: torch.dtype
    offset_bytes: int

    def data_ptr(self) -> int:  # triton's specialiser reads this for the 16-byte alignment
        return self.offset_bytes


@dataclasses.dataclass
class Launch:
    kernel: triton_jit.JITFunction
    grid: Tuple[int, ...]
    args: tuple
    kwargs: dict
    where: str  # the recording configuration that made it first


def _arg(value):
    if isinstance(value, torch.Tensor):
        return TensorArg(value.dtype, value.storage_offset() * value.element_size())
    return value


@contextlib.contextmanager
def recording(launches: List[Launch], where: list):
    """Every ``kernel[grid](...)`` is recorded instead of run; the kernels' outputs stay as the
    launchers allocated them (empty)."""
    real_run = triton_jit.JITFunction.run

    def record(self, *args, grid, warmup, **kwargs):
        grid = tuple(grid(dict(zip(self.arg_names, args))) if callable(grid) else grid)
        launches.append(Launch(self, grid, tuple(map(_arg, args)), dict(kwargs), where[0]))

    triton_jit.JITFunction.run = record
    try:
        yield
    finally:
        triton_jit.JITFunction.run = real_run


class MetaAutocast:
    """CUDA autocast's rule for this model's ops on meta tensors: convolutions and linear layers
    compute in ``dtype`` (the functional forms, which the modules and the pass call, are wrapped);
    ``torch.autocast(..., enabled=False)`` regions, which the pass uses, turn it off."""

    FUNCTIONS = ("conv2d", "conv_transpose2d", "linear")

    def __init__(self, dtype):
        self.dtype = dtype
        self.enabled = [True]
        self.real = {}

    def cast(self, t):
        return t.to(self.dtype) if isinstance(t, torch.Tensor) and t.is_floating_point() else t

    def wrap(self, function):
        def autocast(*args, **kwargs):
            if self.enabled[-1]:
                args, kwargs = tuple(map(self.cast, args)), {k: self.cast(v) for k, v in kwargs.items()}
            return function(*args, **kwargs)
        return autocast

    def __enter__(self):
        for name in self.FUNCTIONS:
            self.real[name] = getattr(torch.nn.functional, name)
            setattr(torch.nn.functional, name, self.wrap(self.real[name]))
        return self

    def __exit__(self, *exc):
        for name, function in self.real.items():
            setattr(torch.nn.functional, name, function)


def _channels_last(t) -> bool:
    return isinstance(t, torch.Tensor) and t.dim() == 4 and \
        torch._prims_common.suggest_memory_format(t) == torch.channels_last


class CudaMemoryFormats(TorchDispatchMode):
    """Convolutions' output layouts as cuDNN picks them: channels_last when the input or the
    weight is (meta's convolution always returns contiguous tensors, its backward too)."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        aten = torch.ops.aten
        if func is aten.convolution.default and (_channels_last(args[0]) or _channels_last(args[1])):
            return out.contiguous(memory_format=torch.channels_last)
        if func is aten.convolution_backward.default and any(_channels_last(t) for t in args[:3]):
            return tuple(t.contiguous(memory_format=torch.channels_last) if isinstance(t, torch.Tensor) and t.dim() == 4
                         else t for t in out)
        return out


@contextlib.contextmanager
def autocast_on_meta(dtype):
    """``MetaAutocast`` in force, with ``torch.autocast("meta", enabled=...)`` toggling it."""
    mode = MetaAutocast(dtype)
    real_autocast = torch.autocast

    class Autocast:
        def __init__(self, device_type, dtype=None, enabled=True, cache_enabled=None):
            self.enabled = enabled

        def __enter__(self):
            mode.enabled.append(self.enabled and mode.enabled[-1])

        def __exit__(self, *exc):
            mode.enabled.pop()

    torch.autocast = Autocast
    try:
        with mode:
            yield
    finally:
        torch.autocast = real_autocast


def build_model(classes: int):
    with torch.device("meta"):
        net = densenet121(num_classes=classes)
    return net


def record_launches(precisions=PRECISIONS, sizes=(224, 225), layouts=("nchw", "channels_last"),
                    modes=("train", "no_grad"), variants=tuple(VARIANTS), classes: int = 3,
                    batch: int = 2) -> List[Launch]:
    """Runs the pass for every combination and returns every launch it made (in order)."""
    launches: List[Launch] = []
    where = [""]
    net = build_model(classes)
    real_ops_for, real_check_classes = isnet_fast.model.ops_for, isnet_fast.model.check_classes
    # backend="triton" on meta tensors: the kernels' module, whatever the device
    isnet_fast.model.ops_for = lambda backend, x: triton_ops
    isnet_fast.model.check_classes = lambda *args: None  # it reads the values (meta has none)
    try:
        with recording(launches, where):
            for precision in precisions:
                low = LOW_PRECISION.get(precision)
                model_dtype = torch.float32 if low is not None else getattr(torch, precision)
                net = net.to(model_dtype)
                for size in sizes:
                    for layout in layouts:
                        for mode in modes:
                            for variant in variants:
                                explain, selective, given = VARIANTS[variant]
                                quirks = variant not in WITHOUT_QUIRKS
                                where[0] = (f"{precision}{'-autocast' if low else ''} {size}x{size} {layout} {mode} "
                                            f"explain={explain}{' selective' if selective else ''}"
                                            f"{' classes=' if given else ''}"
                                            f"{'' if quirks else ' reference_quirks=False'}")
                                model = IsDenseFast(net, explain=explain, selective=selective, backend="triton",
                                                    check_finite=False, reference_quirks=quirks)
                                model.train(mode == "train")
                                x = torch.empty(batch, 3, size, size, device="meta", dtype=model_dtype)
                                if layout == "channels_last":
                                    x = x.contiguous(memory_format=torch.channels_last)
                                chosen = torch.zeros(batch, dtype=torch.long, device="meta") if given else None
                                context = autocast_on_meta(low) if low is not None else contextlib.nullcontext()
                                # meta's contiguous convolutions are what cuDNN gives NCHW tensors
                                formats = CudaMemoryFormats() if layout == "channels_last" else contextlib.nullcontext()
                                with context, formats:
                                    if mode == "train":
                                        x.requires_grad_()
                                        y, R = model(x, classes=chosen)
                                        (R.sum() + y.sum()).backward()
                                    else:
                                        with torch.no_grad():
                                            model(x, classes=chosen)
    finally:
        isnet_fast.model.ops_for, isnet_fast.model.check_classes = real_ops_for, real_check_classes
    return launches


# A tiny ResNet (``IsResNetFast``): identity-shortcut blocks (layer1) and a downsampling one
# (layer2), 16 and 24 channels (a multiple of 16 and not), at an odd size; besides the steps it
# shares with the DenseNet, the residual sum's kernels.
RESNET = dict(block="basic", layers=(2, 1), stem_width=16, widths=(16, 24))
RESNET_SIZES = (37,)
MODELS = ("densenet121", "resnet")


def record_resnet_launches(precisions=PRECISIONS, sizes=RESNET_SIZES, layouts=("nchw", "channels_last"),
                           modes=("train", "no_grad"), classes: int = 3, batch: int = 2) -> List[Launch]:
    """The tiny ResNet's passes, one map per class, recorded as ``record_launches`` records the
    DenseNet's; each configuration's name says "resnet". No-grad passes run in eval mode and again
    in train mode ("bn=train"), whose hints differ (``triton_ops.residual_split_gated``)."""
    launches: List[Launch] = []
    where = [""]
    with torch.device("meta"):
        net = ResNet(num_classes=classes, **RESNET)
    real_ops_for = isnet_fast.model.ops_for  # both wrappers' forward (their base's) calls it
    isnet_fast.model.ops_for = lambda backend, x: triton_ops
    try:
        with recording(launches, where):
            for precision in precisions:
                low = LOW_PRECISION.get(precision)
                model_dtype = torch.float32 if low is not None else getattr(torch, precision)
                net = net.to(model_dtype)
                for size in sizes:
                    for layout in layouts:
                        for mode in modes:
                            where[0] = f"{precision}{'-autocast' if low else ''} {size}x{size} {layout} {mode} resnet"
                            model = IsResNetFast(net, backend="triton", check_finite=False).train(mode == "train")
                            x = torch.empty(batch, 3, size, size, device="meta", dtype=model_dtype)
                            if layout == "channels_last":
                                x = x.contiguous(memory_format=torch.channels_last)
                            context = autocast_on_meta(low) if low is not None else contextlib.nullcontext()
                            formats = CudaMemoryFormats() if layout == "channels_last" else contextlib.nullcontext()
                            with context, formats:
                                if mode == "train":
                                    y, R = model(x.requires_grad_())
                                    (R.sum() + y.sum()).backward()
                                else:  # eval mode, and train mode (its folds are not the forward's)
                                    with torch.no_grad():
                                        model(x)
                                        where[0] += " bn=train"
                                        model.train()(x)
    finally:
        isnet_fast.model.ops_for = real_ops_for
    return launches


# ---------------------------------------------------------------------------------------------
# Specialising and compiling
# ---------------------------------------------------------------------------------------------

@dataclasses.dataclass
class Spec:
    """One specialisation: what the JIT would compile for a launch."""
    kernel: triton_jit.JITFunction
    signature: Dict[str, str]
    constexprs: dict
    attrs: dict
    options: dict  # num_warps, num_stages, ...
    key: str
    launches: int = 0
    example: str = ""

    @property
    def name(self) -> str:
        return self.kernel.fn.__name__

    def describe(self) -> str:
        """Readable: pointer dtypes (``!`` where not 16-byte aligned), constexprs (the ints the JIT
        specialised to 1 among them), the ints divisible by 16, launch options."""
        parts, divisible = [], []
        for index, name in enumerate(self.kernel.arg_names):
            ty = self.signature[name]
            aligned = ["tt.divisibility", 16] in self.attrs.get((index,), [])
            if ty == "constexpr":
                parts.append(f"{name}={self.constexprs.get((index,))}")
            elif ty.startswith("*"):
                parts.append(ty[1:] + ("" if aligned else "!"))
            elif aligned:
                divisible.append(name)
        opts = ",".join(f"{k}={v}" for k, v in sorted(self.options.items()))
        return " ".join(parts) + (f" 16|{','.join(divisible)}" if divisible else "") + (f" [{opts}]" if opts else "")


LAUNCH_OPTIONS = ("num_warps", "num_stages", "num_ctas", "maxnreg")


@functools.lru_cache(maxsize=None)
def _binder(kernel, backend):
    return triton_jit.create_function_from_signature(kernel.signature, kernel.params, backend)


def specialize(launch: Launch, backend) -> Spec:
    """The signature, constexprs and alignment attributes ``JITFunction.run`` would compute."""
    kernel = launch.kernel
    binder = _binder(kernel, backend)
    kwargs = dict(launch.kwargs)
    kwargs.setdefault("debug", False)
    bound_args, specialization, options = binder(*launch.args, **kwargs)
    _, signature, constexprs, attrs = kernel._pack_args(backend, kwargs, bound_args, specialization, options)
    launch_options = {k: v for k, v in launch.kwargs.items() if k in LAUNCH_OPTIONS}
    constexprs = {k: (v.value if hasattr(v, "value") else v) for k, v in constexprs.items()}
    key = json.dumps([kernel.fn.__module__, kernel.fn.__name__, sorted(signature.items()),
                      sorted((str(k), repr(v)) for k, v in constexprs.items()),
                      sorted((str(k), repr(v)) for k, v in attrs.items()), sorted(launch_options.items())])
    return Spec(kernel, signature, constexprs, attrs, launch_options, key)


def distinct_specs(launches: List[Launch]) -> List[Spec]:
    backend = make_backend(GPUTarget("cuda", 90, 32))
    specs: Dict[str, Spec] = {}
    for launch in launches:
        spec = specialize(launch, backend)
        if spec.key not in specs:
            spec.example = launch.where
            specs[spec.key] = spec
        specs[spec.key].launches += 1
    return list(specs.values())


PTXAS_REGISTERS = re.compile(r"Used (\d+) registers")
PTXAS_SPILLS = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")
PTXAS_STACK = re.compile(r"(\d+) bytes stack frame")
I32_MULTIPLY = re.compile(r"arith\.muli [^\n]*: (?:i32|tensor<[0-9x]*xi32[^>]*>)\s+loc")
BLOCKED = re.compile(r"^(#\w+) = #ttg\.blocked<\{sizePerThread = \[([\d, ]+)\], threadsPerWarp = \[([\d, ]+)\], "
                     r"warpsPerCTA = \[([\d, ]+)\]", re.M)
MEMORY_OP = re.compile(r"= tt\.load |tt\.store ")
TENSOR_TYPE = re.compile(r"tensor<([\dx]+)x!?[\w.<>]*?, (#\w+)>")


def ptxas_stats(ptx: str, arch: int) -> dict:
    """Registers, spills and stack from ``ptxas -v`` on the kernel's PTX, with the flags Triton uses."""
    from triton.backends.nvidia.compiler import get_ptxas
    ptxas = get_ptxas(arch).path  # sm_90+ take the newer ptxas that ships beside the other
    suffix = "a" if arch >= 90 else ""
    with tempfile.TemporaryDirectory() as tmp:
        source = Path(tmp) / "kernel.ptx"
        source.write_text(ptx)
        result = subprocess.run([ptxas, "-v", "--regAllocOptLevel=2", f"--gpu-name=sm_{arch}{suffix}", str(source),
                                 "-o", str(Path(tmp) / "kernel.cubin")], capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"ptxas failed: {result.stderr}")
    log = result.stderr + result.stdout
    spills = PTXAS_SPILLS.search(log)
    return {"registers": int(PTXAS_REGISTERS.search(log).group(1)),
            "spill_stores": int(spills.group(1)), "spill_loads": int(spills.group(2)),
            "stack": int(PTXAS_STACK.search(log).group(1))}


def replicated_layouts(ttgir: str) -> List[str]:
    """The kernel's tile-sized loads and stores (those of its largest tensors) whose blocked layout
    covers more than the tile in some dimension: threads or warps holding copies of the same
    elements, work done twice. Smaller operands (a tile's per-channel folds, its per-channel
    sums) are broadcast by design and left out."""
    layouts = {}
    for name, size, threads, warps in BLOCKED.findall(ttgir):
        per = [list(map(int, s.split(","))) for s in (size, threads, warps)]
        layouts[name] = [a * b * c for a, b, c in zip(*per)]
    accesses = []
    for line in ttgir.splitlines():
        if MEMORY_OP.search(line):
            for shape, layout in TENSOR_TYPE.findall(line):
                if layout in layouts:
                    accesses.append(([int(d) for d in shape.split("x")], layout))
    if not accesses:
        return []
    largest = max(math.prod(dims) for dims, _ in accesses)
    found = set()
    for dims, layout in accesses:
        if math.prod(dims) == largest and any(cover > dim for cover, dim in zip(layouts[layout], dims)):
            found.add(f"tensor<{'x'.join(map(str, dims))}> covered by {layouts[layout]}")
    return sorted(found)


def vector_counts(ptx: str) -> dict:
    loads = re.findall(r"\bld\.global(?:\.[a-z]+)*?(?:\.(v[248]))?\.[bfsu]\d+", ptx)
    stores = re.findall(r"\bst\.global(?:\.[a-z]+)*?(?:\.(v[248]))?\.[bfsu]\d+", ptx)
    return {"loads_vector": sum(1 for v in loads if v), "loads_scalar": sum(1 for v in loads if not v),
            "stores_vector": sum(1 for v in stores if v), "stores_scalar": sum(1 for v in stores if not v),
            "widest_load": max((v for v in loads if v), default="-"),
            "widest_store": max((v for v in stores if v), default="-")}


def compile_spec(spec: Spec, arch: int) -> dict:
    start = time.time()
    source = ASTSource(spec.kernel, spec.signature, spec.constexprs, spec.attrs)
    compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32), options=dict(spec.options))
    stats = ptxas_stats(compiled.asm["ptx"], arch)
    stats.update(vector_counts(compiled.asm["ptx"]))
    ttir = compiled.asm["ttir"]
    stats["i32_multiplies"] = len(I32_MULTIPLY.findall(ttir))
    stats["replicated"] = replicated_layouts(compiled.asm["ttgir"])
    stats["shared"] = compiled.metadata.shared
    stats["num_warps"] = compiled.metadata.num_warps
    stats["seconds"] = round(time.time() - start, 2)
    return stats


def dtype_of(spec: Spec) -> str:
    """The tensors' dtypes (the first pointer argument's, plus others that differ)."""
    seen = []
    for name in spec.kernel.arg_names:
        ty = spec.signature[name]
        if ty.startswith("*") and name != "e_ptr" and "coefficient" not in name and ty[1:] not in seen \
                and ty[1:] not in ("i64", "i32"):
            seen.append(ty[1:])
    return "+".join(seen)


def _record_chunk(record_kwargs: dict) -> list:
    """``record_launches`` (or, for ``model="resnet"``, ``record_resnet_launches``) in a worker:
    the launches as picklable tuples."""
    record_kwargs = dict(record_kwargs)
    record = record_resnet_launches if record_kwargs.pop("model", "densenet121") == "resnet" else record_launches
    return [(launch.kernel.fn.__module__, launch.kernel.fn.__name__, launch.grid, launch.args, launch.kwargs,
             launch.where) for launch in record(**record_kwargs)]


def _kernel(module: str, name: str) -> triton_jit.JITFunction:
    return getattr(importlib.import_module(module), name)


def _compile_task(task) -> dict:
    module, name, signature, constexprs, attrs, options, arch = task
    spec = Spec(_kernel(module, name), signature, constexprs, attrs, options, key="")
    return compile_spec(spec, arch)


def _map(function, tasks, jobs: int):
    if jobs <= 1:
        return list(map(function, tasks))
    # spawned workers import this module afresh (TRITON_INTERPRET is unset before triton loads)
    with concurrent.futures.ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        return list(pool.map(function, tasks))


def run(archs=(80, 90), jobs: int = 1, precisions=PRECISIONS, layouts=("nchw", "channels_last"), models=MODELS,
        resnet_sizes=RESNET_SIZES, **record_kwargs) -> dict:
    """Records (in ``jobs`` processes, one chunk per model, precision and layout), specialises,
    compiles every distinct specialisation for every arch, and returns the table as a dict.
    ``models``: "densenet121" (``record_kwargs`` say how) and "resnet" (at ``resnet_sizes``)."""
    start = time.time()
    chunks = []
    if "densenet121" in models:
        chunks += [dict(record_kwargs, precisions=(precision,), layouts=(layout,))
                   for precision in precisions for layout in layouts]
    if "resnet" in models:
        shared = {key: record_kwargs[key] for key in ("modes", "classes", "batch") if key in record_kwargs}
        chunks += [dict(shared, model="resnet", sizes=tuple(resnet_sizes), precisions=(precision,), layouts=(layout,))
                   for precision in precisions for layout in layouts]
    launches = [Launch(_kernel(module, name), grid, args, kwargs, where)
                for chunk in _map(_record_chunk, chunks, jobs) for module, name, grid, args, kwargs, where in chunk]
    recorded = time.time()
    specs = distinct_specs(launches)
    tasks = [(spec.kernel.fn.__module__, spec.kernel.fn.__name__, spec.signature, spec.constexprs, spec.attrs,
              spec.options, arch) for spec in specs for arch in archs]
    compiled = iter(_map(_compile_task, tasks, jobs))
    rows = []
    for spec in specs:
        row = {"kernel": spec.name, "dtypes": dtype_of(spec), "specialization": spec.describe(), "key": spec.key,
               "launches": spec.launches, "example": spec.example, "constexprs": {
                   spec.kernel.arg_names[k[0]]: v for k, v in spec.constexprs.items()},
               "divisible_by_16": [spec.kernel.arg_names[k[0]] for k, v in spec.attrs.items()
                                   if ["tt.divisibility", 16] in v]}
        for arch in archs:
            row[f"sm_{arch}"] = next(compiled)
        rows.append(row)
    tiles = collections.Counter(
        (launch.kernel.fn.__name__, launch.where.split()[2], bool(launch.kwargs.get("CHANNELS_LAST")))
        for launch in launches)
    return {"triton": triton.__version__, "torch": torch.__version__, "launches": len(launches),
            "kernels": sorted({launch.kernel.fn.__name__ for launch in launches}),
            "recorded": sorted({launch.where for launch in launches}),
            "tiles": [{"kernel": k, "layout": layout, "channels_last_tiles": cl, "launches": n}
                      for (k, layout, cl), n in sorted(tiles.items())],
            "specializations": rows, "record_seconds": round(recorded - start, 1),
            "compile_seconds": round(time.time() - recorded, 1)}


def format_table(result: dict, archs) -> str:
    header = ["kernel", "dtypes", "warps"]
    for arch in archs:
        header += [f"sm_{arch} regs", "spills", "smem", "ld/st vec"]
    header += ["i32 mul", "lanes", "launches", "specialization"]
    lines = []
    for row in sorted(result["specializations"], key=lambda r: (r["kernel"], r["dtypes"], r["specialization"])):
        first = row[f"sm_{archs[0]}"]
        cells = [row["kernel"].strip("_").replace("_kernel", ""), row["dtypes"], str(first["num_warps"])]
        for arch in archs:
            s = row[f"sm_{arch}"]
            cells += [str(s["registers"]), f"{s['spill_stores']}/{s['spill_loads']}", str(s["shared"]),
                      f"{s['widest_load']}/{s['widest_store']} ({s['loads_vector']}v {s['loads_scalar']}s)"]
        cells += [str(first["i32_multiplies"]), "repeated" if first["replicated"] else "ok", str(row["launches"]),
                  row["specialization"]]
        lines.append(cells)
    widths = [max(len(r[i]) for r in lines + [header]) for i in range(len(header) - 1)]
    out = [" | ".join(h.ljust(w) for h, w in zip(header, widths)) + " | " + header[-1]]
    out.append("-+-".join("-" * w for w in widths) + "-+-" + "-" * 14)
    for cells in lines:
        out.append(" | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " | " + cells[-1])
    return "\n".join(out)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, nargs="+", default=[80, 90], help="compute capabilities (80 90)")
    parser.add_argument("--precisions", nargs="+", default=list(PRECISIONS), choices=PRECISIONS)
    parser.add_argument("--sizes", type=int, nargs="+", default=[224, 225])
    parser.add_argument("--layouts", nargs="+", default=["nchw", "channels_last"], choices=["nchw", "channels_last"])
    parser.add_argument("--modes", nargs="+", default=["train", "no_grad"], choices=["train", "no_grad"])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS),
                        help="IsDenseFast(explain=..., selective=...), forward(x, classes=...) or "
                             "reference_quirks=False (all-lrp)")
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS,
                        help="whose passes to record: DenseNet-121's (as the options below say) and a tiny ResNet's")
    parser.add_argument("--resnet-sizes", type=int, nargs="+", default=list(RESNET_SIZES),
                        help="image sizes of the tiny ResNet's passes")
    parser.add_argument("--classes", type=int, default=3)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1),
                        help="processes that record and compile (default: up to 2)")
    parser.add_argument("--json", help="write the table as JSON here")
    parser.add_argument("--quiet", action="store_true", help="no table on stdout")
    args = parser.parse_args(argv)
    result = run(archs=tuple(args.arch), jobs=args.jobs, precisions=tuple(args.precisions), sizes=tuple(args.sizes),
                 layouts=tuple(args.layouts), modes=tuple(args.modes), variants=tuple(args.variants),
                 models=tuple(args.models), resnet_sizes=tuple(args.resnet_sizes), classes=args.classes,
                 batch=args.batch)
    result["archs"] = args.arch
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1, default=str))
    if not args.quiet:
        print(format_table(result, tuple(args.arch)))
        print(f"\n{result['launches']} launches, {len(result['specializations'])} specializations; "
              f"recorded in {result['record_seconds']} s, compiled in {result['compile_seconds']} s "
              f"(triton {result['triton']})")


if __name__ == "__main__":
    main()
