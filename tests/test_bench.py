"""`modification bench` on a tiny model: every field of the JSON, sane values, the plot and the results JSON.
This checks the measurement plumbing, not speed (benchmarks are scripts, see benchmarks/)."""

import json
import shlex

import pytest
import torch
from helpers import routed_model, save_base
from test_evaluation import _png_ok, _routed_checkpoint, _write_text

from modification.cli.main import build_parser
from modification.cli.main import main as cli
from modification.cli.options import settings_from_args
from modification.conversion.checkpoint import read_mod_config
from modification.conversion.local_paths import public_command
from modification.conversion.results import load_results
from modification.evaluation.benchmark import decode_flop_fraction
from modification.evaluation.settings import BenchSettings
from modification.modeling.configuration_mod import RoutingPlan


def _positive_summary(summary: dict) -> None:
    assert set(summary) >= {"median", "min", "max", "iqr", "q1", "q3", "samples"}
    assert 0 < summary["min"] <= summary["q1"] <= summary["median"] <= summary["q3"] <= summary["max"]
    assert summary["iqr"] == pytest.approx(summary["q3"] - summary["q1"])


@pytest.mark.parametrize("with_text", [False, True])
def test_bench_json_has_every_field_with_sane_values(tmp_path, capsys, with_text):
    base_dir = save_base("llama", tmp_path / "base")
    ck = _routed_checkpoint(tmp_path / "mod")
    out = tmp_path / "out"
    argv = ["bench", "--model", str(ck), "--base", str(base_dir), "--lengths", "24,48", "--repetitions", "3",
            "--decode-batch-sizes", "1,2", "--decode-tokens", "3", "--decode-prompt-length", "16", "--out", str(out),
            "--no-progress"]
    if with_text:
        argv += ["--data", str(_write_text(tmp_path / "text.txt", 120)), "--threads", "1"]
    threads = torch.get_num_threads()
    try:
        assert cli(argv) == 0
    finally:
        torch.set_num_threads(threads)
    bench = json.loads((out / "bench.json").read_text())
    # the command recorded is the settings as flags: it gives back the settings that ran
    ran = settings_from_args(BenchSettings, build_parser().parse_args(argv))
    assert bench["command"] == ran.command_line()
    assert settings_from_args(BenchSettings, build_parser().parse_args(shlex.split(bench["command"])[1:])) == ran
    assert bench["prompts"] == ("text.txt" if with_text else "random token ids")
    setup = bench["setup"]
    for key in ("device", "device_type", "dtype", "torch_threads", "torch_version", "repetitions",
                "mod_attention_backend", "base_attn_implementation", "prompts", "peak_memory"):
        assert key in setup, key
    assert setup["device_type"] == "cpu" and setup["dtype"] == "float32" and setup["repetitions"] == 3
    assert setup["torch_threads"] == (1 if with_text else threads)

    config = read_mod_config(ck)
    assert [row["length"] for row in bench["prefill"]] == [24, 48]
    for row in bench["prefill"]:
        _positive_summary(row["mod_seconds"])
        _positive_summary(row["base_seconds"])
        assert len(row["mod_seconds"]["samples"]) == 3
        assert row["latency_ratio"] == pytest.approx(row["mod_seconds"]["median"] / row["base_seconds"]["median"])
        assert row["latency_ratio_paired"]["min"] <= row["latency_ratio_paired"]["median"]
        routed = row["routed_fraction_per_layer"]
        assert len(routed) == 4 and routed[0] == routed[2] == 1.0 and min(routed) < 1.0
        # The ideal is the FLOP fraction of the plan the model ran: RoutingPlan's, with the measured routed shares.
        plan = RoutingPlan.from_config(config, [routed[j] for j in config.routed_layers])
        assert row["flop_fraction"] == pytest.approx(plan.flop_fraction(config, row["length"]), rel=1e-12)
        assert 0.5 < row["flop_fraction"] < 1.0
        # The MoD cache holds exactly the tokens that ran each layer; the base cache every token in every layer.
        assert row["base_kv_bytes"] == 2 * 4 * row["length"] * 2 * 16 * 4  # layers, tokens, kv heads, head dim, fp32
        assert row["kv_fraction"] == pytest.approx(plan.kv_fraction()) == pytest.approx(
            row["mod_kv_bytes"] / row["base_kv_bytes"])
        assert not {"executed_fraction", "kv_ratio", "ideal_latency_ratio", "ideal_kv_ratio"} & set(row)
        assert "peak_memory_ratio" not in row  # measured on CUDA only

    assert [row["batch_size"] for row in bench["decode"]] == [1, 2]
    for row in bench["decode"]:
        _positive_summary(row["mod_tokens_per_second"])
        _positive_summary(row["base_tokens_per_second"])
        routed = row["routed_fraction_per_layer"]  # over the decoded tokens
        assert row["throughput_ratio"] > 0 and routed[0] == routed[2] == 1.0  # 2 of 4 layers always run
        plan = RoutingPlan.from_config(config, [routed[j] for j in config.routed_layers])
        assert row["flop_fraction"] == pytest.approx(decode_flop_fraction(plan, config, 16, 3), rel=1e-12)
        assert 0.5 <= row["flop_fraction"] <= 1.0
        assert row["base_kv_bytes"] == 2 * 4 * row["batch_size"] * (16 + 3) * 2 * 16 * 4
        assert 0 < row["mod_kv_bytes"] < row["base_kv_bytes"] and row["kv_fraction"] < 1.0

    _png_ok(out / "bench.png")
    results = load_results(out)
    efficiency = results["efficiency"]
    assert [r["context_length"] for r in efficiency["latency"]] == [24, 48]
    assert efficiency["latency"][0]["prefill_latency_ratio"] == bench["prefill"][0]["latency_ratio"]
    assert [r["flop_fraction"] for r in efficiency["latency"]] == [r["flop_fraction"] for r in bench["prefill"]]
    assert [r["kv_fraction"] for r in efficiency["decode"]] == [r["kv_fraction"] for r in bench["decode"]]
    assert [r["batch_size"] for r in efficiency["decode"]] == [1, 2]
    assert efficiency["hardware"]["device_type"] == "cpu"
    # bench.json stays here and keeps the command as run; results.json is published and names no local path
    assert results["commands"] == [public_command(bench["command"])] and str(tmp_path) not in results["commands"][0]
    assert "latency ratio" in capsys.readouterr().out


def test_bench_needs_a_base_and_enough_text(tmp_path, capsys):
    ck = _routed_checkpoint(tmp_path / "mod")  # no base_model_name_or_path
    assert cli(["bench", "--model", str(ck), "--lengths", "16", "--out", str(tmp_path / "o")]) == 2
    assert "give --base" in capsys.readouterr().err
    base_dir = save_base("llama", tmp_path / "base")
    short = tmp_path / "short.txt"
    short.write_text("w1 w2 w3")
    assert cli(["bench", "--model", str(ck), "--base", str(base_dir), "--lengths", "16", "--data", str(short),
                "--out", str(tmp_path / "o")]) == 2
    assert "the benchmark needs 256" in capsys.readouterr().err


def test_decode_flop_fraction_is_the_prefill_count_of_the_decoded_tokens():
    """Decoding n tokens after a prompt of P costs what a prefill of P + n costs more than one of P: for a dense model
    the fraction is 1, and for a plan the count of one token is the sum of its parts (projections and MLP by the routed
    share, attention over the kept keys)."""
    config = routed_model("llama").config
    dense = RoutingPlan.from_config(config, 1.0)
    assert decode_flop_fraction(dense, config, 100, 7) == 1.0
    plan = RoutingPlan.from_config(config, [0.5, 0.25])
    one = decode_flop_fraction(plan, config, 99, 1)  # the token at position 99 (100 keys)
    h, d, n_q, n_kv, m = config.hidden_size, config.head_dim, config.num_attention_heads, config.num_key_value_heads, \
        config.intermediate_size
    per_layer = lambda r: r * 2 * h * d * (2 * n_q + 2 * n_kv) + r * r * 2 * n_q * d * 2 * 100 + r * 6 * h * m  # noqa
    head = 2 * h * config.vocab_size
    expected = (2 * per_layer(1.0) + per_layer(0.5) + per_layer(0.25) + head) / (4 * per_layer(1.0) + head)
    assert one == pytest.approx(expected, rel=1e-12)
    # attention, r^2 of it kept, weighs more as the context grows: a later token saves more
    assert decode_flop_fraction(plan, config, 4095, 1) < decode_flop_fraction(plan, config, 1024, 8) < one


def test_bench_refuses_a_bad_kv_fraction_and_the_old_name(tmp_path, capsys):
    base_dir = save_base("llama", tmp_path / "base")
    ck = _routed_checkpoint(tmp_path / "mod")
    common = ["bench", "--model", str(ck), "--base", str(base_dir), "--out", str(tmp_path / "o"), "--no-progress"]
    assert cli([*common, "--lengths", "16", "--kv-fraction", "1.5"]) == 2
    assert "bench: kv_fraction must lie in (0, 1], got 1.5" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # the old name is gone
        cli([*common, "--lengths", "16", "--executed-fraction", "0.5"])
    assert "unrecognized arguments: --executed-fraction" in capsys.readouterr().err
