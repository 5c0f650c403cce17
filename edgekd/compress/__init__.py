"""Compression of the distilled student: structured pruning and quantization-aware training."""
