# pyvirtiofsd: the two commands a user needs are `make demo` and `make test`.
PY := .venv/bin/python

.PHONY: setup deb demo lint test test-full test-pure unit test-frontend test-guest test-usecases pjdfstest fuzz fuzz-asan bench profile clean

setup:
	./scripts/setup.sh

## The Debian package (build/deb/pyvirtiofsd_*.deb), built with Debian's
## python3 and pybuild and checked by lintian.
deb:
	./scripts/build-deb.sh build/deb

## Start the daemon on a demo directory and boot a guest that uses it.
demo: setup
	$(PY) -m tests.guest.demo

## ruff over daemon/ and tests/, mypy over daemon/ (pyproject.toml says
## which rules and why), and pytest's collection of every test module (an
## import error shows in seconds, not halfway through the suite); `make test`
## runs it first.
lint: setup
	$(PY) -m ruff check daemon tests
	$(PY) -m mypy
	$(PY) -m pytest -p no:cacheprovider -q --collect-only tests > /dev/null || { $(PY) -m pytest -p no:cacheprovider -q --collect-only tests | tail -30; exit 1; }
	@# merge and editor leftovers, and downloaded wheels, never belong in the tree
	@! git ls-files 2>/dev/null | grep -E '\.(orig|rej|bak|swp|whl)$$|~$$' || { echo "lint: leftover files above"; exit 1; }

## Everything: the lint gate, unit and frontend tests on the pure-Python
## path, then unit, vhost-user frontend and real-guest tests (the compiled
## request path). Guest tests use their quick sizes (32 MiB files,
## 1,000-entry directories, 5,000 open files at once) so that the run stays
## well inside CI's time; `make test-full` runs them at full size.
test: setup lint
	$(MAKE) test-pure
	PYVIRTIOFSD_GUEST_QUICK=1 $(PY) -m pytest -p no:cacheprovider -q -rfE -m "not pjdfstest" tests

test-full: setup lint
	$(PY) -m pytest -p no:cacheprovider -q -rfE -m "not pjdfstest" tests

test-pure: setup
	PYVIRTIOFSD_PURE=1 $(PY) -m pytest -p no:cacheprovider -q -rfE tests/unit tests/frontend

unit: setup
	$(PY) -m pytest -p no:cacheprovider -q tests/unit

test-frontend: setup
	$(PY) -m pytest -p no:cacheprovider -q tests/frontend

test-guest: setup
	$(PY) -m pytest -p no:cacheprovider -q tests/guest

## The virtiofs use cases alone (also part of `make test`): two guests on one
## directory, SIGKILL during fsynced writes, ro/remount and atime, a Debian root
## booted from the share (dpkg, reboot), on both platforms (20-30 min).
test-usecases: setup
	$(PY) -m pytest -p no:cacheprovider -q -rfE -m usecase tests/guest

## pjdfstest (POSIX conformance: cloned at a pinned commit and built on first
## use; from GitHub, or $$PYVIRTIOFSD_PJDFSTEST_GIT, a local clone, where
## GitHub is out of reach, as it is for CI, which therefore cannot run it) as root in a
## platform-a guest against ours (--cache auto --xattr), the C and the Rust
## virtiofsd, one boot each: per-daemon counts and failing assertions, and
## the failures only ours has (exit status 1 if any). PJDFSTEST_ARGS=--quick
## runs the credential-related directories only; --platform b the other guest.
pjdfstest: setup
	PYVIRTIOFSD_GUEST_QUICK=1 $(PY) -m pytest -p no:cacheprovider -q -rfE -m pjdfstest tests/guest
	$(PY) -m tests.guest.pjdfstest $(PJDFSTEST_ARGS)

## One million inputs of the chain + FUSE fuzz target (FUZZ_ITERATIONS=N to change);
## prints inputs, time, fds and RSS, fails on any crash, hang or growth.
fuzz: setup
	$(PY) -m tests.fuzz.fuzz_chain_fuse --iterations $(or $(FUZZ_ITERATIONS),1000000)

## The fuzz target with the compiled virtqueue core built with ASan + UBSan
## (docs/compiled.md): FUZZ_ITERATIONS inputs (default 1,000,000) comparing
## the compiled and the pure path only, then FUZZ_SECONDS (default 150) of
## the whole chain + FUSE target on the compiled path, then the equivalence
## property tests of both extensions over the same builds.
fuzz-asan: setup
	./scripts/fuzz_asan.sh --queue-only --iterations $(or $(FUZZ_ITERATIONS),1000000) --reset-every 20000
	./scripts/fuzz_asan.sh --time $(or $(FUZZ_SECONDS),150) --reset-every 500
	./scripts/fuzz_asan.sh --equivalence

## Ours vs QEMU's C virtiofsd and the Rust virtiofsd, same workloads in the
## same run (real guest on both platforms, two-queue parallel on platform b,
## daemon-bound, footprint, a Debian root on virtio-fs booted, dpkg -i,
## rebooted); writes docs/perf/results.md and ratios.png.
## BENCH_ARGS=--quick for a short run.
bench: setup
	.venv/bin/pip install -q --disable-pip-version-check -e ".[bench]" --config-settings editable_mode=compat
	$(PY) -m tests.perf.bench $(BENCH_ARGS)

## Where the time goes (docs/perf/profile.md): CPU per process in a real
## guest, py-spy on the request worker, cProfile of the worker loop, the
## floor of a Python GETATTR, the C daemon with and without its thread pool.
profile: setup
	.venv/bin/pip install -q --disable-pip-version-check -e ".[bench]" --config-settings editable_mode=compat
	$(PY) -m tests.perf.profile

clean:
	rm -rf .venv .cache build *.egg-info daemon/virtio/*.so
