#!/usr/bin/env python3
"""Compares the loss curves of two `qwen-sft bench` reports (their `losses` arrays).

    python3 xtask/peer/compare_curves.py FAST.json REFERENCE.json [TOLERANCE]

Prints one JSON line: the steps compared, the largest relative difference |a - b| / |b| over
every step and the step where it occurs, and whether it is within TOLERANCE (default 0.01, the
1% of issue 6). Exits 1 when it is not, or when the curves differ in length.
"""
import json
import sys


def main() -> None:
    fast, reference = (json.load(open(path))["losses"] for path in sys.argv[1:3])
    tolerance = float(sys.argv[3]) if len(sys.argv) > 3 else 0.01
    if len(fast) != len(reference) or not fast:
        print(json.dumps({"error": f"curves of {len(fast)} and {len(reference)} steps"}))
        sys.exit(1)
    diffs = [abs(a - b) / abs(b) for a, b in zip(fast, reference)]
    worst = max(range(len(diffs)), key=diffs.__getitem__)
    result = {
        "steps": len(diffs),
        "max_relative_diff": diffs[worst],
        "at_step": worst + 1,
        "fast_last": fast[-1],
        "reference_last": reference[-1],
        "tolerance": tolerance,
        "pass": diffs[worst] <= tolerance,
    }
    print(json.dumps(result))
    sys.exit(0 if result["pass"] else 1)


if __name__ == "__main__":
    main()
