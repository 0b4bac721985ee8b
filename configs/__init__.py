"""Experiment configs (ml_collections) and sharding layouts."""
