"""FSDP over `fsdp` (embed dim, batch) combined with tensor parallelism over `tensor`."""

from configs.sharding import fsdp, tp

MESH = {"data": 1, "fsdp": -1, "tensor": 2}
RULES = fsdp.RULES + tp.RULES
