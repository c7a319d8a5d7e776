"""Compression of trained runs: magnitude pruning (masks) and structured pruning."""
