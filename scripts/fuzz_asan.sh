#!/usr/bin/env bash
# make fuzz-asan: the fuzz target over builds of the compiled virtqueue core
# (daemon/virtio/_vqcore.c) and the compiled FUSE ops (daemon/fuse/_fastops.c)
# instrumented with AddressSanitizer,
# UndefinedBehaviorSanitizer and libFuzzer coverage, in build/asan/ (the
# in-place build stays as it is). Python is not instrumented: the ASan
# runtime of atheris is preloaded; leak detection is off (CPython keeps
# memory until exit by design); any finding aborts the run with a report and
# the input saved. "--equivalence [PYTEST_ARGS]" runs the equivalence property
# tests over those builds instead. Other arguments go to
# tests.fuzz.fuzz_chain_fuse, e.g.
#   scripts/fuzz_asan.sh --queue-only --iterations 1000000
#   scripts/fuzz_asan.sh --time 600
# Needs clang and libclang-rt-14-dev (installed here if missing, Debian 12).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python

if ! command -v clang >/dev/null || ! dpkg-query -W -f='${Status}' libclang-rt-14-dev 2>/dev/null | grep -q "ok installed"; then
  echo "fuzz-asan: installing clang libclang-rt-14-dev"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends clang libclang-rt-14-dev >/dev/null
fi

OUT=build/asan
mkdir -p "$OUT"
INC=$($PY -c 'import sysconfig; print(sysconfig.get_paths()["include"])')
SUFFIX=$($PY -c 'import sysconfig; print(sysconfig.get_config_var("EXT_SUFFIX"))')
EXTS=()
for SRC in daemon/virtio/_vqcore.c daemon/fuse/_fastops.c; do
  SO="$OUT/$(basename "$SRC" .c)$SUFFIX"
  clang -shared -fPIC -O1 -g -fno-omit-frame-pointer -std=gnu11 -fno-strict-aliasing \
    -fsanitize=address,undefined,fuzzer-no-link -fno-sanitize-recover=all \
    -I"$INC" -Idaemon/virtio "$SRC" -o "$SO"
  echo "fuzz-asan: built $SO"
  EXTS+=(--extension "$SO")
done

ATHERIS=$($PY -c 'import atheris; print(atheris.path())')
export LD_PRELOAD="$ATHERIS/asan_with_fuzzer.so"
# a small quarantine: RSS settles within the warm-up, so the growth check holds
export ASAN_OPTIONS=detect_leaks=0:quarantine_size_mb=16:abort_on_error=1:handle_abort=1
export UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1
if [ "${1:-}" = "--equivalence" ]; then
  # the equivalence property tests (compiled vs pure) over the sanitized builds
  shift
  exec "$PY" -m tests.fuzz.with_extensions "${EXTS[@]}" -- -q \
    tests/unit/test_compiled_equivalence.py tests/unit/test_fastops_equivalence.py \
    tests/unit/test_batch_equivalence.py tests/unit/test_wait_loop.py tests/unit/test_fastops_meta.py \
    tests/unit/test_create_in_c.py tests/unit/test_forget_in_c.py tests/unit/test_readdirplus_in_c.py \
    tests/unit/test_readdir_in_c.py tests/unit/test_release_in_c.py tests/unit/test_releasedir_in_c.py \
    tests/unit/test_open_in_c.py tests/unit/test_mkdir_in_c.py tests/unit/test_setattr_in_c.py \
    tests/unit/test_readlink_in_c.py tests/unit/test_statfs_in_c.py tests/unit/test_enosys_in_c.py "$@"
fi
exec "$PY" -m tests.fuzz.fuzz_chain_fuse --engine atheris "${EXTS[@]}" "$@"
