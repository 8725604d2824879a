"""`modification bench`: prefill latency, decode tokens/s, KV bytes and (CUDA) peak memory of a MoD checkpoint against
its base, alternating runs in one process, next to the FLOP fraction (the ideal) and the KV fraction measured from the
caches (`benchmark_checkpoint`, described in `evaluation/benchmark.py`)."""

from __future__ import annotations

from modification.evaluation.settings import BenchSettings

HELP = "prefill latency, decode tokens/s, KV bytes and peak memory, MoD vs base, next to the FLOP fraction"
SETTINGS = BenchSettings


def run(settings: BenchSettings) -> dict:
    from modification.evaluation.benchmark import BENCH_FILENAME, BENCH_PLOT_FILENAME, benchmark_checkpoint

    record = benchmark_checkpoint(settings)
    for row in record["prefill"]:
        print(f"prefill {row['length']:6d}: latency ratio {row['latency_ratio']:.3f} "
              f"(FLOP fraction {row['flop_fraction']:.3f}), KV fraction {row['kv_fraction']:.3f} "
              f"({row['mod_kv_bytes']} / {row['base_kv_bytes']} bytes)")
    for row in record["decode"]:
        print(f"decode batch {row['batch_size']} after {row['prompt_length']} tokens: throughput ratio "
              f"{row['throughput_ratio']:.3f} (ideal {1 / row['flop_fraction']:.3f} = 1 / FLOP fraction), "
              f"KV fraction {row['kv_fraction']:.3f}")
    out = record["out"]
    print(f"wrote {out}/{BENCH_FILENAME} and {out}/{BENCH_PLOT_FILENAME}")
    if settings.kv_fraction is not None:
        print("thresholds were recalibrated for this benchmark: the results JSON was not updated")
    else:
        print(f"wrote {out}/results.json")
    return record
