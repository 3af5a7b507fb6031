"""Ahead-of-time compilation of the Triton kernels for NVIDIA targets, without a GPU.

``triton.compile`` lowers a kernel to PTX and a cubin for a given architecture on any machine;
ptxas's report (``-v``, which Triton runs anyway) gives the registers, stack frame and spills of
the cubin that would run, the compiled metadata its dynamic shared memory. :func:`resources`
compiles one variant and returns those figures; :func:`cases` lists every variant the
launchers can produce for the head dims our models use: every autotune config of every
kernel, each dtype, each head-dim block, for sm_80 and sm_90. The head dim itself is a runtime
argument: 64 compiles with ``BLOCK_D = 64``; 80, 96 and 128 to one kernel with 128; 256 with
256.

Constexpr flags that only add code (padding, window mask, n-softmax) are compiled switched on,
the variant with the most live values; a spot check compiles the others (``tests/test_aot.py``).
"""

from __future__ import annotations

import contextlib
import io
import itertools
import json
import os
import re
import subprocess
import sys
from dataclasses import asdict, dataclass

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.runtime.jit import JITFunction

from . import decomposed_scores, n_softmax

ARCHS = (80, 90)
BLOCK_DS = (64, 128, 256)  # the head dims 64 | 80, 96, 128 | 256
DTYPES = tuple(decomposed_scores.DTYPE_NAMES.values())  # scoring; the n-softmax also takes fp64
POINTER = {"fp16": "*fp16", "bf16": "*bf16", "fp32": "*fp32", "fp64": "*fp64"}
# shared memory one block may use (opt-in maximum): A100 163 KiB, H100 227 KiB
SMEM_LIMIT = {80: 166_912, 90: 232_448}
SMEM_PER_SM = {80: 167_936, 90: 233_472}
REGS_PER_SM, MAX_WARPS_PER_SM = 65_536, 64
TORCH_DTYPE = {name: dtype for dtype, name in decomposed_scores.DTYPE_NAMES.items()}
_PTXAS = re.compile(
    r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads.*?"
    r"Used (\d+) registers",
    re.S,
)


@dataclass(frozen=True)
class Case:
    """One compiled variant: a kernel, its tile config, the input dtype and head dim."""

    kernel: str  # "window_shift" | "column_sums" | "n_softmax"
    arch: int
    dtype: str
    width: int  # BLOCK_D of the scoring kernels; the row block (BLOCK) of the n-softmax
    block_m: int = 0
    block_n: int = 0
    num_warps: int = 4
    num_stages: int = 1
    flags: tuple[tuple[str, bool], ...] = ()

    @classmethod
    def from_row(cls, row: dict) -> Case:
        """The case of a table row (JSON turns the flag pairs into lists)."""
        fields = {name: row[name] for name in cls.__dataclass_fields__}
        return cls(**{**fields, "flags": tuple(map(tuple, row["flags"]))})

    @property
    def config(self) -> str:
        if self.kernel == "n_softmax":
            return f"BLOCK={self.width} w{self.num_warps}"
        return f"{self.block_m}x{self.block_n} w{self.num_warps} s{self.num_stages}"


def _scores_signature(fn, dtype: str) -> dict[str, str]:
    pointer = POINTER[dtype]
    types = {
        "q_ptr": pointer, "k_ptr": pointer, "pad_ptr": "*u8", "wmask_ptr": "*u8",
        "img_ptr": "*u8", "shift_ptr": "*fp32", "out_ptr": "*fp32", "qk_scale": "fp32",
        "log2_n": "fp32",
    }  # fmt: skip
    return {name: types.get(name, "i32") for name in fn.arg_names}


def jit(kernel):
    """A compilable ``JITFunction`` of a kernel, also when Triton's interpreter decorated it
    (``TRITON_INTERPRET=1``, as CPU test runs set)."""
    return JITFunction(kernel.fn)


def _compile(case: Case):
    if case.kernel == "n_softmax":
        fn = jit(n_softmax._n_softmax_kernel)
        pointer = POINTER[case.dtype]
        signature = {"x_ptr": pointer, "out_ptr": pointer, "n_cols": "i32", "stride_x": "i64",
                     "stride_out": "i64", "log_n": "fp32"}  # fmt: skip
        acc = triton.language.float64 if case.dtype == "fp64" else triton.language.float32
        constexprs = {**dict(case.flags), "ACC": acc, "BLOCK": case.width}
    else:
        fn = jit(getattr(decomposed_scores, f"_{case.kernel}_kernel"))
        signature = _scores_signature(fn, case.dtype)
        constexprs = {
            **dict(case.flags), "DOT_FP32": False, "BLOCK_M": case.block_m,
            "BLOCK_N": case.block_n, "BLOCK_D": case.width,
        }  # fmt: skip
    signature.update(dict.fromkeys(constexprs, "constexpr"))
    source = ASTSource(fn, signature, constexprs=constexprs)
    options = {"num_warps": case.num_warps, "num_stages": case.num_stages}
    return triton.compile(source, target=GPUTarget("cuda", case.arch, 32), options=options)


def resources(case: Case) -> dict:
    """Compile ``case``; its registers, stack, spills, shared memory and an occupancy estimate
    (resident warps per SM / 64, from registers and shared memory), or the compile error."""
    log = io.StringIO()
    try:
        with (
            triton.knobs.nvidia.scope(),
            triton.knobs.compilation.scope(),
            contextlib.redirect_stdout(log),
        ):
            triton.knobs.nvidia.dump_ptxas_log = True
            triton.knobs.compilation.always_compile = True  # ptxas reports only when it runs
            compiled = _compile(case)
    except Exception as error:  # a compile error is a result of the gate, reported by case
        return {**asdict(case), "error": f"{type(error).__name__}: {error}"[:500]}
    match = _PTXAS.search(log.getvalue())
    if match is None:
        raise RuntimeError(f"no ptxas report for {case}:\n{log.getvalue()[-2000:]}")
    stack, spill_stores, spill_loads, regs = map(int, match.groups())
    smem = compiled.metadata.shared
    warps = case.num_warps
    blocks = MAX_WARPS_PER_SM // warps
    blocks = min(blocks, REGS_PER_SM // (-(-regs // 8) * 8 * 32 * warps))
    if smem:
        blocks = min(blocks, SMEM_PER_SM[case.arch] // smem)
    return {
        **asdict(case), "registers": regs, "stack": stack, "spill_stores": spill_stores,
        "spill_loads": spill_loads, "shared": smem, "occupancy": blocks * warps / MAX_WARPS_PER_SM,
    }  # fmt: skip


def resources_isolated(cases: list[Case]) -> list[dict]:
    """:func:`resources` of each case, compiled in a fresh interpreter without
    ``TRITON_INTERPRET`` (under it Triton's language is rebound for the interpreter and does
    not compile for a GPU)."""
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    code = (
        "import json, sys\n"
        "from csp_inductor.kernels import aot\n"
        "rows = json.loads(sys.stdin.read())\n"
        "print(json.dumps([aot.resources(aot.Case.from_row(row)) for row in rows]))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], input=json.dumps([asdict(case) for case in cases]),
        capture_output=True, text=True, env=env, check=True,
    )  # fmt: skip
    return json.loads(done.stdout.splitlines()[-1])


def problems(row: dict) -> list[str]:
    """Why a compiled case fails the gate (empty: it passes)."""
    if "error" in row:
        return [row["error"]]
    found = []
    if row["shared"] > SMEM_LIMIT[row["arch"]]:
        found.append(f"shared memory {row['shared']} B > {SMEM_LIMIT[row['arch']]} B")
    if row["spill_stores"]:
        found.append(f"{row['spill_stores']} B of register spills")
    return found


KERNELS = (
    decomposed_scores._window_shift_kernel,
    decomposed_scores._column_sums_kernel,
    n_softmax._n_softmax_kernel,
)
SCORE_KERNELS = (
    ("window_shift", decomposed_scores._PASS1_CONFIGS, ("HAS_PAD", "HAS_WMASK", "HAS_N")),
    ("column_sums", decomposed_scores._PASS2_CONFIGS, ("HAS_PAD",)),
)


def cases() -> list[Case]:
    """Every config × dtype × head dim × arch, each kernel's flags on."""
    out = []
    for arch in ARCHS:
        for dtype in DTYPES:
            for d, (name, configs, flag_names) in itertools.product(BLOCK_DS, SCORE_KERNELS):
                for cfg in configs:
                    tile = (cfg.kwargs["BLOCK_M"], cfg.kwargs["BLOCK_N"], cfg.num_warps)
                    flags = tuple((flag, True) for flag in flag_names)
                    out.append(Case(name, arch, dtype, d, *tile, cfg.num_stages, flags))
        for dtype, block in itertools.product((*DTYPES, "fp64"), n_softmax.BLOCKS):
            warps = n_softmax.num_warps(block)
            out.append(
                Case("n_softmax", arch, dtype, block, num_warps=warps, flags=(("HAS_N", True),))
            )
    return out
