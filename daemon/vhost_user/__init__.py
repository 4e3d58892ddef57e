"""vhost_user package."""
