"""Speed and memory of a MoD model against its base, measured in one process with alternating runs.

Absolute times on a shared machine are noisy; the ratios MoD/base from interleaved repetitions are what to report.
Next to each measured ratio stands the ideal one implied by the executed fraction: the ratio of the FLOPs the MoD
model executes to the FLOPs of the dense model on the same input (linear layers scale with the routed fraction r of a
layer, causal attention inside it with r^2).
"""

from __future__ import annotations

import platform
import statistics
import time
from collections.abc import Callable

import torch
from tqdm.auto import tqdm

from modification.modeling import MoDForCausalLM

from .calibrate import calibrate_thresholds
from modification.modeling.modeling_mod import select_attention_backend


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn: Callable[[], object], device: torch.device) -> tuple[float, object]:
    _sync(device)
    start = time.perf_counter()
    result = fn()
    _sync(device)
    return time.perf_counter() - start, result


def summarize(samples: list[float]) -> dict:
    """Median and spread of repeated measurements."""
    ordered = sorted(samples)
    q1, q3 = (statistics.quantiles(ordered, n=4)[0], statistics.quantiles(ordered, n=4)[2]) if len(ordered) > 1 else (
        ordered[0], ordered[0])
    return {"median": statistics.median(ordered), "min": ordered[0], "max": ordered[-1], "iqr": q3 - q1,
            "samples": ordered}


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


def layer_flops(config, tokens: int) -> tuple[float, float]:
    """(linear, attention) FLOPs of one decoder layer running `tokens` tokens of one sequence, causal prefill."""
    d, h, kv, hd, inter = (config.hidden_size, config.num_attention_heads, config.num_key_value_heads,
                           config.head_dim, config.intermediate_size)
    linear = 2 * tokens * (d * h * hd + 2 * d * kv * hd + h * hd * d + 3 * d * inter)
    attention = 2 * 2 * h * hd * tokens * (tokens + 1) / 2
    return linear, attention


def ideal_prefill_ratio(config, routed_fraction: list[float], seq_len: int) -> float:
    """FLOPs executed by the MoD model over FLOPs of the dense model, for one sequence of `seq_len` tokens."""
    dense = sum(layer_flops(config, seq_len)) * len(routed_fraction)
    executed = sum(sum(layer_flops(config, round(r * seq_len))) for r in routed_fraction)
    return executed / dense


def _prefill(model, ids):
    with torch.no_grad():
        return model(input_ids=ids, use_cache=True, logits_to_keep=1)


def _decode(model, cache, last_token, steps: int):
    with torch.no_grad():
        token = last_token
        for _ in range(steps):
            out = model(input_ids=token, cache=cache, use_cache=True)
            token = out.logits[:, -1:].argmax(-1)
            cache = out.cache
    return cache


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
    target_executed_fraction: float | None = None,
) -> dict:
    """Prefill latency, decode tokens/s, KV-cache bytes (and peak memory on CUDA) of MoD and base, alternating runs.

    Prompts are random token ids: speed does not depend on the text, but the routed fraction does, so it is
    reported from the MoD model's own decisions on these prompts. With `target_executed_fraction` the thresholds are
    first calibrated on each prompt to that budget (a speed benchmark at a chosen executed fraction, e.g. for a model
    with random weights); otherwise the model's own thresholds are used as they are.
    """
    device = next(mod_model.parameters()).device
    dtype = next(mod_model.parameters()).dtype
    vocab = mod_model.config.vocab_size
    gen = torch.Generator().manual_seed(seed)
    models = {"mod": mod_model.eval(), "base": base_model.eval()}
    result: dict = {"prefill": [], "decode": []}
    steps = len(lengths) * (repetitions + 1) * 2 + len(decode_batch_sizes) * (repetitions + 1) * 2
    bar = tqdm(total=steps, desc="benchmark", disable=not progress)

    for length in lengths:
        ids = torch.randint(0, vocab, (1, length), generator=gen).to(device)
        if target_executed_fraction is not None:
            calibrate_thresholds(mod_model, [{"input_ids": ids}], target_executed_fraction, progress=False)
        times = {"mod": [], "base": []}
        info = {}
        for rep in range(repetitions + 1):  # the first round warms up and is not counted
            for name in ("mod", "base") if rep % 2 == 0 else ("base", "mod"):
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                    torch.cuda.reset_peak_memory_stats(device)
                    before = torch.cuda.memory_allocated(device)
                seconds, out = _timed(lambda m=models[name]: _prefill(m, ids), device)
                bar.update()
                if rep == 0:
                    info[name] = {"kv_bytes": cache_kv_bytes(out.cache)}
                    if name == "mod":
                        info[name]["routed_fraction"] = [round(float(x), 6) for x in out.routed_fraction]
                    if device.type == "cuda":
                        info[name]["peak_memory_bytes"] = torch.cuda.max_memory_allocated(device) - before
                    continue
                times[name].append(seconds)
                del out
        mod_t, base_t = summarize(times["mod"]), summarize(times["base"])
        routed = info["mod"]["routed_fraction"]
        entry = {
            "length": length,
            "mod_seconds": mod_t,
            "base_seconds": base_t,
            "latency_ratio": mod_t["median"] / base_t["median"],
            "executed_fraction": sum(routed) / len(routed),
            "ideal_latency_ratio": ideal_prefill_ratio(mod_model.config, routed, length),
            "routed_fraction_per_layer": routed,
            "mod_kv_bytes": info["mod"]["kv_bytes"],
            "base_kv_bytes": info["base"]["kv_bytes"],
            "kv_ratio": info["mod"]["kv_bytes"] / info["base"]["kv_bytes"],
        }
        entry["ideal_kv_ratio"] = entry["executed_fraction"]
        if device.type == "cuda":
            entry["mod_peak_memory_bytes"] = info["mod"]["peak_memory_bytes"]
            entry["base_peak_memory_bytes"] = info["base"]["peak_memory_bytes"]
            entry["peak_memory_ratio"] = entry["mod_peak_memory_bytes"] / entry["base_peak_memory_bytes"]
        result["prefill"].append(entry)

    for batch_size in decode_batch_sizes:
        prompt = torch.randint(0, vocab, (batch_size, decode_prompt_len), generator=gen).to(device)
        if target_executed_fraction is not None:
            calibrate_thresholds(mod_model, [{"input_ids": prompt}], target_executed_fraction, progress=False)
        times = {"mod": [], "base": []}
        for rep in range(repetitions + 1):
            for name in ("mod", "base") if rep % 2 == 0 else ("base", "mod"):
                out = _prefill(models[name], prompt)
                last = out.logits[:, -1:].argmax(-1)
                seconds, _ = _timed(lambda m=models[name], o=out, t=last: _decode(m, o.cache, t, decode_tokens), device)
                bar.update()
                if rep > 0:
                    times[name].append(seconds)
        mod_tps = [batch_size * decode_tokens / s for s in times["mod"]]
        base_tps = [batch_size * decode_tokens / s for s in times["base"]]
        result["decode"].append({
            "batch_size": batch_size,
            "prompt_length": decode_prompt_len,
            "new_tokens": decode_tokens,
            "mod_tokens_per_second": summarize(mod_tps),
            "base_tokens_per_second": summarize(base_tps),
            "throughput_ratio": statistics.median(mod_tps) / statistics.median(base_tps),
        })
    bar.close()
    result["setup"] = {
        **describe_device(device),
        "dtype": str(dtype).replace("torch.", ""),
        "repetitions": repetitions,
        "mod_attention_backend": select_attention_backend(device, dtype, mod_model.config._attn_implementation),
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
