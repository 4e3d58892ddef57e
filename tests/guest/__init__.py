"""Real-guest tests: QEMU 7.2 (TCG) + Debian's 6.1 kernel + a busybox initrd.

The guest gets the host's root file system read-only over 9p and chroots
into it, so it can run the host's python3, fio and coreutils against the
virtiofs mount. See kernel.py (guest kernel cache), initrd.py (the /init),
vm.py (the QEMU command line), guest_ops.py (the in-guest differential
suite), tools.sh (ordinary tools on the mount) and demo.py.
"""
