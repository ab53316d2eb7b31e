"""Every Triton launch of a DenseNet-121 relevance pass (and of a tiny ResNet's), compiled for a GPU without one.

``bench/compile_table.py`` runs the pass on the ``meta`` device with every ``kernel[grid](...)``
recorded instead of run (train and no-grad, float32 / float16 / bfloat16 (autocast) / float64,
NCHW and channels_last, 224x224 and 225x225, one map per class and one per image), specialises
each launch as Triton's JIT would on a GPU, and compiles every distinct specialisation for
sm_90 with ``triton.compile`` (ptxas ships with triton). It runs in a subprocess: these tests'
process imports the kernels for Triton's interpreter (``conftest.py``), and compiling needs
them as JIT functions.

What is checked, per specialisation: no register spills and at most 128 registers (so that a
kernel keeps at least a quarter of the SM's threads resident); no 32-bit integer
multiplication in the TTIR (an index product formed in int32 wraps at 2**31 and addresses out
of bounds silently, as ``c * CHANNELS * HW`` did); no tile whose layout repeats lanes; tiles
oriented to the tensors' layout; vectorised loads where the sizes allow them.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

triton = pytest.importorskip("triton")
if "nvidia" not in __import__("triton.backends", fromlist=["backends"]).backends:
    pytest.skip("this triton has no CUDA backend (and no ptxas) to compile with", allow_module_level=True)

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "bench" / "compile_table.py"
KERNELS = {"_gated_product_fwd_kernel", "_gated_product_bwd_kernel", "_pool_spread_fwd_kernel",
           "_pool_spread_bwd_kernel", "_max_unpool_fwd_kernel", "_max_unpool_bwd_kernel",
           "_input_rule_fwd_kernel", "_input_rule_bwd_kernel", "_max_unpool_sum_fwd_kernel",
           "_max_unpool_sum_bwd_kernel", "_residual_split_fwd_kernel", "_residual_split_bwd_kernel",
           "_residual_shortcut_add_fwd_kernel", "_residual_shortcut_add_bwd_kernel"}
MAX_REGISTERS = 128
ARCH = "sm_90"


def compile_table(tmp_path: Path, name: str, *args: str) -> dict:
    out = tmp_path / f"{name}.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "triton-cache")  # a cold cache: every kernel is compiled here
    result = subprocess.run([sys.executable, str(SCRIPT), "--arch", "90", "--jobs", "2", "--quiet",
                             "--json", str(out), *args], env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-8000:]
    return json.loads(out.read_text())


def merged(*tables) -> dict:
    """One table from several runs of the script (each in its own subprocess and time limit)."""
    result = dict(tables[0], launches=sum(t["launches"] for t in tables))
    for key in ("kernels", "recorded"):
        result[key] = sorted(set().union(*(t[key] for t in tables)))
    for key in ("tiles", "specializations"):
        result[key] = [row for t in tables for row in t[key]]
    return result


@pytest.fixture(scope="module")
def table(tmp_path_factory):
    """Every precision, layout, mode and size; one map per class ("all") and one per image ("top"),
    and the rules as written ("all-lrp", ``reference_quirks=False``: the summing un-pool); and a
    tiny ResNet's passes (``compile_table.record_resnet_launches``)."""
    folder = tmp_path_factory.mktemp("compile")
    return merged(compile_table(folder, "table", "--models", "densenet121", "--variants", "all", "top", "all-lrp"),
                  compile_table(folder, "resnet", "--models", "resnet"))


@pytest.fixture(scope="module")
def variants_table(tmp_path_factory):
    """The other variants of the DenseNet, in float32 at 224x224 NCHW (no ResNet)."""
    return compile_table(tmp_path_factory.mktemp("compile-variants"), "variants", "--precisions", "float32",
                         "--sizes", "224", "--layouts", "nchw", "--variants", "all-selective", "top-selective",
                         "classes", "--models", "densenet121")


def offenders(table, condition):
    return [f"{row['kernel']} {row['dtypes']} ({row['example']}): {row['specialization']} -> {row[ARCH]}"
            for row in table["specializations"] if condition(row, row[ARCH])]


def test_every_kernel_and_configuration_is_recorded(table):
    assert set(table["kernels"]) == KERNELS
    recorded = " | ".join(table["recorded"])
    for what in ("float32 ", "float16-autocast", "bfloat16-autocast", "float64", "224x224", "225x225", " nchw ",
                 " channels_last ", " train ", " no_grad ", "explain=all", "explain=top", "reference_quirks=False",
                 "train resnet", "no_grad resnet", "resnet bn=train"):
        assert what in recorded, what
    dtypes = {row["dtypes"] for row in table["specializations"]}
    for dtype in ("fp32", "fp64", "bf16", "fp16"):
        assert any(dtype in d for d in dtypes), dtype


def test_no_spills_and_at_most_128_registers(table):
    bad = offenders(table, lambda row, s: s["spill_stores"] or s["spill_loads"] or s["registers"] > MAX_REGISTERS)
    assert not bad, "\n".join(bad)


def test_no_32_bit_index_multiplication(table):
    """An int32 product feeding an offset wraps once the tensor passes 2**31 elements."""
    bad = offenders(table, lambda row, s: s["i32_multiplies"])
    assert not bad, "\n".join(bad)


def test_no_repeated_lanes(table):
    bad = offenders(table, lambda row, s: s["replicated"])
    assert not bad, "\n".join(bad)


def test_tiles_follow_the_layout(table):
    """A channels_last pass runs channels-innermost tiles (coalesced along channels), an NCHW
    pass pixel-innermost ones, in every kernel."""
    for entry in table["tiles"]:
        assert entry["channels_last_tiles"] == (entry["layout"] == "channels_last"), entry


def test_loads_are_vectorised_where_the_sizes_allow(table):
    """The gated products (most of the pass's launches) load vectors wherever the fast axis is a
    multiple of 16: the channels for channels_last tiles (always, in DenseNet-121), the pixels
    for NCHW ones (56x56, 28x28; not 14x14 or 7x7, whose rows do not start 16-byte aligned)."""
    def scalar_only(row, s):
        fast = "CHANNELS" if row["constexprs"].get("CHANNELS_LAST") else "HW"
        vectorisable = row["kernel"].startswith("_gated_product") and fast in row["divisible_by_16"]
        return vectorisable and s["loads_vector"] == 0
    bad = offenders(table, scalar_only)
    assert not bad, "\n".join(bad)


def test_the_other_variants_add_no_specialisation(table, variants_table):
    """Selective maps and given classes change only what enters the pass (one map per class or
    per image): the kernels see nothing the main table did not compile."""
    assert variants_table["launches"] > 0
    known = {row["key"] for row in table["specializations"]}
    new = [row["specialization"] for row in variants_table["specializations"] if row["key"] not in known]
    assert not new, "\n".join(new)
