"""Decoder-only transformer (Flax NNX) with logical axes and a KV-cache sampler."""
