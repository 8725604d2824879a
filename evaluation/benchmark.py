"""Speed and memory of a MoD model against its base, measured in one process with alternating runs.

Absolute times on a shared machine are noisy; the ratios MoD/base from interleaved repetitions are what to report.
Next to each measured ratio stand the budgets it is to be read against, as `RoutingPlan` counts them with the share of
tokens each routed layer was measured to run on the timed prompt (`conversion.budget.measured_plan`):

- `flop_fraction`: executed over dense FLOPs (`MoDConfig.prefill_flops`: projections and MLP scale with a layer's
  routed share r, its causal attention with r^2, the MLP not at all where only attention is routed, the LM head
  included). For a prefill of T tokens it is the ideal latency ratio; for decoding, that of the decoded tokens
  (`decode_flop_fraction`), whose inverse is the ideal throughput ratio.
- `kv_fraction`: the bytes the MoD cache holds over those of the base's, both measured from the caches.
"""

from __future__ import annotations

import contextlib
import json
import platform
import statistics
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from tqdm.auto import tqdm

from modification.conversion.budget import Budget, measured_plan
from modification.conversion.calibrate import calibrate_thresholds
from modification.modeling import MoDForCausalLM

from .settings import BenchSettings


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn: Callable[[], object], device: torch.device) -> tuple[float, object]:
    _sync(device)
    start = time.perf_counter()
    result = fn()
    _sync(device)
    return time.perf_counter() - start, result


def _quartiles(ordered: list[float]) -> tuple[float, float]:
    if len(ordered) < 2:
        return ordered[0], ordered[0]
    q = statistics.quantiles(ordered, n=4)
    return q[0], q[2]


def summarize(samples: list[float]) -> dict:
    """Median and spread (min, max, quartiles, IQR) of repeated measurements."""
    ordered = sorted(samples)
    q1, q3 = _quartiles(ordered)
    return {"median": statistics.median(ordered), "min": ordered[0], "max": ordered[-1], "iqr": q3 - q1,
            "q1": q1, "q3": q3, "samples": ordered}


def cache_kv_bytes(cache) -> int:
    """Bytes of keys and values held by a MoDCache or a standard transformers cache."""
    if hasattr(cache, "kv_bytes"):
        return cache.kv_bytes()
    total = 0
    for layer in cache.layers:
        for tensor in (layer.keys, layer.values):
            if tensor is not None:
                total += tensor.numel() * tensor.element_size()
    return total


def decode_flop_fraction(plan, config, prompt_length: int, new_tokens: int) -> float:
    """Executed over dense FLOPs of decoding `new_tokens` tokens after a `prompt_length`-token prompt, as `plan` runs:
    the prefill counts of `MoDConfig.prefill_flops` at the end of decoding less those at its start (a token at
    position t costs what a prefill of t + 1 tokens costs more than one of t: its projections and MLP, and attention
    over the t + 1 keys; routed, r of them in a layer keeping a share r). Batch size does not change the fraction."""
    end, start = prompt_length + new_tokens, prompt_length
    executed = config.prefill_flops(end, plan)["total"] - config.prefill_flops(start, plan)["total"]
    dense = config.prefill_flops(end)["total"] - config.prefill_flops(start)["total"]
    return executed / dense


def _router_kwargs(model) -> dict:
    """Ask a MoD model for its per-layer routed fractions (returned only on request); nothing for the base."""
    return {"output_router_logits": True} if isinstance(model, MoDForCausalLM) else {}


def _prefill(model, ids):
    with torch.no_grad():
        return model(input_ids=ids, use_cache=True, logits_to_keep=1, **_router_kwargs(model))


def _decode(model, cache, last_token, steps: int):
    """Greedy decoding of `steps` tokens; returns the cache and, for a MoD model, the mean routed fraction per layer
    over the decoded tokens (None for the base)."""
    routed = None
    with torch.no_grad():
        token = last_token
        for _ in range(steps):
            out = model(input_ids=token, cache=cache, use_cache=True, **_router_kwargs(model))
            token = out.logits[:, -1:].argmax(-1)
            cache = out.cache
            fraction = getattr(out, "routed_fraction", None)
            if fraction is not None:
                routed = fraction.float() if routed is None else routed + fraction.float()
    return cache, None if routed is None else (routed / steps).tolist()


def _prompt(prompt_ids: torch.Tensor | None, vocab: int, batch: int, length: int, gen: torch.Generator) -> torch.Tensor:
    """`batch` prompts of `length` tokens: random ids, or different slices of the token stream `prompt_ids`."""
    if prompt_ids is None:
        return torch.randint(0, vocab, (batch, length), generator=gen)
    if prompt_ids.numel() < length:
        raise ValueError(f"the benchmark text has {prompt_ids.numel()} tokens, fewer than the {length} needed; "
                         "give more text or shorter lengths")
    step = (prompt_ids.numel() - length) // max(batch - 1, 1)
    return torch.stack([prompt_ids[i * step: i * step + length] for i in range(batch)])


@contextlib.contextmanager
def cuda_peak_memory(device: torch.device) -> Iterator[dict]:
    """Measure the CUDA allocator's peak above what was allocated on entry: `peak_memory_bytes` in the yielded dict
    after the block (nothing off CUDA)."""
    peak: dict = {}
    if device.type != "cuda":
        yield peak
        return
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    yield peak
    peak["peak_memory_bytes"] = torch.cuda.max_memory_allocated(device) - before


def _alternating(run: Callable[[str], tuple[float, dict]], repetitions: int, device: torch.device, bar) -> tuple:
    """Call `run(name)` -> (seconds, info) for "mod" and "base" in alternating order: a warm-up round, whose info is
    kept with its CUDA peak memory, then `repetitions` timed rounds. Returns the seconds per name and the warm-up
    info per name."""
    times: dict[str, list[float]] = {"mod": [], "base": []}
    warm_up: dict[str, dict] = {}
    for rep in range(repetitions + 1):
        for name in ("mod", "base") if rep % 2 == 0 else ("base", "mod"):
            if rep == 0:
                with cuda_peak_memory(device) as peak:
                    _, info = run(name)
                warm_up[name] = {**info, **peak}
            else:
                times[name].append(run(name)[0])
            bar.update()
    return times, warm_up


def _kv_fields(warm_up: dict) -> dict:
    return {"mod_kv_bytes": warm_up["mod"]["kv_bytes"], "base_kv_bytes": warm_up["base"]["kv_bytes"],
            "kv_fraction": warm_up["mod"]["kv_bytes"] / warm_up["base"]["kv_bytes"]}


def _peak_memory_fields(warm_up: dict) -> dict:
    if "peak_memory_bytes" not in warm_up["mod"]:  # not measured (off CUDA)
        return {}
    mod, base = warm_up["mod"]["peak_memory_bytes"], warm_up["base"]["peak_memory_bytes"]
    return {"mod_peak_memory_bytes": mod, "base_peak_memory_bytes": base, "peak_memory_ratio": mod / base}


def _prefill_entry(models: dict, ids: torch.Tensor, repetitions: int, device: torch.device, bar) -> dict:
    """Prefill latency of one prompt, MoD against base, with what the MoD model routed and what the caches hold."""

    def run(name: str) -> tuple[float, dict]:
        seconds, out = _timed(lambda: _prefill(models[name], ids), device)
        info = {"kv_bytes": cache_kv_bytes(out.cache)}
        if name == "mod":
            info["routed_fraction"] = [round(float(x), 6) for x in out.routed_fraction]
        return seconds, info

    times, warm_up = _alternating(run, repetitions, device, bar)
    mod_t, base_t = summarize(times["mod"]), summarize(times["base"])
    routed = warm_up["mod"]["routed_fraction"]
    # Runs alternate, so repetition i of MoD and of base ran side by side: their ratio cancels slow drifts.
    paired = summarize([m / b for m, b in zip(times["mod"], times["base"])])
    config = models["mod"].config
    return {
        "length": ids.shape[1],
        "mod_seconds": mod_t,
        "base_seconds": base_t,
        "latency_ratio": mod_t["median"] / base_t["median"],
        "latency_ratio_paired": {k: v for k, v in paired.items() if k != "samples"},
        "flop_fraction": measured_plan(config, routed).flop_fraction(config, ids.shape[1]),
        "routed_fraction_per_layer": routed,
        **_kv_fields(warm_up),
        **_peak_memory_fields(warm_up),
    }


def _decode_row(models: dict, prompt: torch.Tensor, tokens: int, repetitions: int, device: torch.device, bar) -> dict:
    """Greedy decoding of `tokens` tokens after `prompt` (its prefill not timed), MoD against base."""

    def run(name: str) -> tuple[float, dict]:
        out = _prefill(models[name], prompt)
        last = out.logits[:, -1:].argmax(-1)
        seconds, (cache, routed) = _timed(lambda: _decode(models[name], out.cache, last, tokens), device)
        return seconds, {"kv_bytes": cache_kv_bytes(cache), "routed": routed}  # prompt + new tokens

    times, warm_up = _alternating(run, repetitions, device, bar)
    batch_size, prompt_length = prompt.shape
    mod_tps = [batch_size * tokens / s for s in times["mod"]]
    base_tps = [batch_size * tokens / s for s in times["base"]]
    routed = [round(x, 6) for x in warm_up["mod"]["routed"]]
    config = models["mod"].config
    return {
        "batch_size": batch_size,
        "prompt_length": prompt_length,
        "new_tokens": tokens,
        "mod_tokens_per_second": summarize(mod_tps),
        "base_tokens_per_second": summarize(base_tps),
        "throughput_ratio": statistics.median(mod_tps) / statistics.median(base_tps),
        "flop_fraction": decode_flop_fraction(measured_plan(config, routed), config, prompt_length, tokens),
        "routed_fraction_per_layer": routed,  # over the decoded tokens
        **_kv_fields(warm_up),  # the cache after decoding: prompt and new tokens
        **_peak_memory_fields(warm_up),
    }


def run_benchmark(
    mod_model: MoDForCausalLM,
    base_model: torch.nn.Module,
    lengths: list[int],
    repetitions: int = 5,
    decode_batch_sizes: tuple[int, ...] = (1, 4),
    decode_tokens: int = 32,
    decode_prompt_len: int = 256,
    seed: int = 0,
    progress: bool = True,
    kv_fraction: float | None = None,
    prompt_ids: torch.Tensor | None = None,
) -> dict:
    """Prefill latency, decode tokens/s, KV-cache bytes (and peak memory on CUDA) of MoD and base, alternating runs.

    Prompts are random token ids, or slices of `prompt_ids` (a 1-D token stream, e.g. real text: a trained router
    routes real text differently from random ids). Speed does not depend on the text but the routed fraction does, so
    it is reported from the MoD model's own decisions on these prompts. With `kv_fraction` the thresholds are first
    calibrated on each prompt to that budget (a speed benchmark at a chosen KV fraction, e.g. for a model with random
    router weights); otherwise the model's own thresholds are used as they are. Prompts may be longer than the
    model's `max_position_embeddings`: what they would predict does not matter here, and the time is that of the
    same work.
    """
    device = next(mod_model.parameters()).device
    gen = torch.Generator().manual_seed(seed)
    models = {"mod": mod_model.eval(), "base": base_model.eval()}
    bar = tqdm(total=(len(lengths) + len(decode_batch_sizes)) * (repetitions + 1) * 2, desc="benchmark",
               disable=not progress)

    def prompt(batch: int, length: int) -> torch.Tensor:
        ids = _prompt(prompt_ids, mod_model.config.vocab_size, batch, length, gen).to(device)
        if kv_fraction is not None:  # the calibration target is the mean routed fraction over layers: the KV fraction
            calibrate_thresholds(mod_model, [{"input_ids": ids}], Budget(kv_fraction=kv_fraction), progress=False)
        return ids

    result = {
        "prefill": [_prefill_entry(models, prompt(1, length), repetitions, device, bar) for length in lengths],
        "decode": [_decode_row(models, prompt(batch_size, decode_prompt_len), decode_tokens, repetitions, device, bar)
                   for batch_size in decode_batch_sizes],
    }
    bar.close()
    result["setup"] = {
        **describe_device(device),
        "dtype": str(next(mod_model.parameters()).dtype).replace("torch.", ""),
        "repetitions": repetitions,
        "prompts": "random token ids" if prompt_ids is None else "slices of the given text",
        "peak_memory": "CUDA allocator peak" if device.type == "cuda" else "not measured on CPU",
        "mod_attention_backend": mod_model.config._attn_implementation,
        "base_attn_implementation": base_model.config._attn_implementation,
    }
    return result


def describe_device(device: torch.device) -> dict:
    """Hardware and software the numbers came from."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = platform.processor() or platform.machine()
        try:
            with open("/proc/cpuinfo") as f:
                name = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
        except (OSError, StopIteration):
            pass
    return {
        "device": name,
        "device_type": device.type,
        "torch_threads": torch.get_num_threads(),
        "torch_version": torch.__version__,
        "python": platform.python_version(),
    }


# --------------------------------------------------------------------------------------------------------------------
# A whole benchmark of a checkpoint against its base
# --------------------------------------------------------------------------------------------------------------------

BENCH_FILENAME = "bench.json"
BENCH_PLOT_FILENAME = "bench.png"


def latency_rows(bench: dict) -> list[dict]:
    """Results-schema `efficiency.latency` rows from a `run_benchmark` result."""
    return [{
        "context_length": row["length"],
        "prefill_latency_ratio": row["latency_ratio"],
        "flop_fraction": row["flop_fraction"],
        "kv_fraction": row["kv_fraction"],
        "peak_memory_ratio": row.get("peak_memory_ratio"),
        "prefill_latency_ratio_iqr": row["latency_ratio_paired"]["iqr"],
        "mod_prefill_seconds": row["mod_seconds"]["median"],
        "base_prefill_seconds": row["base_seconds"]["median"],
    } for row in bench["prefill"]]


def decode_rows(bench: dict) -> list[dict]:
    """Results-schema `efficiency.decode` rows from a `run_benchmark` result."""
    return [{
        "batch_size": row["batch_size"],
        "throughput_ratio": row["throughput_ratio"],
        "flop_fraction": row["flop_fraction"],
        "mod_tokens_per_second": row["mod_tokens_per_second"]["median"],
        "base_tokens_per_second": row["base_tokens_per_second"]["median"],
        "prompt_length": row["prompt_length"],
        "new_tokens": row["new_tokens"],
        "kv_fraction": row["kv_fraction"],
        "peak_memory_ratio": row.get("peak_memory_ratio"),
    } for row in bench["decode"]]


def benchmark_checkpoint(settings: BenchSettings) -> dict:
    """Benchmark the MoD checkpoint `settings.model` against its base (`settings.base`, default: the checkpoint's own
    when local); write bench.json and bench.png to `settings.out` (default: the checkpoint folder when local, else
    `./<org--name>`) and merge the ratios into its results JSON (unless `settings.kv_fraction` recalibrated the
    thresholds for the run). Returns the bench record (what bench.json holds)."""
    from modification.conversion.data import load_texts
    from modification.conversion.results import RESULTS_FILENAME, update_results

    from .loading import default_output_dir, load_models, load_tokenizer, pick_device, pick_dtype
    from .plots import plot_bench
    from .quality import data_label, tokenize_texts

    model, command, progress = settings.model, settings.command_line(), settings.progress
    if settings.threads is not None:
        torch.set_num_threads(settings.threads)  # recorded in the hardware section as torch_threads
    texts = None
    if settings.data:
        texts = [t for source in settings.data
                 for t in load_texts(source, settings.text_field, settings.split, settings.data_config)]
    torch_device = pick_device(settings.device)
    torch_dtype = pick_dtype(settings.dtype, torch_device)
    mod, folder, base_model, base_name = load_models(model, settings.base, torch_device, torch_dtype)
    if base_model is None:
        raise ValueError("bench compares against the base model: give --base (a folder or a cached Hub id)")
    prompt_ids = None
    if texts is not None:
        needed = max(max(settings.lengths), settings.decode_prompt_length)
        prompt_ids = tokenize_texts(load_tokenizer(folder, base_name), texts, max_tokens=None)
        if prompt_ids.numel() < needed:
            raise ValueError(f"{settings.data} has {prompt_ids.numel()} tokens; the benchmark needs {needed}")
    bench = run_benchmark(
        mod, base_model, settings.lengths, repetitions=settings.repetitions,
        decode_batch_sizes=tuple(settings.decode_batch_sizes), decode_tokens=settings.decode_tokens,
        decode_prompt_len=settings.decode_prompt_length, seed=settings.seed, progress=progress,
        kv_fraction=settings.kv_fraction, prompt_ids=prompt_ids,
    )
    out_dir = Path(settings.out) if settings.out else default_output_dir(model)
    out_dir.mkdir(parents=True, exist_ok=True)
    record = {
        "command": command, "model": model, "base": base_name,
        "prompts": ", ".join(data_label(d, settings.split, settings.data_config) for d in settings.data)
        if settings.data else "random token ids",
        "kv_fraction": settings.kv_fraction, **bench,
    }
    (out_dir / BENCH_FILENAME).write_text(json.dumps(record, indent=2) + "\n")
    plot_bench(bench, out_dir / BENCH_PLOT_FILENAME, title=f"{Path(model.rstrip('/')).name} / base, "
               f"{bench['setup']['device']} ({bench['setup']['dtype']})")
    if settings.kv_fraction is None:
        efficiency = {"latency": latency_rows(bench), "hardware": dict(bench["setup"])}
        if bench["decode"]:
            efficiency["decode"] = decode_rows(bench)
        update_results(out_dir / RESULTS_FILENAME, mod.config, model, base_name, command, efficiency=efficiency)
    record["out"] = str(out_dir)
    return record
