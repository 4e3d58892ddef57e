#!/bin/sh
# Boot a real libvirt domain whose virtio-fs share is served by pyvirtiofsd,
# the way a user following the README would, and show that the guest mounts,
# writes and reads the share. Needs root, Debian 12's libvirt 9.0
# (apt-get install libvirt-daemon-system) and the guest kernel cache
# (scripts/setup.sh). Run from the repository: scripts/libvirt-check.sh
#
# For each variant (plain; xattr + cache none + posix/flock locks + sandbox
# chroot; queue 1024 and xattr/locks off + cache always + sandbox namespace,
# both through a wrapper that records what libvirt runs; LIBVIRT_CHECK_VARIANTS
# ="plain off" picks some; "openfiles" (<openfiles max='4096'/>) and "nolock"
# (options without <lock>), "idmap" (a system domain's <idmap>) and "session"
# (LIBVIRT_CHECK_SESSION_USER's qemu:///session with <idmap>), for libvirt
# >= 10, run only when named) it
# defines a transient TCG domain with memfd shared memory, direct kernel boot
# of the cached 6.1 kernel and the tests' busybox initrd (tests/guest/initrd.py:
# the host root over 9p, then the command given on the kernel command line),
# and a <filesystem> with <driver type='virtiofs'/> and
# <binary path='.venv/bin/pyvirtiofsd'/>. It prints what libvirt ran (argv,
# supplementary groups), the guest's output, and PASS or FAIL per variant.
# virtlogd and libvirtd are started if they do not run (no systemd here) and
# stopped again at the end. Exit status: 0 if every variant passed.
set -u

REPO=$(cd "$(dirname "$0")/.." && pwd)
# LIBVIRT_CHECK_DAEMON: the program libvirt runs (default: the venv's; CI: the
# Debian package's /usr/bin/pyvirtiofsd)
DAEMON=${LIBVIRT_CHECK_DAEMON:-$REPO/.venv/bin/pyvirtiofsd}
WORK=${LIBVIRT_CHECK_DIR:-/var/lib/libvirt/images/pyvirtiofsd-check}
SHARE_BASE=${LIBVIRT_CHECK_SHARE:-/srv/share}
TIMEOUT=${LIBVIRT_CHECK_TIMEOUT:-300}
VIRSH="virsh -q -c qemu:///system"
# LIBVIRT_CHECK_SESSION_USER: drive that ordinary user's qemu:///session
# instead (its own libvirtd, state under LIBVIRT_CHECK_SESSION_DIR, default
# /run/pvs: libvirt11-env.sh's private /run; libvirt >= 10 only)
SESSION_USER=${LIBVIRT_CHECK_SESSION_USER:-}
AS_USER=""
LOGS=/var/log/libvirt/qemu
started=""
status=0

die() { echo "libvirt-check: $*" >&2; exit 2; }

[ "$(id -u)" = 0 ] || die "needs root"
command -v libvirtd >/dev/null || die "libvirtd missing: apt-get install libvirt-daemon-system"
[ -x "$DAEMON" ] || die "$DAEMON missing: run scripts/setup.sh"

cleanup() {
    for dom in $($VIRSH list --name 2>/dev/null | grep '^pyvirtiofsd-check-'); do
        $VIRSH destroy "$dom" >/dev/null 2>&1
    done
    for name in $started; do
        pid=$(cat "$name.pid" 2>/dev/null) && kill "$pid" 2>/dev/null
    done
}
trap cleanup EXIT INT TERM

if [ -n "$SESSION_USER" ]; then
    # short: libvirt's UNIX socket paths under it must fit in 108 bytes
    S=${LIBVIRT_CHECK_SESSION_DIR:-/run/pvs}
    rm -rf "$S"
    mkdir -p "$S/run" "$S/home/.config/libvirt" || die "cannot create $S"
    # no virtlogd: libvirtd would spawn the system's (9.0) one for the session
    echo 'stdio_handler = "file"' > "$S/home/.config/libvirt/qemu.conf"
    chmod 700 "$S/run"; chown -R "$SESSION_USER:" "$S" || die "no user $SESSION_USER"
    AS_USER="setpriv --reuid=$(id -u "$SESSION_USER") --regid=$(id -g "$SESSION_USER") --clear-groups \
env HOME=$S/home XDG_RUNTIME_DIR=$S/run XDG_CONFIG_HOME=$S/home/.config XDG_CACHE_HOME=$S/home/.cache"
    VIRSH="$AS_USER virsh -q -c qemu:///session"
    LOGS="$S/home/.cache/libvirt/qemu/log"
    $AS_USER libvirtd -d || die "cannot start $SESSION_USER's libvirtd"
    started="$S/run/libvirt/libvirtd"
else
    for name in virtlogd libvirtd; do
        if ! pgrep -x "$name" >/dev/null; then
            "$name" -d || die "cannot start $name"
            started="$started /run/$name"
        fi
    done
fi
i=0
until $VIRSH version >/dev/null 2>&1; do
    i=$((i + 1)); [ $i -lt 50 ] || die "libvirtd does not answer"; sleep 0.2
done
echo "== $($VIRSH version | tr '\n' ' ')"

mkdir -p "$WORK/harness" || die "cannot create $WORK"
paths=$(cd "$REPO" && .venv/bin/python -c '
from tests.guest.initrd import ensure_initrd
from tests.guest.kernel import ensure_kernel
print(ensure_kernel()[0]); print(ensure_initrd())') || die "no guest kernel/initrd (scripts/setup.sh)"
# copies: libvirt relabels (chowns) the kernel and initrd it boots
cp "$(echo "$paths" | sed -n 1p)" "$WORK/vmlinuz"
cp "$(echo "$paths" | sed -n 2p)" "$WORK/initrd.gz"

# A wrapper in <binary path>: records every way libvirt runs the daemon
# (arguments, groups, environment), then runs it.
cat > "$WORK/trace-pyvirtiofsd" <<EOF
#!/bin/sh
{ echo "argv: \$0 \$*"; grep -E '^(Uid|Gid|Groups|CapAmb):' /proc/self/status | tr '\t' ' ';
  echo "umask: \$(umask)"; echo "fds: \$(ls /proc/self/fd | tr '\n' ' ')";
  echo "env: \$(env | sort | tr '\n' ' ')"; echo; } >> "$WORK/trace.log"
exec "$DAEMON" "\$@"
EOF
chmod 755 "$WORK/trace-pyvirtiofsd"
: > "$WORK/trace.log"

# The guest: write, read back, list, and an xattr where the variant has them.
GUEST_CMD='echo guest-wrote > /mnt/from-guest && echo "read-back: $(cat /mnt/from-guest)" &&
echo "host-file: $(cat /mnt/from-host)" && ls -ln /mnt &&
{ python3 -c "import os; os.setxattr(\"/mnt/from-guest\", \"user.k\", b\"v\"); print(\"xattr:\", os.getxattr(\"/mnt/from-guest\", \"user.k\"))" || true; }'
CMD_B64=$(printf '%s' "$GUEST_CMD" | base64 -w0)

run_variant() {  # name binary_path binary_inner_xml driver_attrs expect_xattr(yes|no|any) [fs_xml owner host_owner]
    name=$1 binary=$2 inner=$3 driver=$4 expect_xattr=$5 fs_xml=${6:-} owner=${7:-} host_owner=${8:-}
    case " ${LIBVIRT_CHECK_VARIANTS:-$name} " in *" $name "*) ;; *) return ;; esac
    dom="pyvirtiofsd-check-$name"
    share="$SHARE_BASE-$name"
    console="$WORK/$name.console"
    rm -rf "$share"; mkdir -p "$share"; chmod 755 "$share"
    echo host-wrote > "$share/from-host"
    # for <idmap>: the share's and from-host's host owners
    [ -z "$owner" ] || chown "$owner:$owner" "$share" || die "cannot chown $share"
    [ -z "$host_owner" ] || chown "$host_owner:$host_owner" "$share/from-host"
    : > "$console"; chmod 666 "$console"
    cat > "$WORK/$name.xml" <<EOF
<domain type='qemu'>
  <name>$dom</name>
  <memory unit='MiB'>512</memory>
  <vcpu>1</vcpu>
  <memoryBacking><source type='memfd'/><access mode='shared'/></memoryBacking>
  <os>
    <type arch='x86_64' machine='pc'>hvm</type>
    <kernel>$WORK/vmlinuz</kernel>
    <initrd>$WORK/initrd.gz</initrd>
    <cmdline>console=ttyS0 panic=-1 quiet vfs_tag=myfs vfs_mnt=/mnt vfs_cmd=$CMD_B64</cmdline>
  </os>
  <cpu mode='custom'><model>qemu64</model></cpu>
  <on_poweroff>destroy</on_poweroff><on_reboot>destroy</on_reboot><on_crash>destroy</on_crash>
  <devices>
    <filesystem type='mount' accessmode='passthrough'>
      <driver type='virtiofs'$driver/>
      <binary path='$binary'$inner
      <source dir='$share'/>
      <target dir='myfs'/>$fs_xml
    </filesystem>
    <filesystem type='mount' accessmode='passthrough'>
      <source dir='/'/><target dir='hostroot'/><readonly/>
    </filesystem>
    <filesystem type='mount' accessmode='passthrough'>
      <source dir='$WORK/harness'/><target dir='harness'/><readonly/>
    </filesystem>
    <serial type='file'><source path='$console'/><target port='0'/></serial>
    <memballoon model='none'/>
  </devices>
</domain>
EOF
    echo "== variant $name: <binary path='$binary'$inner> <driver type='virtiofs'$driver/>"
    if ! $VIRSH create "$WORK/$name.xml" >/dev/null; then
        echo "FAIL $name: virsh create"; tail -n 20 "$LOGS/$dom.log" 2>/dev/null
        tail -n 20 "$LOGS/$dom-fs0-virtiofsd.log" 2>/dev/null
        status=1; return
    fi
    # what libvirt runs, while it runs
    pid=$(pgrep -f -n "pyvirtiofsd.*$share" || pgrep -f -n "pyvirtiofsd.*--fd")
    if [ -n "$pid" ]; then
        echo "   libvirt ran: $(tr '\0' ' ' < "/proc/$pid/cmdline")"
        echo "   its (after start-up) $(grep -E '^Groups:' "/proc/$pid/status" | tr '\t' ' ')"
    fi
    qpid=$(pgrep -f -n "guest=$dom")
    if [ -n "$qpid" ]; then
        echo "   QEMU runs as $(ps -o user= -p "$qpid") with" \
            "$(tr '\0' '\n' < "/proc/$qpid/cmdline" | grep -E 'vhost-user-fs-pci|chr-vu' | tr '\n' ' ')"
    fi
    i=0
    while ! grep -q '@@GUEST-EXIT' "$console" && [ $i -lt "$TIMEOUT" ]; do
        sleep 1; i=$((i + 1))
    done
    echo "   before destroy: daemons=$(pgrep -f -c "pyvirtiofsd.*$share")" \
        "bound-sockets=$(grep -c -- '-fs\.sock' /proc/net/unix)"
    $VIRSH destroy "$dom" >/dev/null 2>&1
    # what is left of the daemon: processes, its socket file, bound sockets
    i=0
    while pgrep -f "pyvirtiofsd.*$share" >/dev/null && [ $i -lt 50 ]; do sleep 0.2; i=$((i + 1)); done
    echo "   after destroy: daemons=$(pgrep -f -c "pyvirtiofsd.*$share")" \
        "socket-files=$(find "${S:-$WORK}" /var/lib/libvirt/qemu /run/libvirt/qemu -name '*-fs.sock' 2>/dev/null | wc -l)" \
        "bound-sockets=$(grep -c -- '-fs\.sock' /proc/net/unix)"
    echo "   host sees from-guest as $(stat -c %u:%g "$share/from-guest" 2>/dev/null)"
    echo "   guest printed:"
    sed -n '/@@GUEST-CMD-BEGIN@@/,/@@GUEST-EXIT/p' "$console" | sed 's/^/     | /'
    ok=1
    grep -q 'read-back: guest-wrote' "$console" || ok=0
    grep -q 'host-file: host-wrote' "$console" || ok=0
    grep -q '@@GUEST-EXIT status=0 ' "$console" || ok=0
    [ "$(cat "$share/from-guest" 2>/dev/null)" = guest-wrote ] || ok=0
    case $expect_xattr in   # yes: xattrs work; no: the guest gets EOPNOTSUPP
        yes) grep -q "xattr: b'v'" "$console" || ok=0 ;;
        no) grep -q "Errno 95" "$console" || ok=0 ;;
    esac
    if [ $ok = 1 ]; then
        echo "PASS $name"
    else
        echo "FAIL $name"; status=1
        tail -n 30 "$console"
        tail -n 20 "$LOGS/$dom-fs0-virtiofsd.log" 2>/dev/null
    fi
}

run_variant plain "$DAEMON" "/>" "" yes
run_variant options "$DAEMON" " xattr='on'><cache mode='none'/><lock posix='on' flock='on'/><sandbox mode='chroot'/></binary>" "" yes
run_variant traced "$WORK/trace-pyvirtiofsd" "/>" " queue='1024'" any
run_variant off "$WORK/trace-pyvirtiofsd" " xattr='off'><cache mode='always'/><lock posix='off' flock='off'/><sandbox mode='namespace'/></binary>" "" no
# For libvirt >= 10 (tests/guest/test_guest_libvirt11.py), only when named:
# <openfiles> (--rlimit-nofile), which 9.0 does not know, and the options
# variant without <lock>, which libvirt refuses for a daemon that asks for
# our long options ("locking options are not supported by this virtiofsd")
case " ${LIBVIRT_CHECK_VARIANTS:-} " in
    *" openfiles "*) run_variant openfiles "$WORK/trace-pyvirtiofsd" "><openfiles max='4096'/></binary>" "" yes ;;
esac
case " ${LIBVIRT_CHECK_VARIANTS:-} " in
    *" nolock "*) run_variant nolock "$DAEMON" " xattr='on'><cache mode='none'/><sandbox mode='chroot'/></binary>" "" yes ;;
esac
# <idmap> (libvirt >= 10: --uid-map/--gid-map), only when named: guest ids
# 0.. are host ids IDMAP_BASE.. (the share and from-host, guest 1234's, are
# owned by mapped ids); the daemon, started as root, confines itself to the maps
IDMAP_BASE=${LIBVIRT_CHECK_IDMAP_BASE:-400000}
case " ${LIBVIRT_CHECK_VARIANTS:-} " in
    *" idmap "*) run_variant idmap "$WORK/trace-pyvirtiofsd" "/>" "" yes "
      <idmap><uid start='0' target='$IDMAP_BASE' count='65536'/><gid start='0' target='$IDMAP_BASE' count='65536'/></idmap>" \
        "$IDMAP_BASE" "$((IDMAP_BASE + 1234))" ;;
esac
# the session user's <idmap>, as libvirt itself would make it: guest 0 is
# the user, guest 1.. its first /etc/subuid (subgid) range
case " ${LIBVIRT_CHECK_VARIANTS:-} " in
    *" session "*)
        [ -n "$SESSION_USER" ] || die "variant session needs LIBVIRT_CHECK_SESSION_USER"
        su=$(id -u "$SESSION_USER") sg=$(id -g "$SESSION_USER")
        subu=$(awk -F: -v u="$SESSION_USER" '$1 == u { print $2; exit }' /etc/subuid)
        subg=$(awk -F: -v u="$SESSION_USER" '$1 == u { print $2; exit }' /etc/subgid)
        [ -n "$subu" ] && [ -n "$subg" ] || die "$SESSION_USER has no /etc/subuid or /etc/subgid range"
        run_variant session "$DAEMON" "/>" "" any "
      <idmap><uid start='0' target='$su' count='1'/><uid start='1' target='$subu' count='65536'/>
        <gid start='0' target='$sg' count='1'/><gid start='1' target='$subg' count='65536'/></idmap>" \
        "$su" "$((subu + 1233))" ;;
esac

echo "== every run of <binary path> (trace wrapper):"
sed 's/^/   /' "$WORK/trace.log"
[ $status = 0 ] && echo "libvirt-check: all variants passed" || echo "libvirt-check: FAILED"
exit $status
