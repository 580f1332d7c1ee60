"""l2a: conditional long-range attention (L2A / AHA) for pretrained LLMs."""

__version__ = "0.1.0"
