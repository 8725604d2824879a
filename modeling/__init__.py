"""The MoD model family: configuration, model and ragged KV cache (the files copied into every checkpoint)."""

from .configuration_mod import MoDConfig, RoutingPlan
from .modeling_mod import (
    THRESHOLD_LOGIT_LIMIT,
    MoDCache,
    MoDForCausalLM,
    MoDModel,
    MoDPreTrainedModel,
    MoDRouter,
    logit_to_threshold,
    threshold_to_logit,
)

__all__ = ["THRESHOLD_LOGIT_LIMIT", "MoDCache", "MoDConfig", "MoDForCausalLM", "MoDModel", "MoDPreTrainedModel",
           "MoDRouter", "RoutingPlan", "logit_to_threshold", "threshold_to_logit"]
