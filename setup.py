"""The compiled request path (docs/compiled.md): two optional C extensions.

Everything else is in pyproject.toml. ``optional=True``: without a C
compiler or the Python headers the build of the extension fails quietly and
the pure-Python path (daemon/virtio/virtqueue.py) runs instead.
"""

from glob import glob

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "daemon.virtio._vqcore",
            sources=["daemon/virtio/_vqcore.c"],
            depends=["daemon/virtio/_vqcore_api.h"],
            extra_compile_args=["-O2", "-std=gnu11", "-fno-strict-aliasing", "-Wall"],
            optional=True,
        ),
        Extension(
            "daemon.fuse._fastops",
            sources=["daemon/fuse/_fastops.c"],
            # the batch loop (stage 3) calls _vqcore through its capsule;
            # _fastops.c includes the ops' code, one header each (_lookup.h,
            # _create.h, ...): a change to any of them rebuilds it
            depends=["daemon/virtio/_vqcore_api.h", *sorted(glob("daemon/fuse/_*.h"))],
            include_dirs=["daemon/virtio"],
            extra_compile_args=["-O2", "-std=gnu11", "-fno-strict-aliasing", "-Wall"],
            optional=True,
        ),
    ],
)
