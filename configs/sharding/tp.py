"""Tensor parallel (Megatron style): heads, MLP width and vocab split over `tensor`; every
device sees the whole batch (no activation_batch rule)."""

MESH = {"data": 1, "fsdp": 1, "tensor": -1}
RULES = (
  ("heads", "tensor"),
  ("kv_heads", "tensor"),
  ("mlp", "tensor"),
  ("vocab", "tensor"),
  ("activation_heads", "tensor"),
  ("activation_kv_heads", "tensor"),
  ("activation_mlp", "tensor"),
  ("activation_vocab", "tensor"),
)
