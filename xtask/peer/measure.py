#!/usr/bin/env python3
"""Runs a command and samples the GPU's used memory (NVML, every 20 ms) while it runs.

    python3 xtask/peer/measure.py NAME OUT_DIR -- command args...

Writes OUT_DIR/NAME.json: the command's last JSON line merged with
{"peak_used_gib", "baseline_used_gib", "peak_delta_gib", "wall_seconds", "exit_code"}, and
OUT_DIR/NAME.log with its output. The same sampler measures ours and the peer, so the figures
compare: device memory in use by the process, allocator pools included.
"""
import json
import subprocess
import sys
import threading
import time

import pynvml


def main() -> None:
    name, out_dir = sys.argv[1], sys.argv[2]
    assert sys.argv[3] == "--"
    cmd = sys.argv[4:]
    pynvml.nvmlInit()
    handle = pynvml.nvmlDeviceGetHandleByIndex(0)
    used = lambda: pynvml.nvmlDeviceGetMemoryInfo(handle).used / 2**30
    baseline = used()
    peak = [baseline]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], used())
            time.sleep(0.02)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    start = time.time()
    with open(f"{out_dir}/{name}.log", "w") as log:
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=log, text=True)
        log.write(proc.stdout)
    done.set()
    thread.join()
    result = {}
    for line in reversed(proc.stdout.splitlines()):
        try:
            result = json.loads(line)
            break
        except json.JSONDecodeError:
            continue
    result.update({
        "name": name,
        "peak_used_gib": peak[0],
        "baseline_used_gib": baseline,
        "peak_delta_gib": peak[0] - baseline,
        "wall_seconds": time.time() - start,
        "exit_code": proc.returncode,
    })
    with open(f"{out_dir}/{name}.json", "w") as f:
        json.dump(result, f)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
