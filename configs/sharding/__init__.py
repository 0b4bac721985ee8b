"""Sharding layouts: each module defines MESH (axis sizes, -1 fills) and RULES (logical -> mesh).

Choose one with `--config.mesh.layout=fsdp` and resize its axes with `--config.mesh.fsdp=4`
(0 keeps the file's size). The batch splits by the `activation_batch` rule. Compare their
per-device memory with `python -m train.plan --preset=llama_1b --devices=64`.
"""
