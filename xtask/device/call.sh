# The frame every device-call script shares; source it first, with the call's name:
#
#   source xtask/device/call.sh issue6
#
# Results go to /tmp/NAME-results (gpu_bench.sh writes there through $OUT) and are packed,
# also when the call is cut short, into the device tool's $OUT as results.tar.xz: the device
# returns at most 8 files, and a call writes dozens. $O is the device tool's folder (for files
# to send back beside the archive), $G the benchmark script. The CubeCL cache is not packed.
set -u
O=${OUT:-/tmp/$1}
export OUT=/tmp/$1-results SAVE_CACHE=0
mkdir -p "$OUT" "$O"
trap 'tar -cJf "$O/results.tar.xz" -C "$OUT" .' EXIT
G=xtask/device/gpu_bench.sh

# summary KEY...: one line per JSON result, with those of its fields that it has.
summary() {
  local f
  for f in "$OUT"/*.json; do
    python3 - "$f" "$@" <<'PY'
import json, os, sys
d = json.load(open(sys.argv[1]))
print(os.path.basename(sys.argv[1]), {k: d.get(k) for k in sys.argv[2:] if k in d})
PY
  done
}

# run_errors: the lines of the call's log that name an error, a panic or an exit code.
run_errors() { grep -i "error\|panic\|exit" "$OUT/run.log" | head -20; }
