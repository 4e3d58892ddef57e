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
            extra_compile_args=["-O2", "-std=gnu11", "-fno-strict-aliasing", "-Wall"],
            optional=True,
        ),
        Extension(
            "daemon.fuse._fastops",
            sources=["daemon/fuse/_fastops.c"],
            extra_compile_args=["-O2", "-std=gnu11", "-fno-strict-aliasing", "-Wall"],
            optional=True,
        ),
    ],
)
