"""The MoD model family: configuration, model and ragged KV cache (the files copied into every checkpoint)."""

from .configuration_mod import MoDConfig
from .modeling_mod import MoDCache, MoDForCausalLM, MoDModel, MoDPreTrainedModel


__all__ = ["MoDCache", "MoDConfig", "MoDForCausalLM", "MoDModel", "MoDPreTrainedModel"]
