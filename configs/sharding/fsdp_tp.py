"""FSDP over `fsdp` (embed dim, batch) combined with tensor parallelism over `tensor`."""
MESH = {"data": 1, "fsdp": -1, "tensor": 2}
RULES = (
    ("activation_batch", "fsdp"),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("vocab", "tensor"),
    ("activation_heads", "tensor"),
    ("activation_kv_heads", "tensor"),
    ("activation_mlp", "tensor"),
    ("activation_vocab", "tensor"),
)
