"""Data: tokenizers, sources, token shards and grain batch pipelines."""
