"""The softdimo HTTP service."""
