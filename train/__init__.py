"""Training: mesh and shardings, optimizer, losses, the one train step, checkpoints, the loop."""
