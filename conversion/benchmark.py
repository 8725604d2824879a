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
from .data import add_data_arguments, load_texts


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
    prompt_ids: torch.Tensor | None = None,
) -> dict:
    """Prefill latency, decode tokens/s, KV-cache bytes (and peak memory on CUDA) of MoD and base, alternating runs.

    Prompts are random token ids, or slices of `prompt_ids` (a 1-D token stream, e.g. real text: a trained router
    routes real text differently from random ids). Speed does not depend on the text but the routed fraction does, so
    it is reported from the MoD model's own decisions on these prompts. With `target_executed_fraction` the thresholds are
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
        ids = _prompt(prompt_ids, vocab, 1, length, gen).to(device)
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
        # Runs alternate, so repetition i of MoD and of base ran side by side: their ratio cancels slow drifts.
        paired = summarize([m / b for m, b in zip(times["mod"], times["base"])])
        entry = {
            "length": length,
            "mod_seconds": mod_t,
            "base_seconds": base_t,
            "latency_ratio": mod_t["median"] / base_t["median"],
            "latency_ratio_paired": {k: v for k, v in paired.items() if k != "samples"},
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
        prompt = _prompt(prompt_ids, vocab, batch_size, decode_prompt_len, gen).to(device)
        if target_executed_fraction is not None:
            calibrate_thresholds(mod_model, [{"input_ids": prompt}], target_executed_fraction, progress=False)
        times = {"mod": [], "base": []}
        info = {}
        for rep in range(repetitions + 1):
            for name in ("mod", "base") if rep % 2 == 0 else ("base", "mod"):
                if device.type == "cuda" and rep == 0:
                    torch.cuda.empty_cache()
                    torch.cuda.reset_peak_memory_stats(device)
                    before = torch.cuda.memory_allocated(device)
                out = _prefill(models[name], prompt)
                last = out.logits[:, -1:].argmax(-1)
                seconds, (cache, routed) = _timed(
                    lambda m=models[name], o=out, t=last: _decode(m, o.cache, t, decode_tokens), device
                )
                bar.update()
                if rep == 0:  # warm-up round: record what the cache holds after prompt + new tokens
                    info[name] = {"kv_bytes": cache_kv_bytes(cache), "routed": routed}
                    if device.type == "cuda":
                        info[name]["peak_memory_bytes"] = torch.cuda.max_memory_allocated(device) - before
                else:
                    times[name].append(seconds)
                del out, cache
        mod_tps = [batch_size * decode_tokens / s for s in times["mod"]]
        base_tps = [batch_size * decode_tokens / s for s in times["base"]]
        decode_executed = sum(info["mod"]["routed"]) / len(info["mod"]["routed"])
        row = {
            "batch_size": batch_size,
            "prompt_length": decode_prompt_len,
            "new_tokens": decode_tokens,
            "mod_tokens_per_second": summarize(mod_tps),
            "base_tokens_per_second": summarize(base_tps),
            "throughput_ratio": statistics.median(mod_tps) / statistics.median(base_tps),
            "executed_fraction": decode_executed,
            # Decoding is bound by the linear layers at these lengths: their work scales with the executed fraction.
            "ideal_throughput_ratio": 1.0 / decode_executed if decode_executed > 0 else None,
            "mod_kv_bytes": info["mod"]["kv_bytes"],
            "base_kv_bytes": info["base"]["kv_bytes"],
            "kv_ratio": info["mod"]["kv_bytes"] / info["base"]["kv_bytes"],
        }
        if device.type == "cuda":
            row["mod_peak_memory_bytes"] = info["mod"]["peak_memory_bytes"]
            row["base_peak_memory_bytes"] = info["base"]["peak_memory_bytes"]
            row["peak_memory_ratio"] = row["mod_peak_memory_bytes"] / row["base_peak_memory_bytes"]
        result["decode"].append(row)
    bar.close()
    result["setup"] = {
        **describe_device(device),
        "dtype": str(dtype).replace("torch.", ""),
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
# `modification bench`
# --------------------------------------------------------------------------------------------------------------------

BENCH_FILENAME = "bench.json"
BENCH_PLOT_FILENAME = "bench.png"


def _lengths(text: str) -> list[int]:
    import argparse

    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def add_bench_parser(sub) -> None:
    """Register `modification bench`."""
    p = sub.add_parser("bench", help="prefill latency, decode tokens/s, KV bytes and peak memory, MoD vs base")
    p.add_argument("--model", required=True, help="MoD checkpoint: folder or Hub id")
    p.add_argument("--base", default=None,
                   help="base model (folder, Hub id, or a name fetched with `modification fetch-base`); default: the "
                        "checkpoint's base_model_name_or_path if local")
    p.add_argument("--lengths", type=_lengths, default=[1024, 4096], help="prefill context lengths (default 1024,4096)")
    p.add_argument("--repetitions", type=int, default=5, help="timed repetitions per measurement, after one warm-up")
    p.add_argument("--decode-batch-sizes", type=_lengths, default=[1, 4],
                   help="decode batch sizes (default 1,4; empty string: no decode benchmark)")
    p.add_argument("--decode-tokens", type=int, default=32, help="new tokens per decode run (default 32)")
    p.add_argument("--decode-prompt-length", type=int, default=256, help="prompt length before decoding (default 256)")
    add_data_arguments(p, required=False, default_split="test")  # prompts from text; default random token ids
    p.add_argument("--target-executed-fraction", type=float, default=None,
                   help="calibrate thresholds on each prompt to this executed fraction first (speed at a chosen "
                        "budget, e.g. for random-weight models); the results JSON is then left alone")
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu or cuda")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="auto: bfloat16 on CUDA, float32 on CPU")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads for torch (default: torch's choice); on a machine shared with other jobs, 1 "
                        "avoids threads waiting on each other, which can slow small models several times")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="folder for bench.json, bench.png and results.json (default: the "
                                               "checkpoint folder if local, else ./<org--name>)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_bench)


def latency_rows(bench: dict) -> list[dict]:
    """Results-schema `efficiency.latency` rows from a `run_benchmark` result."""
    return [{
        "context_length": row["length"],
        "prefill_latency_ratio": row["latency_ratio"],
        "ideal_latency_ratio": row["ideal_latency_ratio"],
        "kv_ratio": row["kv_ratio"],
        "peak_memory_ratio": row.get("peak_memory_ratio"),
        "prefill_latency_ratio_iqr": row["latency_ratio_paired"]["iqr"],
        "executed_fraction": row["executed_fraction"],
        "mod_prefill_seconds": row["mod_seconds"]["median"],
        "base_prefill_seconds": row["base_seconds"]["median"],
    } for row in bench["prefill"]]


def decode_rows(bench: dict) -> list[dict]:
    """Results-schema `efficiency.decode` rows from a `run_benchmark` result."""
    return [{
        "batch_size": row["batch_size"],
        "throughput_ratio": row["throughput_ratio"],
        "ideal_throughput_ratio": row["ideal_throughput_ratio"],
        "mod_tokens_per_second": row["mod_tokens_per_second"]["median"],
        "base_tokens_per_second": row["base_tokens_per_second"]["median"],
        "prompt_length": row["prompt_length"],
        "new_tokens": row["new_tokens"],
        "kv_ratio": row["kv_ratio"],
        "peak_memory_ratio": row.get("peak_memory_ratio"),
    } for row in bench["decode"]]


def cmd_bench(args) -> dict:
    """Run `modification bench`: benchmark, write bench.json + bench.png, merge into the results JSON."""
    import json
    from pathlib import Path

    from .evaluation import (
        command_line, data_label, default_output_dir, load_models, load_tokenizer, pick_device, pick_dtype,
        tokenize_texts,
    )
    from .plots import plot_bench
    from .results import RESULTS_FILENAME, update_results

    if not args.lengths:
        raise ValueError("--lengths needs at least one context length")
    if args.repetitions < 1 or args.decode_tokens < 1 or args.decode_prompt_length < 1:
        raise ValueError("--repetitions, --decode-tokens and --decode-prompt-length must be positive")
    if args.threads is not None:
        if args.threads < 1:
            raise ValueError("--threads must be at least 1")
        torch.set_num_threads(args.threads)  # recorded in the hardware section as torch_threads
    texts = None
    if args.data:
        texts = [t for source in args.data for t in load_texts(source, args.text_field, args.split, args.data_config)]
    device = pick_device(args.device)
    dtype = pick_dtype(args.dtype, device)
    mod, folder, base, base_name = load_models(args.model, args.base, device, dtype)
    if base is None:
        raise ValueError("bench compares against the base model: give --base (a folder or a cached Hub id)")
    prompt_ids = None
    if texts is not None:
        needed = max(max(args.lengths), args.decode_prompt_length)
        prompt_ids = tokenize_texts(load_tokenizer(folder, base_name), texts, max_tokens=None)
        if prompt_ids.numel() < needed:
            raise ValueError(f"{args.data} has {prompt_ids.numel()} tokens; the benchmark needs {needed}")
    bench = run_benchmark(
        mod, base, args.lengths, repetitions=args.repetitions, decode_batch_sizes=tuple(args.decode_batch_sizes),
        decode_tokens=args.decode_tokens, decode_prompt_len=args.decode_prompt_length, seed=args.seed,
        progress=not args.no_progress, target_executed_fraction=args.target_executed_fraction, prompt_ids=prompt_ids,
    )
    out_dir = Path(args.out) if args.out else default_output_dir(args.model, folder)
    out_dir.mkdir(parents=True, exist_ok=True)
    command = command_line(args)
    record = {
        "command": command, "model": args.model, "base": base_name,
        "prompts": ", ".join(data_label(d, args.split, args.data_config) for d in args.data) if args.data
        else "random token ids",
        "target_executed_fraction": args.target_executed_fraction, **bench,
    }
    (out_dir / BENCH_FILENAME).write_text(json.dumps(record, indent=2) + "\n")
    plot_bench(bench, out_dir / BENCH_PLOT_FILENAME, title=f"{Path(args.model.rstrip('/')).name} / base, "
               f"{bench['setup']['device']} ({bench['setup']['dtype']})")
    for row in bench["prefill"]:
        print(f"prefill {row['length']:6d}: latency ratio {row['latency_ratio']:.3f} "
              f"(ideal {row['ideal_latency_ratio']:.3f}), KV ratio {row['kv_ratio']:.3f}, "
              f"executed fraction {row['executed_fraction']:.3f}")
    for row in bench["decode"]:
        print(f"decode batch {row['batch_size']}: throughput ratio {row['throughput_ratio']:.3f} "
              f"(ideal {row['ideal_throughput_ratio']:.3f}), KV ratio {row['kv_ratio']:.3f}")
    print(f"wrote {out_dir / BENCH_FILENAME} and {out_dir / BENCH_PLOT_FILENAME}")
    if args.target_executed_fraction is not None:
        print("thresholds were recalibrated for this benchmark: the results JSON was not updated")
        return record
    efficiency = {"latency": latency_rows(bench), "hardware": dict(bench["setup"])}
    if bench["decode"]:
        efficiency["decode"] = decode_rows(bench)
    update_results(out_dir / RESULTS_FILENAME, mod.config, args.model, base_name, command, efficiency=efficiency)
    print(f"wrote {out_dir / RESULTS_FILENAME}")
    return record
