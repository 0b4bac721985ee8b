"""Data parallel: the batch splits over every device; parameters are replicated."""

MESH = {"data": -1, "fsdp": 1, "tensor": 1}
RULES = (("activation_batch", "data"),)
