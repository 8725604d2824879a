"""Print the README tables (markdown) from a checkpoint's results JSON written by `modification eval` and `bench`.

    modification eval  --model llama-3.2-1b-mod --data wiki.test.txt --context-lengths 512,2048
    modification bench --model llama-3.2-1b-mod --lengths 1024,2048,4096 --repetitions 7
    python benchmarks/results_table.py llama-3.2-1b-mod/results.json
"""

import argparse

from modification.conversion.results import load_results


def _num(value, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _print_table(header: str, align: str, rows: list[list[str]]) -> None:
    """A markdown table: `header` "a | b | c", `align` one of "-" (left) or ":" (right) per column."""
    print(f"| {header} |")
    print("| " + " | ".join("---" if a == "-" else "---:" for a in align) + " |")
    for row in rows:
        print("| " + " | ".join(row) + " |")
    print()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", help="results.json or the folder holding it")
    results = load_results(parser.parse_args().results)
    quality, efficiency = results.get("quality", {}), results.get("efficiency", {})
    if quality.get("perplexity"):
        _print_table("data | context | tokens | perplexity MoD | perplexity base | KV fraction | FLOP fraction",
                     "-::::::", [
                         [row["dataset"], str(row["context_length"]), str(row.get("tokens", "")), _num(row["mod"]),
                          _num(row["base"]), _num(row.get("kv_fraction")), _num(row.get("flop_fraction"))]
                         for row in quality["perplexity"]])
    if quality.get("lookup"):
        _print_table("data | distance | look-up accuracy MoD | base | loss MoD | base", "-:::::", [
            [row["dataset"], str(row["distance"]), _num(row["mod"]["accuracy"]),
             _num((row["base"] or {}).get("accuracy")), _num(row["mod"]["loss"]), _num((row["base"] or {}).get("loss"))]
            for row in quality["lookup"]])
    if quality.get("tasks"):
        _print_table("task | metric | MoD | base", "--::", [
            [row["task"], row["metric"], _num(row["mod"], 4), _num(row["base"], 4)] for row in quality["tasks"]])
    if efficiency.get("latency"):
        hw = efficiency.get("hardware", {})
        print(f"Hardware: {hw.get('device')} ({hw.get('device_type')}, {hw.get('dtype')}, "
              f"{hw.get('torch_threads')} threads), median of {hw.get('repetitions')} alternating runs.")
        print()

        def spread(row: dict) -> str:
            iqr = row.get("prefill_latency_ratio_iqr")
            return f" (IQR {iqr:.3f})" if iqr is not None else ""

        _print_table("context | prefill time MoD/base | FLOP fraction (ideal) | KV fraction | peak memory MoD/base",
                     ":::::", [
                         [str(row["context_length"]), _num(row["prefill_latency_ratio"]) + spread(row),
                          _num(row["flop_fraction"]), _num(row.get("kv_fraction")), _num(row.get("peak_memory_ratio"))]
                         for row in efficiency["latency"]])
    if efficiency.get("decode"):
        _print_table("decode batch | tokens/s MoD/base | ideal (1 / FLOP fraction) | KV fraction", "::::", [
            [str(row["batch_size"]), _num(row["throughput_ratio"]),
             _num(1 / row["flop_fraction"] if row.get("flop_fraction") else None), _num(row.get("kv_fraction"))]
            for row in efficiency["decode"]])
    print("Commands: " + "; ".join(f"`{c}`" for c in results.get("commands", [])))


if __name__ == "__main__":
    main()
