#!/usr/bin/env bash
# apt-ensure.sh WHO PACKAGE...: installs the Debian packages among PACKAGE...
# that are not installed yet (one apt-get update first, only then), saying
# so with WHO as the prefix. Used by setup.sh and build-deb.sh.
set -euo pipefail
who=$1
shift
missing=()
for p in "$@"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  echo "$who: installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
