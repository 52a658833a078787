"""Where one training step's GPU time goes, from Nsight Compute's per-kernel times.

Input: the CSV of `ncu --metrics gpu__time_duration.sum --csv` over a run of a few identical
steps (xtask/device/gpu_bench.sh, `ncu_times`). The last step is found as the longest tail of
kernels that repeats the same kernel names just before it; its kernels are grouped by kind and
by name. Prints JSON: the step's kernel count and GPU time, each group's time and count, and
the kernels that take the most time.

    python3 xtask/peer/step_breakdown.py ncu_b8.csv > ncu_b8.json
"""

import csv
import json
import re
import sys
from collections import defaultdict

UNITS = {"nsecond": 1e-9, "ns": 1e-9, "usecond": 1e-6, "us": 1e-6, "msecond": 1e-3, "ms": 1e-3,
         "second": 1.0, "s": 1.0}

# Kinds of kernel, first match wins: ours (CubeCL, cuBLASLt, the fused attention) and the
# peer's (PyTorch's ATen kernels, cuBLAS, its flash attention).
KINDS = [
    ("attention (fused)", r"^qf_|flash|fmha|attention"),
    ("GEMM (cuBLAS/cuBLASLt)", r"gemm|xmma|cutlass|nvjet|cublas|sm90_|sm80_"),
    ("optimizer", r"adam|multi_tensor|foreach|qo_norm"),
    ("loss / softmax", r"cross_entropy|log_softmax|softmax|nll_loss"),
    ("reductions", r"reduce|sum|mean|norm"),
    ("casts", r"cast|to_dtype|convert|copy_kernel.*Half|bfloat16_copy"),
    ("copies / layout", r"copy|slice|gather|scatter|index|cat|transpose|permute|contiguous|embedding"),
    ("element-wise", r"elemwise|elementwise|vectorized|unrolled|fuse|binary|unary|mul|add|silu|exp|rotary"),
]


def read(path):
    """[(kernel name, seconds)] in launch order."""
    rows = []
    with open(path, newline="") as f:
        lines = [line for line in f if line.startswith('"')]
    for row in csv.DictReader(lines):
        if row.get("Metric Name") != "gpu__time_duration.sum":
            continue
        value = float(row["Metric Value"].replace(",", ""))
        rows.append((row["Kernel Name"], value * UNITS.get(row.get("Metric Unit", "ns"), 1e-9)))
    return rows


MIN_STEP_KERNELS = 64


def last_step(rows):
    """The last period: the longest tail whose names repeat just before it (at most half).

    When the tail does not repeat (a run's last step can end differently: with its loss read
    one step late, the last step has no next step queued behind it), the run is cut where its
    first kernel's name comes back, if it comes back at least three times, and the last whole
    step before the final one is taken.
    """
    names = [name for name, _ in rows]
    n = len(names)
    # A step has hundreds of kernels; a short period is a run of alike kernels at the end.
    for period in range(n // 2, MIN_STEP_KERNELS - 1, -1):
        if names[n - 1] != names[n - 1 - period] or names[n - period] != names[n - 2 * period]:
            continue
        if names[n - period:] == names[n - 2 * period:n - period]:
            return rows[n - period:], True
    starts = [i for i, name in enumerate(names) if name == names[0]] if names else []
    if len(starts) >= 3:
        return rows[starts[-2]:starts[-1]], True
    return rows, False


def kind_of(name):
    lower = name.lower()
    for kind, pattern in KINDS:
        if re.search(pattern, lower):
            return kind
    return "other"


def short(name):
    """The kernel's name without template arguments, parameters and trailing ids."""
    name = re.sub(r"<.*", "", name)
    name = re.sub(r"\(.*", "", name)
    return re.sub(r"_?[0-9a-f]{8,}$", "", name)[:120]


def main():
    rows = read(sys.argv[1])
    step, found = last_step(rows)
    total = sum(seconds for _, seconds in step)
    kinds = defaultdict(lambda: [0.0, 0])
    names = defaultdict(lambda: [0.0, 0])
    for name, seconds in step:
        for table, key in ((kinds, kind_of(name)), (names, short(name))):
            table[key][0] += seconds
            table[key][1] += 1
    ranked = lambda table: sorted(table.items(), key=lambda item: -item[1][0])
    print(json.dumps({
        "kernels_in_run": len(rows),
        "step_found": found,
        "step_kernels": len(step),
        "step_gpu_ms": round(total * 1e3, 3),
        "kinds": {k: {"ms": round(s * 1e3, 3), "kernels": c, "share": round(s / total, 4)}
                  for k, (s, c) in ranked(kinds)},
        "top": [{"name": k, "ms": round(s * 1e3, 3), "kernels": c} for k, (s, c) in ranked(names)[:40]],
    }, indent=1))


if __name__ == "__main__":
    main()
