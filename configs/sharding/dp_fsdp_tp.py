"""Data parallel replicas of an FSDP x tensor-parallel group: batch over data and fsdp."""
MESH = {"data": -1, "fsdp": 2, "tensor": 2}
RULES = (
    ("activation_batch", ("data", "fsdp")),
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
