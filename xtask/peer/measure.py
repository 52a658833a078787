#!/usr/bin/env python3
"""Runs a command and samples the GPU's used memory (NVML, every 20 ms) while it runs.

    python3 xtask/peer/measure.py NAME OUT_DIR LIMIT_SECONDS -- command args...

Writes OUT_DIR/NAME.json: the command's last JSON line merged with
{"peak_used_gib", "baseline_used_gib", "peak_delta_gib", "wall_seconds", "exit_code",
"timed_out", "busy_sm_mhz_median", "busy_power_w_mean", "busy_samples"}, OUT_DIR/NAME.log with its
stderr, streamed as it comes, each line stamped with the seconds since the start, and
OUT_DIR/NAME.gpu.csv with the sampled SM clock, power, utilisation and clock-limit reasons
(the "busy" figures are over the samples where the GPU was at least 90% busy: whether a run
is held back by its clock, ours and the peer alike). A command still
running at LIMIT_SECONDS is killed with its whole process group, so nothing it started lingers
on the GPU into the next measurement. The same sampler measures ours and the peer, so the figures
compare: device memory in use by the process, allocator pools included.
"""
import json
import os
import signal
import subprocess
import sys
import threading
import time

import pynvml


def main() -> None:
    name, out_dir, limit = sys.argv[1], sys.argv[2], float(sys.argv[3])
    assert sys.argv[4] == "--"
    cmd = sys.argv[5:]
    pynvml.nvmlInit()
    handle = pynvml.nvmlDeviceGetHandleByIndex(0)
    used = lambda: pynvml.nvmlDeviceGetMemoryInfo(handle).used / 2**30
    baseline = used()
    peak = [baseline]
    done = threading.Event()
    series = []  # (seconds, SM MHz, watts, busy %, clock-limit reasons)
    t0 = time.time()

    def reasons() -> int:
        for call in ("nvmlDeviceGetCurrentClocksEventReasons",
                     "nvmlDeviceGetCurrentClocksThrottleReasons"):
            try:
                return getattr(pynvml, call)(handle)
            except (AttributeError, pynvml.NVMLError):
                continue
        return -1

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], used())
            try:  # the memory figure must survive a driver without these queries
                series.append((
                    time.time() - t0,
                    pynvml.nvmlDeviceGetClockInfo(handle, pynvml.NVML_CLOCK_SM),
                    pynvml.nvmlDeviceGetPowerUsage(handle) / 1000,
                    pynvml.nvmlDeviceGetUtilizationRates(handle).gpu,
                    reasons(),
                ))
            except pynvml.NVMLError:
                pass
            time.sleep(0.02)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    start = time.time()
    timed_out = False
    with open(f"{out_dir}/{name}.log", "w") as log, open(f"{out_dir}/{name}.stdout", "w") as out:
        proc = subprocess.Popen(
            cmd, stdout=out, stderr=subprocess.PIPE, start_new_session=True, text=True
        )

        def stamp() -> None:  # each line of stderr, with the seconds since the start
            for line in proc.stderr:
                log.write(f"{time.time() - start:8.2f} {line}")
                log.flush()

        stamper = threading.Thread(target=stamp, daemon=True)
        stamper.start()
        try:
            proc.wait(timeout=limit)
        except subprocess.TimeoutExpired:
            timed_out = True
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        stamper.join(timeout=5)
    stdout = open(f"{out_dir}/{name}.stdout").read()
    done.set()
    thread.join()
    result = {}
    for line in reversed(stdout.splitlines()):
        try:
            result = json.loads(line)
            break
        except json.JSONDecodeError:
            continue
    with open(f"{out_dir}/{name}.gpu.csv", "w") as f:
        f.write("seconds,sm_mhz,power_w,busy_pct,clock_reasons\n")
        for row in series:
            f.write("%.3f,%d,%.1f,%d,%d\n" % row)
    busy = [row for row in series if row[3] >= 90]
    clocks = sorted(row[1] for row in busy)
    result.update({
        "busy_samples": len(busy),
        "busy_sm_mhz_median": clocks[len(clocks) // 2] if clocks else None,
        "busy_power_w_mean": sum(row[2] for row in busy) / len(busy) if busy else None,
        "name": name,
        "peak_used_gib": peak[0],
        "baseline_used_gib": baseline,
        "peak_delta_gib": peak[0] - baseline,
        "wall_seconds": time.time() - start,
        "exit_code": proc.returncode,
        "timed_out": timed_out,
    })
    with open(f"{out_dir}/{name}.json", "w") as f:
        json.dump(result, f)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
