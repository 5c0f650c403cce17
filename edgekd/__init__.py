"""edgekd: distil a PyTorch teacher into a small, quantized, gated on-device student."""

__version__ = "0.1.0"
