"""Run pytest with other builds of the extensions loaded in place of the
in-tree ones: ``scripts/fuzz_asan.sh --equivalence`` runs the equivalence
property tests this way over the ASan + UBSan builds, so that every
hypothesis example goes through the sanitized C.

    python -m tests.fuzz.with_extensions --extension FILE... -- PYTEST_ARGS...
"""

from __future__ import annotations

import argparse
import os
import sys

from tests.fuzz.fuzz_chain_fuse import load_extension


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--extension", metavar="FILE", action="append", default=[], required=True)
    p.add_argument("pytest_args", nargs="*")
    args = p.parse_args(argv)
    paths = [os.path.abspath(path) for path in args.extension]
    for path in paths:
        load_extension(path)
    import pytest
    from daemon.fuse import fastpath
    from daemon.virtio import compiled
    loaded = (fastpath._ext.__file__, compiled._ext.__file__)
    if sorted(loaded) != sorted(paths):
        print(f"with_extensions: loaded {loaded}, not {paths}", file=sys.stderr)
        return 2
    return int(pytest.main(["-p", "no:cacheprovider", *args.pytest_args]))


if __name__ == "__main__":
    sys.exit(main())
