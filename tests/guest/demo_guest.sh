#!/bin/sh
# Runs inside the demo guest (chrooted into the host's root, read-only; the
# shared directory is mounted at $1, default /mnt). Shows what the guest
# sees, then writes a few things for the host to find.
M=${1:-/mnt}
set -e
echo "== guest: kernel $(uname -r), $(nproc) vCPUs"
echo "== guest: mounts"
grep -E " $M " /proc/mounts
echo "== guest: ls -la $M"
ls -la "$M"
echo "== guest: find $M"
(cd "$M" && find . | sort)
echo "== guest: cat $M/hello.txt"
cat "$M/hello.txt"
echo "== guest: sha256sum $M/data.bin"
sha256sum "$M/data.bin"
echo "== guest: readlink $M/latest"
readlink "$M/latest"

echo "== guest: writing"
mkdir -p "$M/from-guest"
{
    echo "Hello from the guest!"
    echo "kernel: $(uname -r)"
    echo "seen: $(ls "$M" | tr '\n' ' ')"
} > "$M/from-guest/greeting.txt"
echo "- [x] the guest was here" >> "$M/notes/todo.md"
mv "$M/notes/old-name.txt" "$M/notes/renamed-by-guest.txt"
dd if=/dev/zero bs=1M count=8 2>/dev/null | tr '\0' 'g' > "$M/from-guest/eight-mib.txt"
python3 -c "import os, sys; print('python in the guest sees', len(os.listdir(sys.argv[1])), 'entries')" "$M"
sync
echo "== guest: ls -la $M/from-guest"
ls -la "$M/from-guest"
echo "== guest: done"
