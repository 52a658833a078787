#!/usr/bin/env python3
"""Per-kernel time of one step from a profiled GPU run (CUBECL_PROFILE=basic in gpu_bench.sh).

    python3 xtask/device/profile_summary.py NAME.log [ROWS]

CubeCL's profiler logs one `| duration | kernel | ...` line per kernel; measure.py stamps each
line with the seconds since the start (unstamped logs, such as a run's plain stderr on wgpu,
work too). This sums the kernels logged between the last two progress
lines (`bench step ...` or `bench-forward: forward ...`), that is the last step or forward, by
kernel name, and prints a markdown table, largest first. The profiler waits for every kernel, so
the sum is the GPU time of the kernels, not the wall time of an unprofiled step.
"""
import collections
import re
import sys

UNITS = {"ns": 1e-9, "µs": 1e-6, "us": 1e-6, "ms": 1e-3, "s": 1.0}
KERNEL = re.compile(r"\s*(?:[\d.]+ )?\| ([\d.]+)(ns|µs|us|ms|s)\s*\| ([^|]+)")
PROGRESS = re.compile(r"\s*(?:[\d.]+ )?(bench step|bench-forward: forward)")


def main() -> None:
    lines = open(sys.argv[1], encoding="utf-8").read().splitlines()
    rows = int(sys.argv[2]) if len(sys.argv) > 2 else 15
    marks = [i for i, line in enumerate(lines) if PROGRESS.match(line)]
    if len(marks) < 2:
        sys.exit("fewer than two progress lines: nothing to delimit a step")
    kernels = collections.defaultdict(lambda: [0, 0.0])
    for line in lines[marks[-2] + 1 : marks[-1]]:
        m = KERNEL.match(line)
        if m:
            entry = kernels[m.group(3).strip()]
            entry[0] += 1
            entry[1] += float(m.group(1)) * UNITS[m.group(2)]
    total = sum(seconds for _, seconds in kernels.values())
    print(f"{sum(n for n, _ in kernels.values())} kernels, {total * 1e3:.1f} ms of GPU time\n")
    print("| kernel | launches | ms | share |\n|---|---|---|---|")
    for name, (n, seconds) in sorted(kernels.items(), key=lambda kv: -kv[1][1])[:rows]:
        print(f"| {name} | {n} | {seconds * 1e3:.1f} | {100 * seconds / total:.1f}% |")


if __name__ == "__main__":
    main()
