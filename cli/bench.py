"""`modification bench`: prefill latency, decode tokens/s, KV bytes and (CUDA) peak memory of a MoD checkpoint against
its base, alternating runs in one process (`benchmark_checkpoint`, described in `evaluation/benchmark.py`)."""

from __future__ import annotations

import argparse

from .options import (
    add_base_argument, add_device_arguments, add_model_argument, add_out_argument, add_progress_argument,
    add_settings_arguments, command_line, settings_from_args,
)


def register(sub) -> None:
    from modification.evaluation.settings import BenchSettings

    p = sub.add_parser("bench", help="prefill latency, decode tokens/s, KV bytes and peak memory, MoD vs base",
                       description=__doc__)
    add_model_argument(p)
    add_base_argument(p)
    add_settings_arguments(p, BenchSettings, "benchmark")
    add_device_arguments(p)
    add_out_argument(p, required=False, help="folder for bench.json, bench.png and results.json (default: the "
                                             "checkpoint folder if local, else ./<org--name>)")
    add_progress_argument(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> dict:
    from modification.evaluation.benchmark import BENCH_FILENAME, BENCH_PLOT_FILENAME, benchmark_checkpoint
    from modification.evaluation.settings import BenchSettings

    settings = settings_from_args(BenchSettings, args)
    record = benchmark_checkpoint(args.model, settings, base=args.base, device=args.device, dtype=args.dtype,
                                  out=args.out, command=command_line(args), progress=not args.no_progress)
    for row in record["prefill"]:
        print(f"prefill {row['length']:6d}: latency ratio {row['latency_ratio']:.3f} "
              f"(ideal {row['ideal_latency_ratio']:.3f}), KV ratio {row['kv_ratio']:.3f}, "
              f"executed fraction {row['executed_fraction']:.3f}")
    for row in record["decode"]:
        print(f"decode batch {row['batch_size']}: throughput ratio {row['throughput_ratio']:.3f} "
              f"(ideal {row['ideal_throughput_ratio']:.3f}), KV ratio {row['kv_ratio']:.3f}")
    out = record["out"]
    print(f"wrote {out}/{BENCH_FILENAME} and {out}/{BENCH_PLOT_FILENAME}")
    if settings.executed_fraction is not None:
        print("thresholds were recalibrated for this benchmark: the results JSON was not updated")
    else:
        print(f"wrote {out}/results.json")
    return record
