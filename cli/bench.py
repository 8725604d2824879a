"""`modification bench`: prefill latency, decode tokens/s, KV bytes and (CUDA) peak memory of a MoD checkpoint against
its base, alternating runs in one process (`benchmark_checkpoint`, described in `evaluation/benchmark.py`)."""

from __future__ import annotations

from modification.evaluation.settings import BenchSettings


HELP = "prefill latency, decode tokens/s, KV bytes and peak memory, MoD vs base"
SETTINGS = BenchSettings


def run(settings: BenchSettings) -> dict:
    from modification.evaluation.benchmark import BENCH_FILENAME, BENCH_PLOT_FILENAME, benchmark_checkpoint

    record = benchmark_checkpoint(settings)
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
