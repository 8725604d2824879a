"""Prefill speed of a small random-weight MoD model vs its dense base on this CPU (issue: MoD core).

A Llama-architecture model (random weights are fine for speed) is converted, its routers get random weights and are
calibrated on each prompt so that half the tokens skip each routed layer (every other layer: KV fraction
~0.75), then prefill at 1k and 2k tokens is timed against (a) the stock transformers LlamaForCausalLM and (b) the same
MoD code run dense, in alternating repetitions. Writes JSON (default benchmarks/results/prefill_cpu.json).

    python benchmarks/prefill_cpu.py --lengths 1024,2048 --repetitions 7
"""

import argparse
import json
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from modification.conversion.atomic import atomic_write_text
from modification.conversion.convert import convert_model
from modification.evaluation.benchmark import run_benchmark


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", default="1024,2048")
    parser.add_argument("--repetitions", type=int, default=7)
    parser.add_argument("--routed-fraction", type=float, default=0.5, help="share of tokens run by routed layers")
    parser.add_argument("--hidden-size", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--out", default="benchmarks/results/prefill_cpu.json")
    args = parser.parse_args()
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=8000, hidden_size=args.hidden_size, intermediate_size=int(args.hidden_size * 2.75),
        num_hidden_layers=args.layers, num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=8192,
    )
    base = LlamaForCausalLM(config).eval()
    dense = convert_model(base, router_kind="dense")
    mod = convert_model(base)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for layer in mod.model.layers:
            if hasattr(layer, "router"):
                weight = torch.randn(layer.router.weight.shape, generator=gen) / config.hidden_size**0.5
                layer.router.weight.copy_(weight)
    n_layers, n_routed = config.num_hidden_layers, len(mod.config.routed_layers)
    target = (n_layers - n_routed + n_routed * args.routed_fraction) / n_layers
    lengths = [int(x) for x in args.lengths.split(",")]
    results = {
        "command": "python benchmarks/prefill_cpu.py " + f"--lengths {args.lengths} --repetitions {args.repetitions}",
        "model": {"hidden_size": config.hidden_size, "layers": n_layers, "routed_layers": mod.config.routed_layers,
                  "parameters": sum(p.numel() for p in base.parameters())},
        "vs_transformers_llama": run_benchmark(
            mod, base, lengths, args.repetitions, decode_batch_sizes=(), kv_fraction=target
        ),
        "vs_same_code_dense": run_benchmark(
            mod, dense, lengths, args.repetitions, decode_batch_sizes=(), kv_fraction=target
        ),
    }
    out = atomic_write_text(Path(args.out), json.dumps(results, indent=2) + "\n")
    for name in ("vs_transformers_llama", "vs_same_code_dense"):
        for row in results[name]["prefill"]:
            print(f"{name:22s} len={row['length']:5d} KV fraction={row['kv_fraction']:.3f} "
                  f"latency ratio={row['latency_ratio']:.3f} (FLOP fraction {row['flop_fraction']:.3f})")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
