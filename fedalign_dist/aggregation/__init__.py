"""Aggregation mathematics: pure functions on tensors, no torch.distributed."""
