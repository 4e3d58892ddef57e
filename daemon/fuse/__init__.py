"""fuse package."""
