"""`modification eval`: quality of a MoD checkpoint next to its base, and how much of the model it ran.

- Perplexity of MoD and base on the same tokens, at one or more context lengths. A text longer than the context is
  scored with a sliding window (stride `--stride`, default half the context): every token is scored once, with at
  least `context - stride` tokens of context except at the start of the text.
- Executed fraction (per layer and overall) and KV ratio, counted from the MoD model's own router decisions and cache
  on the perplexity windows, through the project's `evaluate` modules (`conversion/metrics/`).
- Downstream tasks through lm-evaluation-harness (model `hf`, `trust_remote_code=True`) when `--tasks` is given; task
  YAML files and their data can be local (`--tasks-path`), so this runs offline.

Numbers are merged into the checkpoint's results JSON (`conversion/results.py`); a full record of the run is written
with `evaluate.save` next to it (`eval_records/`), and a bar chart of the per-layer executed fraction as PNG.
"""

from __future__ import annotations

import argparse
import difflib
import json
import logging
import math
import os
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .checkpoint import CheckpointError, fastest_attn_implementation, load_mod_model
from .data import add_data_arguments, load_texts, tokenize_stream
from .results import RESULTS_FILENAME, update_results


logger = logging.getLogger(__name__)

METRICS_DIR = Path(__file__).resolve().parent / "metrics"
RECORDS_DIRNAME = "eval_records"


# --------------------------------------------------------------------------------------------------------------------
# Shared by eval, bench and show-routing: devices, models, output folders, the results file
# --------------------------------------------------------------------------------------------------------------------


def pick_device(name: str = "auto") -> torch.device:
    """`auto`: CUDA when present, else CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for but no CUDA device is available")
    return device


def pick_dtype(name: str, device: torch.device) -> torch.dtype:
    """`auto`: bfloat16 on CUDA (what MoD's varlen attention kernels take), float32 on CPU."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, name)


def load_metric(name: str):
    """One of the project's `evaluate` modules (`executed_fraction`, `kv_ratio`), loaded from its local folder."""
    import evaluate

    return evaluate.load(str(METRICS_DIR / name), keep_in_memory=True)


def load_models(
    model: str, base: str | None, device: torch.device, dtype: torch.dtype, use_base: bool = True
) -> tuple[torch.nn.Module, Path, torch.nn.Module | None, str | None]:
    """The MoD model (and its folder) and the base model (and the name it was loaded from, or None), in eval mode.

    Without `base`, the base is the checkpoint's `base_model_name_or_path` if that resolves on this machine (a folder,
    or a Hub id already in the local cache); otherwise the MoD model is evaluated alone.
    """
    from .bases import base_path

    mod, folder = load_mod_model(model, dtype=dtype)
    mod = mod.to(device).eval()
    mod.set_attn_implementation(fastest_attn_implementation(device))
    base_name = base_path(base) if use_base and base else None  # a fetched registry name -> its cached folder
    if use_base and base_name is None:
        base_name = local_base_model(mod.config.base_model_name_or_path)
        if base_name is None:
            logger.warning("no --base given and the checkpoint's base model (%s) is not available locally: "
                           "evaluating the MoD model alone", mod.config.base_model_name_or_path)
    base_model = None
    if base_name is not None:
        from transformers import AutoModelForCausalLM

        try:
            base_model = AutoModelForCausalLM.from_pretrained(base_name, dtype=dtype)
        except OSError as err:
            raise CheckpointError(f"could not load the base model {base_name!r}: {err}") from err
        base_model = base_model.to(device).eval()
        if base_model.config.vocab_size != mod.config.vocab_size:
            raise ValueError(
                f"the base model {base_name} has vocab_size {base_model.config.vocab_size} but the MoD model has "
                f"{mod.config.vocab_size}: they cannot be compared on the same tokens"
            )
    return mod, folder, base_model, base_name


def local_base_model(name: str | None) -> str | None:
    """`name` if it is a local folder or a Hub id whose snapshot is in the local cache; else the cached folder of a
    base fetched with `modification fetch-base` whose Hub id (or registry name) is `name`; else None (never
    downloads)."""
    if not name:
        return None
    if Path(name).is_dir():
        return name
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(name, local_files_only=True)
    except Exception:  # not cached, or not a valid repo id
        pass
    from .bases import KNOWN_BASES, BaseNotFetchedError, base_path

    for registry_name, known in KNOWN_BASES.items():
        if name in (registry_name, known.hub_id):
            try:
                return base_path(registry_name)
            except BaseNotFetchedError:
                return None
    return None


def load_tokenizer(folder: Path, base_name: str | None = None):
    """The checkpoint's tokenizer, else the base's; a clear error when neither has one."""
    from transformers import AutoTokenizer

    from .checkpoint import read_mod_config

    # Our config is passed in so that AutoTokenizer does not go through the folder's custom code (auto_map) for it.
    sources = [(str(folder), {"config": read_mod_config(folder)})] + ([(base_name, {})] if base_name else [])
    for source, kwargs in sources:
        try:
            return AutoTokenizer.from_pretrained(source, **kwargs)
        except (OSError, ValueError, TypeError, KeyError):
            continue
    raise ValueError(f"no tokenizer found in {folder}" + (f" nor in {base_name}" if base_name else ""))


def default_output_dir(model: str, folder: Path) -> Path:
    """Where results go without --out: the checkpoint folder when it is a local folder outside the Hub cache, else
    `./<org--name>` (never write into the Hub cache)."""
    if Path(model).is_dir() and "snapshots" not in Path(model).resolve().parts:
        return Path(model)
    return Path.cwd() / model.strip("/").replace("/", "--")


def command_line(args: argparse.Namespace) -> str:
    """The exact command that produced the numbers (stored in the results' `commands`)."""
    argv = getattr(args, "argv", None)
    if argv is None:
        return f"modification {args.command}"
    return "modification " + shlex.join(argv)


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
# Perplexity, executed fraction and KV ratio on sliding windows
# --------------------------------------------------------------------------------------------------------------------


def sliding_windows(num_tokens: int, context_length: int, stride: int) -> list[tuple[int, int, int]]:
    """`(begin, end, scored)` windows over a stream: each window holds at most `context_length` tokens, and its last
    `scored` tokens are the ones not scored before (the first window scores all of its tokens but the first, which
    has nothing to be predicted from). Every token after the first is scored exactly once."""
    if context_length < 2:
        raise ValueError(f"context length must be at least 2, got {context_length}")
    if not 0 < stride <= context_length:
        raise ValueError(f"stride must lie in [1, context length {context_length}], got {stride}")
    windows = []
    scored_until = 0
    end = min(context_length, num_tokens)
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
) -> dict:
    """One perplexity row (MoD and base on the same windows) and, through `routing_metrics` (an `evaluate` module or
    combination taking `routed_tokens`, `tokens`, `mod_kv_bytes`, `base_kv_bytes`), the MoD model's routing counts.

    The row's `executed_fraction` is that of this text and context length alone.
    """
    effective = min(context_length, stream.numel())
    if effective < context_length:
        logger.warning("%s has %d tokens, fewer than the context length %d: scoring it as one window",
                       dataset, stream.numel(), context_length)
    stride = stride or max(effective // 2, 1)
    stride = min(stride, effective)
    windows = sliding_windows(stream.numel(), effective, stride)
    dtype = next(mod.parameters()).dtype
    totals = {"mod": 0.0, "base": 0.0}
    count = 0
    layer_counts = [0] * mod.config.num_hidden_layers
    window_tokens = 0
    for begin, end, scored in tqdm(windows, desc=f"perplexity {dataset} @{effective}", disable=not progress):
        window = stream[begin:end]
        m = score_window(mod, window, scored, is_mod=True)
        totals["mod"] += m.nll
        count += m.count
        layer_counts = [a + b for a, b in zip(layer_counts, m.routed_tokens)]
        window_tokens += window.numel()
        if routing_metrics is not None:
            routing_metrics.add_batch(
                routed_tokens=[m.routed_tokens], tokens=[window.numel()],
                mod_kv_bytes=[m.kv_bytes], base_kv_bytes=[dense_kv_bytes(mod.config, window.numel(), dtype)],
            )
        if base is not None:
            b = score_window(base, window, scored, is_mod=False)
            if b.count != m.count:
                raise RuntimeError("MoD and base scored different numbers of tokens")
            totals["base"] += b.nll
    return {
        "dataset": dataset,
        "context_length": effective,
        "tokens": count,
        "mod": math.exp(totals["mod"] / count),
        "base": math.exp(totals["base"] / count) if base is not None else None,
        "stride": stride,
        "windows": len(windows),
        "executed_fraction": sum(layer_counts) / (window_tokens * len(layer_counts)),
    }


# --------------------------------------------------------------------------------------------------------------------
# Downstream tasks through lm-evaluation-harness
# --------------------------------------------------------------------------------------------------------------------


def task_manager(tasks: list[str], tasks_path: list[str] | None):
    """lm-eval's TaskManager for `tasks`, after checking that each is a known task/group/tag name, a glob matching
    one, or a task YAML file (a clear error otherwise).

    When every task is found among the local tasks of `tasks_path` alone, only those are indexed (indexing lm-eval's
    thousands of built-in task files takes seconds); otherwise the built-in tasks are indexed too.
    """
    from lm_eval.tasks import TaskManager

    for p in tasks_path or []:
        if not Path(p).exists():
            raise FileNotFoundError(f"no task folder or file at {p}")
    if tasks_path:
        local = TaskManager(include_path=list(tasks_path), include_defaults=False)
        if all(Path(name).is_file() or local.match_tasks([name]) for name in tasks):
            return local
    manager = TaskManager(include_path=list(tasks_path) if tasks_path else None)
    for name in tasks:
        if Path(name).is_file() or manager.match_tasks([name]):
            continue
        close = difflib.get_close_matches(name, manager.all_tasks, n=5)
        hint = f"; did you mean {', '.join(close)}?" if close else "; local tasks need --tasks-path"
        raise ValueError(f"unknown lm-eval task {name!r}{hint}")
    return manager


def run_lm_eval(
    pretrained: str,
    tasks: list[str],
    manager,
    device: torch.device,
    dtype: torch.dtype,
    batch_size: int | str = 1,
    limit: float | None = None,
    num_fewshot: int | None = None,
    trust_remote_code: bool = True,
) -> dict:
    """lm-eval's `simple_evaluate` with model `hf` on `pretrained`: returns its results (JSON-safe parts)."""
    from lm_eval import simple_evaluate

    out = simple_evaluate(
        model="hf",
        model_args={"pretrained": pretrained, "trust_remote_code": trust_remote_code,
                    "dtype": str(dtype).replace("torch.", "")},
        tasks=tasks, task_manager=manager, device=str(device), batch_size=batch_size, limit=limit,
        num_fewshot=num_fewshot, log_samples=False,
    )
    keep = {k: out[k] for k in ("results", "n-samples", "n-shot", "versions", "config") if k in out}
    return json.loads(json.dumps(keep, default=str))


def task_rows(mod_out: dict, base_out: dict | None) -> list[dict]:
    """Results-schema rows (`task`, `metric`, `mod`, `base`, `num_samples`, stderr) from lm-eval outputs."""
    rows = []
    for task, metrics in mod_out["results"].items():
        for key, value in metrics.items():
            if not isinstance(value, (int, float)) or isinstance(value, bool) or "_stderr" in key or "," not in key:
                continue
            metric, filt = key.split(",", 1)
            name = metric if filt == "none" else f"{metric} ({filt})"
            base_value = (base_out or {}).get("results", {}).get(task, {}).get(key)
            samples = mod_out.get("n-samples", {}).get(task, {})
            stderr_key = f"{metric}_stderr,{filt}"
            rows.append({
                "task": task,
                "metric": name,
                "mod": float(value),
                "base": float(base_value) if isinstance(base_value, (int, float)) else None,
                "num_samples": samples.get("effective") if isinstance(samples, dict) else None,
                "mod_stderr": _number_or_none(metrics.get(stderr_key)),
                "base_stderr": _number_or_none((base_out or {}).get("results", {}).get(task, {}).get(stderr_key)),
                "num_fewshot": _number_or_none(mod_out.get("n-shot", {}).get(task)),
            })
    return rows


def _number_or_none(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


# --------------------------------------------------------------------------------------------------------------------
# The command
# --------------------------------------------------------------------------------------------------------------------


def _int_list(text: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or any(v < 2 for v in values):
        raise argparse.ArgumentTypeError(f"expected integers >= 2, got {text!r}")
    return values


def _limit(text: str) -> float:
    value = float(text)
    return int(value) if value >= 1 else value


def add_eval_parser(sub) -> None:
    """Register `modification eval`."""
    p = sub.add_parser("eval", help="perplexity, executed fraction, KV ratio and lm-eval tasks, MoD next to its base",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="MoD checkpoint: folder or Hub id")
    p.add_argument("--base", default=None,
                   help="base model (folder, Hub id, or a name fetched with `modification fetch-base`); default: the "
                        "checkpoint's base_model_name_or_path if local")
    p.add_argument("--no-base", action="store_true", help="evaluate the MoD model alone")
    add_data_arguments(p, required=False, default_split="test")
    p.add_argument("--context-lengths", type=_int_list, default=[1024],
                   help="comma-separated context lengths for perplexity (default 1024)")
    p.add_argument("--stride", type=int, default=None, help="sliding-window stride in tokens (default: context / 2)")
    p.add_argument("--max-tokens", type=int, default=None, help="use at most this many tokens of each dataset")
    p.add_argument("--tasks", default=None, help="comma-separated lm-eval tasks (names, globs or YAML files)")
    p.add_argument("--tasks-path", action="append", default=[], help="folder or YAML file of local lm-eval tasks")
    p.add_argument("--limit", type=_limit, default=None, help="lm-eval: examples per task (int) or fraction (<1)")
    p.add_argument("--num-fewshot", type=int, default=None, help="lm-eval: few-shot examples")
    p.add_argument("--tasks-batch-size", default="1", help="lm-eval batch size (int or auto)")
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu or cuda")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="auto: bfloat16 on CUDA, float32 on CPU")
    p.add_argument("--out", default=None, help="folder for results.json, plots and records (default: the checkpoint "
                                               "folder if local, else ./<org--name>)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_eval)


def cmd_eval(args: argparse.Namespace) -> dict:
    """Run `modification eval`; returns the merged results."""
    # Bad input first, before any model is loaded.
    args.data = args.data or []
    if not args.data and not args.tasks:
        raise ValueError("nothing to evaluate: give --data (perplexity) and/or --tasks (lm-eval)")
    if args.stride is not None and args.stride < 1:
        raise ValueError("--stride must be a positive number of tokens")
    if args.max_tokens is not None and args.max_tokens < 2:
        raise ValueError("--max-tokens must be at least 2")
    texts = {}
    for data in args.data:
        label = data_label(data, args.split, args.data_config)
        texts[data if label in texts else label] = load_texts(data, args.text_field, args.split, args.data_config)
    tasks = [t.strip() for t in (args.tasks or "").split(",") if t.strip()]
    if args.tasks_batch_size != "auto" and not args.tasks_batch_size.isdigit():
        raise ValueError(f"--tasks-batch-size must be a positive integer or auto, got {args.tasks_batch_size!r}")
    manager = None
    if tasks:
        manager = task_manager(tasks, args.tasks_path)
    device = pick_device(args.device)
    dtype = pick_dtype(args.dtype, device)
    progress = not args.no_progress

    mod, folder, base, base_name = load_models(args.model, args.base, device, dtype, use_base=not args.no_base)
    out_dir = Path(args.out) if args.out else default_output_dir(args.model, folder)
    quality: dict = {}
    efficiency: dict = {}
    record: dict = {"model": args.model, "base": base_name, "device": str(device), "dtype": str(dtype)}

    if texts:
        import evaluate

        tokenizer = load_tokenizer(folder, base_name)
        routing_metrics = evaluate.combine([load_metric("executed_fraction"), load_metric("kv_ratio")])
        rows = []
        total_tokens = 0
        for label, docs in texts.items():
            stream = tokenize_texts(tokenizer, docs, args.max_tokens)
            total_tokens += stream.numel()
            for length in args.context_lengths:
                rows.append(evaluate_perplexity(mod, base, stream, length, args.stride, label, routing_metrics,
                                                progress))
        routing = routing_metrics.compute()
        quality["perplexity"] = rows
        efficiency.update({
            "executed_fraction": routing["executed_fraction"],
            "per_layer_routed_fraction": routing["per_layer_routed_fraction"],
            "kv_ratio": routing["kv_ratio"],
            "measured_on": {"data": list(texts), "context_lengths": [r["context_length"] for r in rows],
                            "tokens": total_tokens},
        })
        record.update(perplexity=rows, routing=routing)
        from .plots import plot_executed_fraction

        plot_executed_fraction(routing["per_layer_routed_fraction"], mod.config.routed_layers,
                               out_dir / "executed_fraction.png",
                               title=f"{Path(args.model).name}: executed fraction {routing['executed_fraction']:.3f}")
    config = mod.config
    del mod, base  # lm-eval loads its own copies
    if device.type == "cuda":
        torch.cuda.empty_cache()

    if tasks:
        batch_size = args.tasks_batch_size if args.tasks_batch_size == "auto" else int(args.tasks_batch_size)
        if config.router_kind == "topk" and batch_size != 1:
            # lm-eval right-pads batches without an attention mask; top-k routing ranks a whole sequence, padding
            # included, so scores would depend on what a sequence was batched with.
            logger.warning("top-k routing is not causal in prefill: use --tasks-batch-size 1 for comparable scores")
        common = dict(manager=manager, device=device, dtype=dtype, batch_size=batch_size, limit=args.limit,
                      num_fewshot=args.num_fewshot)
        mod_out = run_lm_eval(str(folder), tasks, **common)
        base_out = run_lm_eval(base_name, tasks, **common) if base_name is not None else None
        quality["tasks"] = task_rows(mod_out, base_out)
        record["lm_eval"] = {"mod": mod_out, "base": base_out}

    command = command_line(args)
    results = update_results(out_dir / RESULTS_FILENAME, config, args.model, base_name, command, quality, efficiency)
    save_record(out_dir / RECORDS_DIRNAME, command=command, **record)
    print_summary(results, quality)
    print(f"wrote {out_dir / RESULTS_FILENAME}")
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


def print_summary(results: dict, quality: dict) -> None:
    for row in quality.get("perplexity", []):
        base = "n/a" if row["base"] is None else f"{row['base']:.3f}"
        print(f"perplexity {row['dataset']} @{row['context_length']}: mod {row['mod']:.3f}  base {base}  "
              f"(executed fraction {row['executed_fraction']:.3f}, {row['tokens']} tokens)")
    for row in quality.get("tasks", []):
        base = "n/a" if row["base"] is None else f"{row['base']:.4f}"
        print(f"task {row['task']} {row['metric']}: mod {row['mod']:.4f}  base {base}")
    eff = results.get("efficiency", {})
    if "executed_fraction" in eff and "measured_on" in eff:
        print(f"executed fraction {eff['executed_fraction']:.4f}  KV ratio {eff['kv_ratio']:.4f}")
