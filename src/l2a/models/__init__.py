"""HF model of L2A: config, model, cache, conversion and pruning. Importing registers `model_type="l2a"`
with transformers' AutoConfig, AutoModel and AutoModelForCausalLM."""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from l2a.models.aha_cache import AHACache, AHALayerCache
from l2a.models.cache import L2ACache, L2ALayerCache
from l2a.models.configuration import L2AConfig
from l2a.models.conversion import convert_checkpoint, convert_model, convert_state_dict, l2a_config_from_base
from l2a.models.modeling import L2AForCausalLM, L2AModel, L2APreTrainedModel
from l2a.models.outputs import L2ACausalLMOutputWithPast, L2AModelOutputWithPast
from l2a.models.pruning import prune_global_layers, prune_routed_heads

AutoConfig.register(L2AConfig.model_type, L2AConfig, exist_ok=True)
AutoModel.register(L2AConfig, L2AModel, exist_ok=True)
AutoModelForCausalLM.register(L2AConfig, L2AForCausalLM, exist_ok=True)

__all__ = [
    "AHACache",
    "AHALayerCache",
    "L2ACache",
    "L2ACausalLMOutputWithPast",
    "L2AConfig",
    "L2AForCausalLM",
    "L2ALayerCache",
    "L2AModel",
    "L2AModelOutputWithPast",
    "L2APreTrainedModel",
    "convert_checkpoint",
    "convert_model",
    "convert_state_dict",
    "l2a_config_from_base",
    "prune_global_layers",
    "prune_routed_heads",
]
