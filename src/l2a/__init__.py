"""l2a: conditional long-range attention (L2A / AHA) for pretrained LLMs.

Importing registers the L2A model (`model_type="l2a"`) with transformers' Auto classes.
"""

from l2a.models import L2AConfig, L2AForCausalLM, L2AModel, convert_model

__version__ = "0.1.0"

__all__ = ["L2AConfig", "L2AForCausalLM", "L2AModel", "__version__", "convert_model"]
