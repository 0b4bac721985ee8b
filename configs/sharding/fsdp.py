"""Fully sharded data parallel: batch and every parameter's embed dim split over `fsdp`."""

MESH = {"data": 1, "fsdp": -1, "tensor": 1}
RULES = (
  ("activation_batch", "fsdp"),
  ("embed", "fsdp"),
)
