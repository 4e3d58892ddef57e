#!/bin/sh
# In-guest benchmark driver (runs chrooted into the host root, virtiofs at $MNT).
#
#   sh run.sh MNT SEQ_MIB RAND_SECONDS FILES TARBALL|- FOOTPRINT_DIR|- LAT_COUNT
#
# fio jobs (*.fio), then latency.py (round trips; LAT_COUNT 0 skips it), then
# metadata.py.
#
# Prints one line per measurement:
#   BENCH {"phase": "seq-write", "bw_bytes": ..., "iops": ..., "seconds": ...}
#   BENCH {"phase": "create", "seconds": ..., "ops": ...}         (metadata.py)
# and "@@BENCH-IDLE@@" / "@@BENCH-LOOKED-UP@@" markers for the host's
# memory measurements. With BENCH_MARKS=1 in the environment, also
# "@@BENCH-MARK start|end PHASE@@" around each step, each followed by a
# second's pause, so the host can read the daemons' counters between steps
# (tests/perf/guest_profile.py). Exits non-zero if any step failed.
HERE=$(dirname "$0")
MNT=${1:-/mnt}
SEQ_MIB=${2:-256}
RAND_SECONDS=${3:-10}
FILES=${4:-10000}
TARBALL=${5:--}
FOOTPRINT=${6:--}
LAT_COUNT=${7:-2000}
export LC_ALL=C PYTHONDONTWRITEBYTECODE=1
export BENCH_DIR="$MNT/bench-fio" SEQ_SIZE="${SEQ_MIB}M" RAND_SECONDS
status=0

drop() { sync; echo 3 > /proc/sys/vm/drop_caches; sleep 0.5; }
mark() { [ -n "$BENCH_MARKS" ] || return 0; echo "@@BENCH-MARK $1 $2@@"; sleep 1; }

echo "@@BENCH-IDLE@@"; mark start idle; sleep 3; mark end idle
rm -rf "$BENCH_DIR"; mkdir -p "$BENCH_DIR" || exit 2
for job in seq-write seq-read rand-read rand-write; do
    drop
    mark start $job
    if fio --output-format=json --output=/tmp/fio-$job.json "$HERE/$job.fio" >/tmp/fio-$job.err 2>&1; then
        mark end $job
        python3 - "$job" /tmp/fio-$job.json <<'EOF'
import json, sys
job, path = sys.argv[1], sys.argv[2]
j = json.load(open(path))["jobs"][0]
side = j["write"] if "write" in job else j["read"]
print("BENCH " + json.dumps({"phase": job, "bw_bytes": side["bw_bytes"], "iops": side["iops"],
                             "seconds": side["runtime"] / 1000.0, "ops": side["total_ios"]}), flush=True)
EOF
    else
        echo "BENCH-FAIL $job"; cat /tmp/fio-$job.err; status=1
    fi
done
rm -rf "$BENCH_DIR"

if [ "$LAT_COUNT" -gt 0 ]; then
    mark start latency
    python3 "$HERE/latency.py" "$MNT/bench-lat" --count "$LAT_COUNT" || { echo "BENCH-FAIL latency"; status=1; }
    mark end latency
    rm -rf "$MNT/bench-lat"
fi

set -- python3 "$HERE/metadata.py" "$MNT/bench-meta" --files "$FILES"
[ "$TARBALL" != "-" ] && set -- "$@" --tar "$TARBALL"
[ "$FOOTPRINT" != "-" ] && set -- "$@" --footprint "$MNT/$FOOTPRINT"
mark start metadata
"$@" || { echo "BENCH-FAIL metadata"; status=1; }
mark end metadata
exit $status
