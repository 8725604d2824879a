"""`modification eval`: quality of a MoD checkpoint next to its base, and what it saved.

- Perplexity of MoD and base on the same tokens, at one or more context lengths (up to the model's
  `max_position_embeddings`). A text longer than the context is scored with a sliding window (stride default half the
  context): every token is scored at most once. With `full_context` (the default) every scored token has at least
  `context - stride` tokens of context, the first window included (it scores only its last `stride` tokens, and the
  text's first `context - stride` tokens are read, never scored): perplexity at 8192 is then that of tokens that read
  4096 or more tokens before them, not a mix dominated by short contexts. Off, the first window scores all its tokens.
- The look-up check (`conversion/lookup.py`): a random passage repeated after filler text from the first data source,
  top-1 accuracy and loss of MoD and base on the second copy, per distance. Perplexity on natural text hides a model
  that can no longer look anything up in its context; this fails it. And, when `passkey_lengths` are given, passkey
  retrieval at those prompt lengths (needs no data).
- What the MoD model saved on the perplexity windows, counted from its own router decisions and cache through the
  project's `evaluate` modules (`evaluation/metrics/`): the share of tokens that ran each layer (its attention), the
  KV fraction (bytes its cache holds over a dense cache's) and the FLOP fraction of a prefill at each evaluated context
  length and at 4096 (`RoutingPlan.flop_fraction` with the measured share of each routed layer).
- Downstream tasks through lm-evaluation-harness (`evaluation/tasks.py`) when tasks are given; task YAML files and
  their data can be local, so this runs offline.

`evaluate_checkpoint` merges the numbers into the checkpoint's results JSON (`conversion/results.py`), writes a full
record of the run with `evaluate.save` next to it (`eval_records/`), and a bar chart of the per-layer routed fraction
as PNG.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from modification.conversion.budget import measured_plan
from modification.conversion.data import load_texts, tokenize_stream
from modification.conversion.lookup import lookup_rows, passkey_rows
from modification.conversion.results import RESULTS_FILENAME, update_results

from .loading import default_output_dir, load_models, load_tokenizer, pick_device, pick_dtype
from .settings import EvalSettings

logger = logging.getLogger(__name__)

METRICS_DIR = Path(__file__).resolve().parent / "metrics"
RECORDS_DIRNAME = "eval_records"
ROUTED_FRACTION_PLOT = "routed_fraction.png"
# The context length every FLOP fraction is also given at, whatever the evaluated ones: the common yardstick.
FLOP_REFERENCE_CONTEXT = 4096


def load_metric(name: str):
    """One of the project's `evaluate` modules (`routed_fraction`, `kv_fraction`), loaded from its local folder."""
    import evaluate

    return evaluate.load(str(METRICS_DIR / name), keep_in_memory=True)


# --------------------------------------------------------------------------------------------------------------------
# Evaluation text
# --------------------------------------------------------------------------------------------------------------------


def data_label(data: str, split: str, data_config: str | None) -> str:
    """How a dataset is named in the results: the file name, or `name[/config]:split`."""
    path = Path(data)
    if path.exists():
        return path.name
    return f"{data}{'/' + data_config if data_config else ''}:{split}"


def tokenize_texts(tokenizer, texts: list[str], max_tokens: int | None = None) -> torch.Tensor:
    """One token stream of the documents (see `data.tokenize_stream`); fewer than 2 tokens is an error."""
    ids = tokenize_stream(texts, tokenizer, max_tokens, progress=False)
    if ids.numel() < 2:
        raise ValueError("the evaluation text has fewer than 2 tokens: nothing to score")
    return ids


# --------------------------------------------------------------------------------------------------------------------
# Perplexity, routed fraction, KV and FLOP fractions on sliding windows
# --------------------------------------------------------------------------------------------------------------------


def sliding_windows(num_tokens: int, context_length: int, stride: int,
                    full_context: bool = True) -> list[tuple[int, int, int]]:
    """`(begin, end, scored)` windows over a stream: each window holds at most `context_length` tokens, and its last
    `scored` tokens are the ones scored there. Windows end `stride` tokens apart (the last at the end of the stream),
    and a token is scored in the first window that holds it as one of its last `stride` tokens, so every scored token
    has at least `context_length - stride` tokens of context. The first window scores only its last `stride` tokens
    with `full_context`; without, all of its tokens (the first one, which has nothing to be predicted from, is left
    out by `score_window`), so that every token after the first is scored exactly once."""
    if context_length < 2:
        raise ValueError(f"context length must be at least 2, got {context_length}")
    if not 0 < stride <= context_length:
        raise ValueError(f"stride must lie in [1, context length {context_length}], got {stride}")
    windows = []
    end = min(context_length, num_tokens)
    scored_until = end - stride if full_context else 0
    while True:
        begin = max(0, end - context_length)
        windows.append((begin, end, end - scored_until))
        scored_until = end
        if end >= num_tokens:
            break
        end = min(end + stride, num_tokens)
    return windows


def dense_kv_bytes(config, tokens: int, dtype: torch.dtype) -> int:
    """Bytes a dense cache (keys and values in every layer) of `tokens` tokens takes for this architecture."""
    element = torch.empty((), dtype=dtype).element_size()
    return 2 * config.num_hidden_layers * tokens * config.num_key_value_heads * config.head_dim * element


def flop_fractions(config, per_layer_routed_fraction: list[float], context_lengths) -> dict[str, float]:
    """`{str(T): FLOP fraction of a prefill of T tokens}` for each of `context_lengths` and `FLOP_REFERENCE_CONTEXT`,
    as the measured plan runs (`measured_plan`, `RoutingPlan.flop_fraction`); keys in increasing order."""
    plan = measured_plan(config, per_layer_routed_fraction)
    lengths = sorted({*context_lengths, FLOP_REFERENCE_CONTEXT})
    return {str(t): plan.flop_fraction(config, t) for t in lengths}


@dataclass
class WindowScore:
    nll: float  # summed negative log-likelihood of the scored tokens
    count: int  # number of scored tokens
    routed_tokens: list[int] = field(default_factory=list)  # per layer, tokens of the window that ran it (MoD only)
    kv_bytes: int = 0  # bytes in the MoD cache after the window (MoD only)


@torch.no_grad()
def score_window(model: torch.nn.Module, window: torch.Tensor, scored: int, is_mod: bool) -> WindowScore:
    """Negative log-likelihood of the last `scored` tokens of `window` (1-D ids), through the model's own forward.

    Only the logits that predict scored tokens are computed (`logits_to_keep`), and the loss is taken in float32.
    For a MoD model also return what its routers decided and what its cache holds.
    """
    device = next(model.parameters()).device
    ids = window.to(device).unsqueeze(0)
    length = ids.shape[1]
    first = max(length - scored, 1)  # position 0 predicts nothing
    positions = torch.arange(first - 1, length - 1, device=device)
    kwargs = {"output_router_decisions": True, "use_cache": True} if is_mod else {"use_cache": False}
    out = model(input_ids=ids, logits_to_keep=positions, **kwargs)
    targets = ids[0, first:]
    nll = F.cross_entropy(out.logits[0].float(), targets, reduction="sum").item()
    score = WindowScore(nll=nll, count=targets.numel())
    if is_mod:
        score.routed_tokens = [int(d.sum()) for d in out.router_decisions]
        score.kv_bytes = out.cache.kv_bytes()
    return score


def evaluate_perplexity(
    mod: torch.nn.Module,
    base: torch.nn.Module | None,
    stream: torch.Tensor,
    context_length: int,
    stride: int | None = None,
    dataset: str = "text",
    routing_metrics=None,
    progress: bool = True,
    full_context: bool = True,
) -> dict:
    """One perplexity row (MoD and base on the same windows, see `sliding_windows`) and, through `routing_metrics`
    (an `evaluate` module or combination taking `routed_tokens`, `tokens`, `mod_kv_bytes`, `base_kv_bytes`), the MoD
    model's routing counts.

    The row's `kv_fraction` and `flop_fraction` (at its context length) are those of this text and context alone;
    `min_context` is the fewest tokens of context a scored token had.
    """
    effective = min(context_length, stream.numel())
    if effective < context_length:
        logger.warning("%s has %d tokens, fewer than the context length %d: scoring it as one window",
                       dataset, stream.numel(), context_length)
    stride = stride or max(effective // 2, 1)
    stride = min(stride, effective)
    windows = sliding_windows(stream.numel(), effective, stride, full_context)
    dtype = next(mod.parameters()).dtype
    totals = {"mod": 0.0, "base": 0.0}
    count = 0
    layer_counts = [0] * mod.config.num_hidden_layers
    window_tokens = 0
    kv_bytes = {"mod": 0, "dense": 0}
    for begin, end, scored in tqdm(windows, desc=f"perplexity {dataset} @{effective}", disable=not progress):
        window = stream[begin:end]
        m = score_window(mod, window, scored, is_mod=True)
        totals["mod"] += m.nll
        count += m.count
        layer_counts = [a + b for a, b in zip(layer_counts, m.routed_tokens)]
        window_tokens += window.numel()
        dense = dense_kv_bytes(mod.config, window.numel(), dtype)
        kv_bytes["mod"] += m.kv_bytes
        kv_bytes["dense"] += dense
        if routing_metrics is not None:
            routing_metrics.add_batch(routed_tokens=[m.routed_tokens], tokens=[window.numel()],
                                      mod_kv_bytes=[m.kv_bytes], base_kv_bytes=[dense])
        if base is not None:
            b = score_window(base, window, scored, is_mod=False)
            if b.count != m.count:
                raise RuntimeError("MoD and base scored different numbers of tokens")
            totals["base"] += b.nll
    per_layer = [c / window_tokens for c in layer_counts]
    return {
        "dataset": dataset,
        "context_length": effective,
        "tokens": count,
        "mod": math.exp(totals["mod"] / count),
        "base": math.exp(totals["base"] / count) if base is not None else None,
        "stride": stride,
        "windows": len(windows),
        "min_context": min(max(end - scored, 1) - begin for begin, end, scored in windows),
        "kv_fraction": kv_bytes["mod"] / kv_bytes["dense"],
        "flop_fraction": measured_plan(mod.config, per_layer).flop_fraction(mod.config, effective),
    }


def evaluate_passkey(models: dict[str, torch.nn.Module | None], tokenizer, lengths: list[int], trials: int,
                     max_positions: int, progress: bool = True) -> list[dict]:
    """Results-schema `quality.passkey` rows (`lookup.passkey_rows`) of `models` ({"mod": ..., "base": ... or None})
    at each prompt length the models' `max_positions` can hold; the others are left out with a warning."""
    present = {name: model for name, model in models.items() if model is not None}
    rows = []
    for length in tqdm(lengths, desc="passkey", disable=not progress):
        if length > max_positions:
            logger.warning("passkey at %d tokens left out: more than the model's %d positions", length, max_positions)
            continue
        (row,) = passkey_rows(present, tokenizer, [length], trials)
        for name in models:
            row.setdefault(name, None)
        rows.append(row)
    return rows


def evaluate_lookup(models: dict[str, torch.nn.Module | None], filler: torch.Tensor, distances: list[int],
                    passage_tokens: int, trials: int, dataset: str, max_positions: int,
                    progress: bool = True) -> list[dict]:
    """Results-schema `quality.lookup` rows (`lookup.lookup_rows`) of `models` ({"mod": ..., "base": ... or None})
    at each distance that `filler` and the models' `max_positions` can hold; the others are left out with a
    warning."""
    fitting = []
    for distance in distances:
        needed = distance - passage_tokens + 1
        if distance + passage_tokens > max_positions:
            logger.warning("look-up at distance %d left out: %d tokens exceed the model's %d positions", distance,
                           distance + passage_tokens, max_positions)
        elif filler.numel() < needed:
            logger.warning("look-up at distance %d left out: the filler text %s has %d tokens, it needs %d", distance,
                           dataset, filler.numel(), needed)
        else:
            fitting.append(distance)
    present = {name: model for name, model in models.items() if model is not None}
    rows = []
    for distance in tqdm(fitting, desc=f"look-up {dataset}", disable=not progress):
        (row,) = lookup_rows(present, filler, [distance], passage_tokens, trials, dataset=dataset)
        for name in models:  # a model not measured (no base) is null
            row.setdefault(name, None)
        rows.append(row)
    return rows


# --------------------------------------------------------------------------------------------------------------------
# A whole evaluation of a checkpoint
# --------------------------------------------------------------------------------------------------------------------


def evaluate_checkpoint(settings: EvalSettings) -> dict:
    """Evaluate the MoD checkpoint `settings.model` (folder or Hub id) next to its base; returns the merged results.

    `settings.base`: a folder, Hub id or fetched registry name (default: the checkpoint's `base_model_name_or_path`
    when it is available locally; `no_base` evaluates the MoD model alone). Results go to `settings.out` (default:
    the checkpoint folder when local, else `./<org--name>`), with the settings as a command line (`command_line`).
    """
    from .tasks import run_lm_eval, task_manager, task_rows

    model, command, progress = settings.model, settings.command_line(), settings.progress
    texts = {}
    for data in settings.data:
        label = data_label(data, settings.split, settings.data_config)
        texts[data if label in texts else label] = load_texts(data, settings.text_field, settings.split,
                                                              settings.data_config)
    tasks = list(settings.tasks or [])
    manager = task_manager(tasks, settings.tasks_path) if tasks else None
    torch_device = pick_device(settings.device)
    torch_dtype = pick_dtype(settings.dtype, torch_device)

    mod, folder, base_model, base_name = load_models(model, settings.base, torch_device, torch_dtype,
                                                     use_base=not settings.no_base)
    max_positions = mod.config.max_position_embeddings
    if texts and max(settings.context_lengths) > max_positions:  # perplexity runs only on data
        raise ValueError(f"context_lengths holds {max(settings.context_lengths)}, more than the model's "
                         f"max_position_embeddings ({max_positions})")
    out_dir = Path(settings.out) if settings.out else default_output_dir(model)
    quality: dict = {}
    efficiency: dict = {}
    record: dict = {"model": model, "base": base_name, "device": str(torch_device), "dtype": str(torch_dtype)}

    if texts:
        import evaluate

        tokenizer = load_tokenizer(folder, base_name)
        routing_metrics = evaluate.combine([load_metric("routed_fraction"), load_metric("kv_fraction")])
        rows = []
        streams = {}
        for label, docs in texts.items():
            streams[label] = stream = tokenize_texts(tokenizer, docs, settings.max_tokens)
            for length in settings.context_lengths:
                rows.append(evaluate_perplexity(mod, base_model, stream, length, settings.stride, label,
                                                routing_metrics, progress, settings.full_context))
        routing = routing_metrics.compute()
        quality["perplexity"] = rows
        per_layer = routing["per_layer_routed_fraction"]
        efficiency.update({
            "kv_fraction": routing["kv_fraction"],
            "per_layer_routed_fraction": per_layer,
            "flop_fraction": flop_fractions(mod.config, per_layer, [r["context_length"] for r in rows]),
            "measured_on": {"data": list(texts), "context_lengths": [r["context_length"] for r in rows],
                            "tokens": sum(s.numel() for s in streams.values())},
        })
        record.update(perplexity=rows, routing=routing)
        from .plots import plot_routed_fraction

        plot_routed_fraction(per_layer, mod.config.routed_layers, out_dir / ROUTED_FRACTION_PLOT,
                             title=f"{Path(model).name}: KV fraction {routing['kv_fraction']:.3f}")
        if settings.lookup_distances:
            filler_label = next(iter(streams))
            quality["lookup"] = evaluate_lookup(
                {"mod": mod, "base": base_model}, streams[filler_label], settings.lookup_distances,
                settings.lookup_passage_tokens, settings.lookup_trials, filler_label, max_positions, progress)
            record["lookup"] = quality["lookup"]
    if settings.passkey_lengths:
        quality["passkey"] = evaluate_passkey({"mod": mod, "base": base_model}, load_tokenizer(folder, base_name),
                                              settings.passkey_lengths, settings.lookup_trials, max_positions,
                                              progress)
        record["passkey"] = quality["passkey"]
    config = mod.config
    del mod, base_model  # lm-eval loads its own copies
    if torch_device.type == "cuda":
        torch.cuda.empty_cache()

    if tasks:
        batch_size = settings.tasks_batch_size
        batch_size = batch_size if batch_size == "auto" else int(batch_size)
        if config.router_kind == "topk" and batch_size != 1:
            # lm-eval right-pads batches without an attention mask; top-k routing ranks a whole sequence, padding
            # included, so scores would depend on what a sequence was batched with.
            logger.warning("top-k routing is not causal in prefill: use --tasks-batch-size 1 for comparable scores")
        limit = settings.limit
        limit = int(limit) if limit is not None and limit >= 1 else limit
        common = dict(manager=manager, device=torch_device, dtype=torch_dtype, batch_size=batch_size, limit=limit,
                      num_fewshot=settings.num_fewshot)
        mod_out = run_lm_eval(str(folder), tasks, **common)
        base_out = run_lm_eval(base_name, tasks, **common) if base_name is not None else None
        quality["tasks"] = task_rows(mod_out, base_out)
        record["lm_eval"] = {"mod": mod_out, "base": base_out}

    results = update_results(out_dir / RESULTS_FILENAME, config, model, base_name, command, quality, efficiency)
    save_record(out_dir / RECORDS_DIRNAME, command=command, **record)
    return results


def save_record(folder: Path, **record) -> None:
    """`evaluate.save` the full record. It stamps the git commit of the working directory; run it from this
    package's source tree so the stamp names the code that produced the numbers (and git does not complain about a
    working directory that is not a repository)."""
    import contextlib

    import evaluate

    folder = folder.resolve()
    source = Path(__file__).resolve().parent.parent
    where = contextlib.chdir(source) if (source / ".git").exists() else contextlib.nullcontext()
    with where:
        evaluate.save(str(folder) + os.sep, **record)
