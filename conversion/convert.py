"""Base model -> MoD checkpoint: copy every weight exactly, add routers, write config, code and tokenizer."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from huggingface_hub import snapshot_download
from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig, PreTrainedConfig

from modification.modeling import MoDConfig, MoDForCausalLM
from modification.modeling.configuration_mod import ROUTING_FIELDS, SUPPORTED_BASE_MODEL_TYPES

from .atomic import atomic_output_dir
from .bases import base_hub_id, base_path
from .checkpoint import LICENSE_FILES, TOKENIZER_FILES, card_license, save_checkpoint
from .settings import ConvertSettings

logger = logging.getLogger(__name__)

_COMMON_FIELDS = (
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "head_dim", "hidden_act", "max_position_embeddings", "initializer_range", "rms_norm_eps",
    "tie_word_embeddings", "bos_token_id", "eos_token_id", "pad_token_id", "attention_dropout",
)


class UnsupportedArchitectureError(ValueError):
    """The base model is not a Llama-family architecture this package converts."""


def _check_supported(model_type: str | None, where: str) -> None:
    if model_type not in SUPPORTED_BASE_MODEL_TYPES:
        raise UnsupportedArchitectureError(
            f"{where} is a {model_type!r} model; MoD conversion supports {', '.join(SUPPORTED_BASE_MODEL_TYPES)}"
        )


def mod_config_from_base(base_config: PreTrainedConfig, **routing: Any) -> MoDConfig:
    """A `MoDConfig` with the base's architecture and the given routing fields (see `MoDConfig` for their names)."""
    unknown = sorted(set(routing) - set(ROUTING_FIELDS))
    if unknown:
        raise TypeError(f"unknown routing field(s) {', '.join(unknown)}; the routing fields are "
                        f"{', '.join(ROUTING_FIELDS)}")
    model_type = base_config.model_type
    _check_supported(model_type, "the base config")
    fields = {name: getattr(base_config, name, None) for name in _COMMON_FIELDS}
    fields["head_dim"] = fields["head_dim"] or base_config.hidden_size // base_config.num_attention_heads
    fields["rope_parameters"] = dict(base_config.rope_parameters)
    if model_type == "llama":
        fields.update(attention_bias=base_config.attention_bias, mlp_bias=base_config.mlp_bias)
    elif model_type == "qwen2":
        fields.update(attention_bias=True, attention_out_bias=False)  # Qwen2: biases on q/k/v, none on o
    elif model_type == "qwen3":
        fields.update(attention_bias=base_config.attention_bias, qk_norm=True)
    window = getattr(base_config, "sliding_window", None)
    layer_types = getattr(base_config, "layer_types", None) or []
    if window is not None and (model_type == "mistral" or "sliding_attention" in layer_types):
        logger.warning(
            "the base model uses sliding-window attention (window %s); MoD layers attend to every earlier routed "
            "token, which matches the base exactly only for sequences up to the window", window,
        )
    fields = {k: v for k, v in fields.items() if v is not None}
    return MoDConfig(**fields, base_model_type=model_type, **routing)


@torch.no_grad()
def convert_model(base_model: torch.nn.Module, **routing: Any) -> MoDForCausalLM:
    """Build a MoD model from a loaded Llama/Mistral/Qwen2/Qwen3 causal LM, copying every weight bit for bit."""
    config = mod_config_from_base(base_model.config, **routing)
    dtype = next(base_model.parameters()).dtype
    model = MoDForCausalLM(config).to(dtype)
    base_state = base_model.state_dict()
    result = model.load_state_dict(base_state, strict=False)
    not_router = [k for k in result.missing_keys if ".router." not in k]
    if result.unexpected_keys or not_router:
        raise UnsupportedArchitectureError(
            f"weights do not map onto MoD: unexpected {result.unexpected_keys[:5]}, missing {not_router[:5]}"
        )
    own = model.state_dict()
    for name, tensor in base_state.items():
        if not torch.equal(own[name], tensor):
            raise RuntimeError(f"weight {name} was not copied exactly")
    model.generation_config = GenerationConfig.from_model_config(model.config)
    if getattr(base_model, "generation_config", None) is not None:
        model.generation_config = base_model.generation_config
    return model.eval()


def convert_checkpoint(settings: ConvertSettings) -> Path:
    """Convert the base checkpoint `settings.base` (folder or Hub id) into a MoD checkpoint folder `settings.out`.

    The architecture is checked from the config before any weight is read; the output is written to a temporary
    folder and renamed into place, so a failure never leaves a half-written `out`. `base` may also name a base
    fetched with `modification fetch-base` (`smollm2-135m-instruct`); the checkpoint then records its Hub id.

    The recorded base (`base_model_name_or_path`) is a public name, never a path of this machine (`local_paths`): a
    Hub id stays as it is and a Hub cache snapshot becomes its Hub id, but a local folder is named by its path
    relative to the working directory (`./llama`), or by its folder name when it lies elsewhere. `eval` and `bench`
    without `--base` find such a base only from the same working directory; give them `--base` otherwise. The
    licence of a local base (its README.md metadata) is read here, while the folder is at hand, and kept in the
    config as `base_model_license` for the model card.
    """
    name, revision, routing, overwrite = settings.base, settings.revision, settings.routing, settings.overwrite
    base = base_path(name)  # a fetched known base -> its cached folder; folders and Hub ids unchanged
    base_config = AutoConfig.from_pretrained(base, revision=revision, trust_remote_code=settings.trust_remote_code)
    _check_supported(getattr(base_config, "model_type", None), base)
    mod_config_from_base(base_config, **routing)  # validate routing arguments before loading weights
    out = Path(settings.out)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} already exists; pass --overwrite to replace it")
    dtype = settings.dtype if settings.dtype == "auto" else getattr(torch, settings.dtype)
    base_model = AutoModelForCausalLM.from_pretrained(
        base, revision=revision, dtype=dtype, trust_remote_code=settings.trust_remote_code
    )
    model = convert_model(base_model, **routing)
    model.config.base_model_name_or_path = base_hub_id(base) or name  # the Hub id, not a local cache path
    if (Path(base) / "README.md").is_file():
        model.config.base_model_license = card_license(Path(base) / "README.md")
    source = Path(base)
    if not source.is_dir():  # the base's tokenizer and licence files, from the Hub (cache)
        source = Path(snapshot_download(base, revision=revision, allow_patterns=list(TOKENIZER_FILES + LICENSE_FILES)))
    with atomic_output_dir(out, overwrite=overwrite) as tmp:
        copied = save_checkpoint(model, tmp, companions_from=source)
        if not set(copied) & set(TOKENIZER_FILES):
            logger.warning("%s has no tokenizer files; the MoD checkpoint has none either", base)
    return out
