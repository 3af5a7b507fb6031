"""One command on a CUDA machine: the GPU-tier tests, then the GPU benchmarks, each stage
under a time budget; one JSON (``bench/results/gpu_check.json``) and a summary table.

    make gpu-check          # = python3 bench/gpu_check.py --device-only, make setup, this

Without an NVIDIA GPU it exits at once (status 2) and runs nothing. Stages and budgets are
listed in :data:`STAGES` (and in bench/README.md); the whole run stays under 8 minutes on one
H100-class GPU when every stage keeps its budget.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results" / "gpu_check.json"
PY = sys.executable
# (name, budget in seconds, command)
STAGES = (
    ("device", 30, [PY, "-c", "import torch; assert torch.cuda.is_available(), 'torch has no "
                   "CUDA'; print(torch.__version__, torch.version.cuda, "
                   "torch.cuda.get_device_name())"]),
    ("gpu tests: kernels vs reference, op dispatch, compile(model) exact in one graph", 240,
     [PY, "-m", "pytest", "-q", "-m", "gpu", "tests/test_gpu.py"]),
    ("benchmark: scoring kernel vs the authors' dense path", 150,
     [PY, "bench/bench_kernels_gpu.py", "--seqs", "2048", "8192", "16384"]),
    ("benchmark: scoring kernel, GQA bf16 d=128", 60,
     [PY, "bench/bench_kernels_gpu.py", "--seqs", "8192", "--q-heads", "28", "--kv-heads", "4",
      "--dtype", "bfloat16"]),
)  # fmt: skip


def has_gpu() -> bool:
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return False
    listed = subprocess.run([smi, "-L"], capture_output=True, text=True, check=False)
    return listed.returncode == 0 and "GPU" in listed.stdout


def run_stage(name: str, budget: int, command: list[str]) -> dict:
    start = time.perf_counter()
    try:
        done = subprocess.run(
            command, cwd=ROOT, capture_output=True, text=True, timeout=budget, check=False
        )
        status = "pass" if done.returncode == 0 else f"fail ({done.returncode})"
        output = done.stdout + done.stderr
    except subprocess.TimeoutExpired as expired:
        status = f"over budget ({budget} s)"
        output = (expired.stdout or b"").decode(errors="replace")
    seconds = time.perf_counter() - start
    return {"stage": name, "budget_s": budget, "seconds": round(seconds, 1), "status": status,
            "command": " ".join(command), "output_tail": output[-4000:]}  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device-only", action="store_true", help="only check for a GPU")
    args = parser.parse_args()
    if not has_gpu():
        print("gpu-check needs an NVIDIA GPU (nvidia-smi lists none); nothing was run.")
        return 2
    if args.device_only:
        return 0
    stages = []
    for name, budget, command in STAGES:
        print(f"== {name} (budget {budget} s)", flush=True)
        stages.append(run_stage(name, budget, command))
        print(stages[-1]["output_tail"][-1500:])
        if name == "device" and stages[-1]["status"] != "pass":
            break
    RESULTS.write_text(json.dumps({"stages": stages}, indent=1) + "\n")
    print("| stage | budget s | seconds | status |\n|---|---|---|---|")
    for stage in stages:
        print(
            f"| {stage['stage']} | {stage['budget_s']} | {stage['seconds']} | {stage['status']} |"
        )
    print(f"wrote {RESULTS.relative_to(ROOT)}")
    return 0 if all(stage["status"] == "pass" for stage in stages) else 1


if __name__ == "__main__":
    sys.exit(main())
