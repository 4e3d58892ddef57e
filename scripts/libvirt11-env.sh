#!/bin/sh
# Run a command with bookworm-backports' libvirt 11.3 in place of the
# system's libvirt 9.0, without installing it:
#   scripts/libvirt11-env.sh ROOT STATE CMD [ARGS...]
# ROOT is where its packages are unpacked (tests/guest/platforms.py,
# ensure_libvirt11: apt-get download + dpkg-deb -x), STATE an empty
# directory for its configuration and state. CMD runs in private mount and
# pid namespaces where 11.3's driver modules, helpers and data are bound over
# 9.0's paths (they are compiled into libvirt: /usr/lib/x86_64-linux-gnu/
# libvirt, /usr/lib/libvirt, /usr/share/libvirt), /etc/libvirt, /run/libvirt,
# /var/lib/libvirt, /var/cache/libvirt and /var/log/libvirt are STATE's, /run
# is a fresh tmpfs (libvirtd.pid, virtlogd.pid), and 11.3's libvirtd,
# virtlogd and virsh come first on PATH with its libvirt0 on
# LD_LIBRARY_PATH. The system's 9.0, running or not, sees none of it; every
# other library 11.3 needs is bookworm's (docs/libvirt.md).
set -eu
[ $# -ge 3 ] || { echo "usage: $0 ROOT STATE CMD [ARGS...]" >&2; exit 2; }
X=$(cd "$1" && pwd); S=$2; shift 2
[ -x "$X/usr/sbin/libvirtd" ] || { echo "libvirt11-env: no libvirtd under $X" >&2; exit 2; }
mkdir -p "$S"; S=$(cd "$S" && pwd)
for d in etc run lib cache log; do mkdir -p "$S/$d"; done
[ -e "$S/etc/libvirtd.conf" ] || cp -a "$X/etc/libvirt/." "$S/etc/"
export X S
exec unshare --mount --pid --fork --mount-proc sh -c '
set -e
for d in usr/lib/x86_64-linux-gnu/libvirt usr/lib/libvirt usr/share/libvirt; do
    mount --bind "$X/$d" "/$d"
done
mount -t tmpfs -o mode=755 libvirt11-run /run
mkdir -p /run/libvirt /run/lock
mount --bind "$S/run" /run/libvirt
mount --bind "$S/etc" /etc/libvirt
mount --bind "$S/lib" /var/lib/libvirt
mount --bind "$S/cache" /var/cache/libvirt
mount --bind "$S/log" /var/log/libvirt
export LD_LIBRARY_PATH="$X/usr/lib/x86_64-linux-gnu" PATH="$X/usr/sbin:$X/usr/bin:$PATH"
exec "$@"' libvirt11-env "$@"
