"""Speed at long context (issue 18, item 6): prefill time at 2k, 4k and 8k tokens and decode throughput after a 4k
prompt at batch 1 and 4, MoD against its base, for both routing granularities at KV fraction 0.7, next to the FLOP
ideal and the KV bytes measured from the caches.

The base (default: SmolLM2-135M-Instruct as `modification fetch-base smollm2-135m-instruct` caches it) is converted
once per granularity, every layer but the first two and the last routed: "attention" (a skipped token skips the
attention sub-layer, writes no K/V and still runs the MLP) and "block" (it skips the whole layer). The routers get
random weights (seeded): speed depends on how many tokens run each layer, not on which, and `run_benchmark` calibrates
the thresholds on each timed prompt to the KV fraction, so both variants run the same budget on every prompt. Base
and MoD alternate in one process (`evaluation/benchmark.py`); each row carries the measured ratio, its FLOP fraction
(`MoDConfig.prefill_flops` with the measured share of each routed layer: the ideal latency ratio, and 1 / it the
ideal decode throughput ratio) and the K/V bytes of both caches. Writes benchmarks/results/long_context_speed.json and
docs/long_context_speed.png.

    python benchmarks/long_context_speed.py                  # the full run: alone on a quiet machine, CUDA if present
    python benchmarks/long_context_speed.py --quick          # a short check of the whole path (written to a temp dir)
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import tempfile
from pathlib import Path

import torch

from modification.conversion.atomic import atomic_write_text
from modification.conversion.bases import DEFAULT_BASE, base_path
from modification.conversion.checkpoint import fastest_attn_implementation
from modification.conversion.convert import convert_model
from modification.conversion.local_paths import public_command, public_name
from modification.evaluation.benchmark import describe_device, run_benchmark
from modification.evaluation.loading import pick_device, pick_dtype
from modification.evaluation.plots import plot_long_context_speed

ROOT = Path(__file__).resolve().parent.parent
GRANULARITIES = ("attention", "block")
# What --quick changes: short prompts, few tokens, one timed repetition; minutes on a CPU with the real base.
QUICK = {"lengths": "128,256", "decode_prompt_length": 128, "decode_tokens": 4, "repetitions": 1}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", default=DEFAULT_BASE, help="a fetched base's name, or a Llama-family folder "
                                                        "(default %(default)s)")
    p.add_argument("--kv-fraction", type=float, default=0.7, help="the budget both variants run (default %(default)s)")
    p.add_argument("--granularities", default=",".join(GRANULARITIES), help="default %(default)s")
    p.add_argument("--lengths", default="2048,4096,8192", help="prefill prompt lengths (default %(default)s)")
    p.add_argument("--decode-prompt-length", type=int, default=4096, help="default %(default)s")
    p.add_argument("--decode-batch-sizes", default="1,4", help="default %(default)s")
    p.add_argument("--decode-tokens", type=int, default=32, help="new tokens per decode run (default %(default)s)")
    p.add_argument("--repetitions", type=int, default=5, help="timed runs of each, after a warm-up (default "
                                                             "%(default)s)")
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu or cuda")
    p.add_argument("--dtype", default="auto", help="auto: bfloat16 on CUDA, float32 on CPU")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's)")
    p.add_argument("--seed", type=int, default=0, help="seed of the router weights and the prompts")
    p.add_argument("--quick", action="store_true", help="short prompts and one repetition: checks the path, "
                                                       f"measures nothing worth reporting ({QUICK})")
    p.add_argument("--out", default=None, help="JSON (default benchmarks/results/long_context_speed.json; with "
                                               "--quick a temp folder)")
    p.add_argument("--plot", default=None, help="PNG (default docs/long_context_speed.png; with --quick next to the "
                                                "JSON)")
    args = p.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # as run, for the record
    if args.quick:
        for key, value in QUICK.items():
            setattr(args, key, value)
    if not 0.0 < args.kv_fraction <= 1.0:
        p.error(f"--kv-fraction must lie in (0, 1], got {args.kv_fraction}")
    args.granularities = [g.strip() for g in args.granularities.split(",") if g.strip()]
    if not args.granularities or set(args.granularities) - set(GRANULARITIES):
        p.error(f"--granularities takes {', '.join(GRANULARITIES)}, got {args.granularities}")
    args.lengths = [int(x) for x in args.lengths.split(",")]
    args.decode_batch_sizes = [int(x) for x in args.decode_batch_sizes.split(",") if x.strip()]
    quick_dir = Path(tempfile.gettempdir()) / "long_context_speed-quick"
    args.out = Path(args.out or (quick_dir / "long_context_speed.json" if args.quick
                                 else ROOT / "benchmarks/results/long_context_speed.json"))
    args.plot = Path(args.plot or (args.out.with_suffix(".png") if args.quick
                                   else ROOT / "docs/long_context_speed.png"))
    return args


def routed_layers(num_layers: int) -> list[int]:
    """Every layer but the first two and the last: the layers the issue routes."""
    return list(range(2, num_layers - 1))


def randomize_routers(model: torch.nn.Module, seed: int) -> None:
    """Random router weights, logits about N(0, 1) on the routers' unit-RMS features: the calibration then has tokens
    to rank (at conversion every router gives every token the same logit)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in model.model.layers:
            if layer.has_router:
                weight = torch.randn(layer.router.weight.shape, generator=gen) / layer.router.weight.shape[-1] ** 0.5
                layer.router.weight.copy_(weight)
                layer.router.bias.zero_()


def summary_rows(name: str, bench: dict) -> list[dict]:
    """The numbers to read, one row per measurement: the ratio MoD / base, its ideal and the K/V bytes."""
    rows = [{"variant": name, "measure": f"prefill {row['length']} tokens", "ratio": row["latency_ratio"],
             "ideal": row["flop_fraction"], "kv_fraction": row["kv_fraction"], "mod_kv_bytes": row["mod_kv_bytes"],
             "base_kv_bytes": row["base_kv_bytes"]} for row in bench["prefill"]]
    rows += [{"variant": name, "measure": f"decode tokens/s, batch {row['batch_size']} after {row['prompt_length']}",
              "ratio": row["throughput_ratio"], "ideal": 1.0 / row["flop_fraction"], "kv_fraction": row["kv_fraction"],
              "mod_kv_bytes": row["mod_kv_bytes"], "base_kv_bytes": row["base_kv_bytes"]} for row in bench["decode"]]
    return rows


def run(args: argparse.Namespace) -> dict:
    from transformers import AutoModelForCausalLM

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    dtype = pick_dtype(args.dtype, device)
    folder = base_path(args.base)
    base = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).to(device).eval()
    layers = routed_layers(base.config.num_hidden_layers)
    variants = {}
    for granularity in args.granularities:
        mod = convert_model(base, router_kind="threshold", routed_layers=layers, routing_granularity=granularity)
        randomize_routers(mod, args.seed)
        mod = mod.to(device).eval()
        mod.set_attn_implementation(fastest_attn_implementation(device))
        variants[granularity] = run_benchmark(
            mod, base, args.lengths, repetitions=args.repetitions, decode_batch_sizes=tuple(args.decode_batch_sizes),
            decode_tokens=args.decode_tokens, decode_prompt_len=args.decode_prompt_length, seed=args.seed,
            progress=False, kv_fraction=args.kv_fraction)
        del mod
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return {
        "command": public_command(shlex.join(["python", "benchmarks/long_context_speed.py", *args.argv])),
        "quick": args.quick,
        "base": public_name(str(folder)),
        "kv_fraction": args.kv_fraction,
        "routed_layers": layers,
        "routers": "random weights (seeded), thresholds calibrated on each timed prompt to the KV fraction",
        "setup": {**describe_device(device), "dtype": str(dtype).replace("torch.", "")},
        "summary": [row for name, bench in variants.items() for row in summary_rows(name, bench)],
        "variants": variants,
    }


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    result = run(args)
    atomic_write_text(args.out, json.dumps(result, indent=2) + "\n")
    setup = result["setup"]
    plot_long_context_speed(result["variants"], args.plot, title=(
        f"{result['base']} at KV fraction {args.kv_fraction}, routers random: MoD / base on {setup['device']} "
        f"({setup['dtype']})" + (" [--quick: not a measurement]" if args.quick else "")))
    for row in result["summary"]:
        print(f"{row['variant']:9s} {row['measure']:38s} MoD/base {row['ratio']:.3f} (ideal {row['ideal']:.3f})  "
              f"KV {row['mod_kv_bytes']} / {row['base_kv_bytes']} bytes = {row['kv_fraction']:.3f}")
    print(f"wrote {args.out} and {args.plot}")
    return result


if __name__ == "__main__":
    main()
