#!/bin/sh
# In-guest parallel workloads (bench.py's two-queue part, platform b):
#
#   sh parallel.sh MNT SEQ_MIB RAND_SECONDS FILES
#
# fio with two jobs, each pinned to its own vCPU (cpus_allowed_policy=split),
# so Linux 6.11+ sends each job's requests on its own request queue:
# sequential write and read (1 MiB blocks, SEQ_MIB/2 each), random read and
# write (4 KiB, time based); figures are the two jobs together
# (group_reporting). Then parallel_meta.py: two metadata.py processes, one
# pinned to each vCPU, FILES/2 files each.
#
# Prints run.sh's "BENCH {...}" lines, phases prefixed "par-"; "BENCH-FAIL"
# for a step that failed. Exits non-zero if any step failed. With
# BENCH_MARKS=1 (tests/perf/guest_profile.py --parallel), run.sh's
# "@@BENCH-MARK start|end par-STEP@@" around each fio step.
HERE=$(dirname "$0")
MNT=${1:-/mnt}
SEQ_MIB=${2:-256}
RAND_SECONDS=${3:-10}
FILES=${4:-10000}
export LC_ALL=C PYTHONDONTWRITEBYTECODE=1
DIR="$MNT/bench-par"
status=0

drop() { sync; echo 3 > /proc/sys/vm/drop_caches; sleep 0.5; }
mark() { [ -n "$BENCH_MARKS" ] || return 0; echo "@@BENCH-MARK $1 par-$2@@"; sleep 1; }

rm -rf "$DIR"; mkdir -p "$DIR" || exit 2
for job in seq-write seq-read rand-read rand-write; do
    case $job in
        seq-write) args="--rw=write --bs=1M --end_fsync=1" ;;
        seq-read) args="--rw=read --bs=1M" ;;
        rand-read) args="--rw=randread --bs=4k --time_based=1 --runtime=$RAND_SECONDS --randrepeat=1" ;;
        rand-write) args="--rw=randwrite --bs=4k --time_based=1 --runtime=$RAND_SECONDS --randrepeat=1 --end_fsync=1" ;;
    esac
    drop
    mark start "$job"
    # shellcheck disable=SC2086
    if fio --output-format=json --output=/tmp/fio-par-$job.json --name=par --directory="$DIR" \
           --filename_format='par.$jobnum' --size=$((SEQ_MIB / 2))M --numjobs=2 \
           --cpus_allowed=0-1 --cpus_allowed_policy=split --ioengine=psync --invalidate=1 \
           --group_reporting $args >/tmp/fio-par-$job.err 2>&1; then
        mark end "$job"
        python3 - "$job" /tmp/fio-par-$job.json <<'PY'
import json, sys
job, path = sys.argv[1], sys.argv[2]
j = json.load(open(path))["jobs"][0]
side = j["write"] if "write" in job else j["read"]
print("BENCH " + json.dumps({"phase": "par-" + job, "bw_bytes": side["bw_bytes"], "iops": side["iops"],
                             "seconds": side["runtime"] / 1000.0, "ops": side["total_ios"]}), flush=True)
PY
    else
        echo "BENCH-FAIL par-$job"; cat /tmp/fio-par-$job.err; status=1
    fi
done
rm -rf "$DIR"

python3 "$HERE/parallel_meta.py" "$MNT/bench-par-meta" --files "$FILES" || { echo "BENCH-FAIL par-metadata"; status=1; }
exit $status
