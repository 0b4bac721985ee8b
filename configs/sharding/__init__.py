"""Sharding layouts: each module defines MESH (axis sizes, -1 fills) and RULES (logical -> mesh)."""
