"""Experiments: each file's get_config() is a complete run."""
