"""The compiled request path (docs/compiled.md): two optional C extensions.

Everything else is in pyproject.toml. ``optional=True``: without a C
compiler or the Python headers the build of the extension fails quietly and
the pure-Python path (daemon/virtio/virtqueue.py) runs instead.
"""

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
            # _fastops.c includes LOOKUP's, CREATE's, FORGET's and the metadata ops' code
            depends=["daemon/virtio/_vqcore_api.h", "daemon/fuse/_lookup.h", "daemon/fuse/_create.h",
                     "daemon/fuse/_meta.h", "daemon/fuse/_forget.h"],
            include_dirs=["daemon/virtio"],
            extra_compile_args=["-O2", "-std=gnu11", "-fno-strict-aliasing", "-Wall"],
            optional=True,
        ),
    ],
)
