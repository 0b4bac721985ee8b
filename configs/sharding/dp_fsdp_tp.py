"""Data parallel replicas of an FSDP x tensor-parallel group: batch over data and fsdp."""

from configs.sharding import tp

MESH = {"data": -1, "fsdp": 2, "tensor": 2}
RULES = (
  ("activation_batch", ("data", "fsdp")),
  ("embed", "fsdp"),
) + tp.RULES
