"""
Loss parity of the parallel layouts (parallel.py), measured the way a user runs them: pretrain.py --tiny under
torchrun (CPU + gloo) in several layouts, in bf16 and fp32, against one process and against one process's own
noise floor (the same batch as twice the micro-batches). A runnable script that the slow tests also import; it
lives beside the tests so that parallel.py never depends on pretrain.py.

    python tests/parity.py [--steps 4] [--layouts "dp=2;fsdp=2;sp=2;tp=2;fsdp=2,tp=2;dp=2,sp=2"]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from parallel import AXES  # noqa: E402

# "The same losses" can mean the same bits only where every sum is formed in the same order. A layout splits
# sums (the batch over dp/fsdp, the sequence over sp, the hidden dim over tp), and fp32 addition is not
# associative: a weight gradient summed as two halves differs from the one-GEMM sum in the last bit for most
# elements. In fp32 such 1-ulp differences stay 1-ulp, below what the logged token mean resolves (bit-equal
# losses here). Under bf16 autocast they are amplified: an fp32 weight or activation that moved by one ulp
# sometimes rounds to the NEIGHBOURING bf16 value (a 2^-8 relative jump), so after one update the losses move in
# the 5th-6th digit. (Computing weight and input gradients with fp32 outputs -- Megatron's
# fp32 gradient accumulation -- was tried and leaves the gap at the same size.) The meaningful check is the floor:
# one process doing the SAME math in another order (half the batch, twice the micro-batches).


def _layout_flags(spec: str) -> tuple[list[str], int]:
    """"fsdp=2,tp=2" -> (["--fsdp", "2", "--tp", "2"], 4)."""
    flags, world = [], 1
    for part in spec.split(","):
        axis, _, n = part.partition("=")
        if axis not in AXES or not n.isdigit() or int(n) < 1:
            raise ValueError(f"layout {spec!r}: expected comma-separated axis=degree with axes {AXES}")
        flags += [f"--{axis}", n]
        world *= int(n)
    return flags, world


def run_pretrain(args: list[str], nproc: int = 1, timeout: float = 900, env: dict | None = None) -> dict:
    """pretrain.py as a user runs it (torchrun when nproc > 1, CPU + gloo); returns its final JSON summary.
    `env` adds variables (e.g. OMP_NUM_THREADS) to this process's environment."""
    root = ROOT
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"] \
        if nproc > 1 else [sys.executable]
    proc = subprocess.run(launch + ["pretrain.py", *args], cwd=root, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "CUDA_VISIBLE_DEVICES": "", **(env or {})})
    if proc.returncode != 0:
        raise RuntimeError(f"pretrain.py {' '.join(args)} (nproc {nproc}) failed:\n{proc.stderr[-2000:]}")
    with open(os.path.join(ROOT, json.loads(proc.stdout.strip().splitlines()[-1])["summary"])) as f:  # all of it
        return json.load(f)


def parity(base: list[str], batch_size: int, grad_accum: int, layouts: list[str], out: str,
           precisions=("bf16", "fp32"), progress=None) -> list[dict]:
    """Runs, per precision: one process (the reference), one process with 2x the micro-batches (the floor), and
    each layout under torchrun; compares every run's per-step losses with the reference's."""
    rows = []
    for prec in precisions:
        extra = ["--fp32"] if prec == "fp32" else []
        runs = [("1 process", [], 1),
                ("1 process, 2x micro-batches (floor)",
                 ["--batch-size", str(batch_size // 2), "--grad-accum", str(grad_accum * 2)], 1)]
        runs += [(lay, *_layout_flags(lay)) for lay in layouts]
        ref = None
        for name, flags, nproc in runs:
            res = run_pretrain(base + extra + flags + ["--out", os.path.join(out, f"run{len(rows)}")], nproc)
            losses = res["losses"]
            if ref is None:
                ref = losses
            diff = [abs(a - b) for a, b in zip(losses, ref)]
            rows.append({"precision": prec, "run": name, "processes": nproc, "losses": losses,
                         "first_step_bit_equal": losses[0] == ref[0], "max_abs_diff": max(diff),
                         "printed_equal": [round(a, 5) for a in losses] == [round(b, 5) for b in ref]})
            if progress:
                progress(rows[-1])
    for r in rows:       # each run against the floor of its precision
        floor = next(f["max_abs_diff"] for f in rows if f["precision"] == r["precision"] and "floor" in f["run"])
        r["vs_floor"] = r["max_abs_diff"] / floor if floor else float("nan")
    return rows


def parity_table(rows: list[dict]) -> str:
    lines = ["| precision | run | procs | step-1 loss bit-equal | max abs diff of the losses | / floor | "
             "equal at 5 decimals |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["run"] == "1 process":
            lines.append(f"| {r['precision']} | 1 process (reference) | 1 | - | - | - | - |")
            continue
        lines.append(f"| {r['precision']} | {r['run']} | {r['processes']} | "
                     f"{'yes' if r['first_step_bit_equal'] else 'no'} | {r['max_abs_diff']:.1e} | "
                     f"{r['vs_floor']:.1f} | {'yes' if r['printed_equal'] else 'no'} |")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description="Loss parity: pretrain.py --tiny under torchrun in several layouts "
                                 "(bf16 and fp32, CPU + gloo) against one process and its noise floor.")
    ap.add_argument("--steps", type=int, default=4, help="optimizer steps per run (default 4)")
    ap.add_argument("--layouts", default="dp=2;fsdp=2;sp=2;tp=2;fsdp=2,tp=2;dp=2,sp=2",
                    help="';'-separated layouts (default dp=2;fsdp=2;sp=2;tp=2;fsdp=2,tp=2;dp=2,sp=2)")
    ap.add_argument("--out", default="out/parity", help="run directories and parity.json")
    args = ap.parse_args(argv)
    layouts = [l for l in args.layouts.split(";") if l]
    try:
        for lay in layouts:
            _layout_flags(lay)
    except ValueError as e:
        ap.error(str(e))
    if args.steps < 1:
        ap.error("--steps must be >= 1")
    from tqdm import tqdm
    bar = tqdm(total=2 * (2 + len(layouts)), desc="parity runs", dynamic_ncols=True)
    # pretrain.TINY with twice its rows: its 4096-token stage then has 2 rows per step, one per data rank
    tiny = dict(batch_size=64, grad_accum=1)         # checked against pretrain.TINY by tests/test_parallel.py
    base = ["--tiny", "--batch-size", str(tiny["batch_size"]), "--max-steps", str(args.steps), "--seed", "0",
            "--samples", "0"]
    rows = parity(base, tiny["batch_size"], tiny["grad_accum"], layouts, args.out,
                  progress=lambda r: (bar.update(1), bar.set_postfix_str(f"{r['precision']} {r['run']}")))
    bar.close()
    print(f"pretrain.py --tiny --max-steps {args.steps} --seed 0: {args.steps} losses per run vs one process")
    print(parity_table(rows))
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "parity.json")
    with open(path + ".tmp", "w") as f:
        json.dump(rows, f, indent=1)
    os.replace(path + ".tmp", path)
    print(f"(per-step losses in {path})")
    return rows


if __name__ == "__main__":
    main()
