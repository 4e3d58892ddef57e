#!/usr/bin/env bash
# Builds the Debian package from the files git tracks (as they are in the
# work tree) with Debian 12's own python3 and pybuild, then runs lintian.
# Usage: scripts/build-deb.sh [OUTDIR]   (default build/deb)
# The packaging lives in packaging/debian/; it is copied to debian/ in a
# scratch copy of the tree, so the repository root stays free of it.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
out=${1:-build/deb}
mkdir -p "$out"
out=$(cd "$out" && pwd)

BUILD_DEPS=(debhelper dh-python pybuild-plugin-pyproject python3-all-dev python3-setuptools
            python3-prctl python3-seccomp lintian dpkg-dev)
scripts/apt-ensure.sh build-deb "${BUILD_DEPS[@]}"

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
src=$work/pyvirtiofsd
mkdir "$src"
git ls-files -z --cached --others --exclude-standard | tar --null -T - -cf - | tar -xf - -C "$src"
cp -r packaging/debian "$src/debian"
cp packaging/systemd/pyvirtiofsd@.service "$src/debian/pyvirtiofsd@.service"
# dh_installtmpfiles: /usr/lib/tmpfiles.d/pyvirtiofsd.conf, created at install
cp packaging/systemd/pyvirtiofsd.tmpfiles "$src/debian/pyvirtiofsd.tmpfiles"
# Debian's own python3, whatever else is first on PATH (pyenv, a venv)
(cd "$src" && PATH=/usr/sbin:/usr/bin:/sbin:/bin dpkg-buildpackage -us -uc -b >"$work/build.log" 2>&1) || {
  tail -40 "$work/build.log"; echo "build-deb: dpkg-buildpackage failed"; exit 1; }
rm -f "$out"/pyvirtiofsd_*.deb
mv "$work"/pyvirtiofsd_*.deb "$out/"
deb=$(ls "$out"/pyvirtiofsd_*.deb)
echo "build-deb: $deb"
# lintian: errors fail the build, warnings are printed
lintian --fail-on error --tag-display-limit 0 "$deb"
