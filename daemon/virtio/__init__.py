"""virtio package."""
