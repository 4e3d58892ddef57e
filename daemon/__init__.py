"""pyvirtiofsd: a privilege-separated virtio-fs host daemon."""

__version__ = "0.1.0"
