"""`benchmarks/long_context_speed.py --quick` on a tiny base: the script calls the library (no patching), runs both
granularities at the same KV fraction, and reports each ratio next to its FLOP ideal and the K/V bytes of the caches.
Speed itself is measured by the full script on a quiet machine, not here."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch
from helpers import tiny_base, tiny_tokenizer
from test_evaluation import _png_ok

from modification.conversion.convert import mod_config_from_base
from modification.evaluation.benchmark import decode_flop_fraction
from modification.modeling.configuration_mod import RoutingPlan

ROOT = Path(__file__).resolve().parent.parent


def _script():
    spec = importlib.util.spec_from_file_location("benchmark_long_context_speed",
                                                  ROOT / "benchmarks" / "long_context_speed.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_quick_run_reports_both_granularities_at_one_kv_fraction(tmp_path, capsys):
    base = tmp_path / "base"
    tiny_base("llama", num_layers=8).save_pretrained(base)
    tiny_tokenizer().save_pretrained(base)
    out = tmp_path / "speed.json"
    threads = torch.get_num_threads()
    try:
        result = _script().main(["--base", str(base), "--quick", "--threads", "1", "--out", str(out)])
    finally:
        torch.set_num_threads(threads)
    assert json.loads(out.read_text()) == result
    _png_ok(out.with_suffix(".png"))
    assert result["quick"] and result["kv_fraction"] == 0.7 and result["routed_layers"] == [2, 3, 4, 5, 6]
    assert result["command"].startswith("python benchmarks/long_context_speed.py") and str(tmp_path) not in \
        result["command"]  # a committed file names no path of this machine
    assert set(result["variants"]) == {"attention", "block"}
    flops = {}
    for granularity, bench in result["variants"].items():
        config = mod_config_from_base(tiny_base("llama", num_layers=8).config, routed_layers=[2, 3, 4, 5, 6],
                                      routing_granularity=granularity)
        assert [row["length"] for row in bench["prefill"]] == [128, 256]
        assert [(row["batch_size"], row["prompt_length"], row["new_tokens"]) for row in bench["decode"]] == [
            (1, 128, 4), (4, 128, 4)]
        for row in bench["prefill"]:
            routed = row["routed_fraction_per_layer"]
            plan = RoutingPlan.from_config(config, [routed[j] for j in config.routed_layers])
            # calibrated on the timed prompt: the budget asked for, which the cache holds to the byte
            assert row["kv_fraction"] == pytest.approx(0.7, abs=0.01)
            assert row["kv_fraction"] == pytest.approx(plan.kv_fraction()) == row["mod_kv_bytes"] / row["base_kv_bytes"]
            assert row["flop_fraction"] == pytest.approx(plan.flop_fraction(config, row["length"]), rel=1e-12)
            assert row["latency_ratio"] > 0
            flops[granularity, row["length"]] = row["flop_fraction"]
        for row in bench["decode"]:
            routed = row["routed_fraction_per_layer"]
            plan = RoutingPlan.from_config(config, [routed[j] for j in config.routed_layers])
            assert row["flop_fraction"] == pytest.approx(decode_flop_fraction(plan, config, 128, 4), rel=1e-12)
            assert row["throughput_ratio"] > 0 and 0 < row["kv_fraction"] < 1
    # at equal KV, a token that skips only attention still runs the MLP: more FLOPs than skipping the block
    for length in (128, 256):
        assert flops["block", length] < flops["attention", length] < 1.0
    summary = {(row["variant"], row["measure"]) for row in result["summary"]}
    assert ("attention", "prefill 256 tokens") in summary and ("block", "decode tokens/s, batch 4 after 128") in summary
    printed = capsys.readouterr().out
    assert "attention prefill 128 tokens" in printed and f"wrote {out}" in printed
