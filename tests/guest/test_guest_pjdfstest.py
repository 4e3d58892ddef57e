"""pjdfstest (POSIX conformance) as root in a platform-a guest, against ours
(``--cache auto --xattr``), QEMU's C virtiofsd and the Rust virtiofsd, one
boot each: ours must fail no assertion that neither reference daemon fails
(issue 20; docs/credentials.md has the full run's counts).

Marker ``pjdfstest``: ``make pjdfstest`` runs it (the source is cloned on
first use), ``make test`` cannot (CI reaches no GitHub). With
PYVIRTIOFSD_GUEST_QUICK=1 (as ``make pjdfstest`` runs it) only QUICK_FILES run, one
file of each credential-related directory (about 2 min a daemon under
TCG); without it the whole suite runs (hours: ~8,800 assertions at about
one a second).
"""

from __future__ import annotations

import os

import pytest

from .conftest import guest_prerequisites
from .pjdfstest import DAEMONS, QUICK_FILES, describe_only_ours, only_ours, report, run_pjdfstest

pytestmark = [pytest.mark.guest, pytest.mark.pjdfstest]   # make pjdfstest; not make test (README)

QUICK = os.environ.get("PYVIRTIOFSD_GUEST_QUICK") == "1"
PATHS = QUICK_FILES if QUICK else ()
TIMEOUT = 15 * 60 if QUICK else 4 * 3600   # one daemon's boot


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    why = guest_prerequisites()
    if why:  # scripts/setup.sh installs all of it: missing means broken, not "skip"
        pytest.fail(f"guest tests cannot run: {why}")
    out = {kind: run_pjdfstest(kind, PATHS, workdir=tmp_path_factory.mktemp(f"pjdfstest-{kind}"),
                               timeout=TIMEOUT)
           for kind in DAEMONS}
    print("\n" + report(out))
    return out


def test_ours_fails_no_assertion_that_both_reference_daemons_pass(runs):
    assert not only_ours(runs), ("failures only ours has:\n" + describe_only_ours(runs)
                                 + "\n\n" + report(runs))


def test_every_daemon_ran_every_assertion(runs):
    """The comparison means something only if each boot ran every file to
    its plan, and the same files and assertions."""
    counts = {k: (r.result.total_files, r.result.total_tests) for k, r in runs.items()}
    for kind, r in runs.items():
        assert not r.result.incomplete(), f"{kind}: incomplete TAP in {r.result.incomplete()} ({r.log})"
        if PATHS:
            assert sorted(r.result.files) == sorted(PATHS), (kind, sorted(r.result.files))
    assert len(set(counts.values())) == 1, counts
