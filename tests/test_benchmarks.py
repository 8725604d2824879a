"""The seams benchmarks measure through, and the quality curve's main path end to end on a tiny model, so that the
script cannot rot unnoticed: the fit takes measurements made once, the scripts call the library, the tables in
docs/results.md are those of the committed JSON."""

import importlib.util
import json
import re
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from helpers import VOCAB, text_mod_checkpoint, tiny_base

from modification.conversion import fit
from modification.conversion.atomic import atomic_replace_section
from modification.conversion.convert import convert_model
from modification.conversion.fit import LayerMeasurements, fit_routers, measure_layers
from modification.conversion.settings import FitOptions

ROOT = Path(__file__).resolve().parent.parent


def _script(name: str):
    """A benchmark script as a module (benchmarks are scripts, not part of the package)."""
    spec = importlib.util.spec_from_file_location(f"benchmark_{name}", ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the script runs
    spec.loader.exec_module(module)
    return module


def _batches(n: int, seq: int = 40, seed: int = 0) -> list[dict]:
    gen = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(3, VOCAB, (1, seq), generator=gen)} for _ in range(n)]


def _same_fit(a, b) -> None:
    (model_a, record_a), (model_b, record_b) = a, b
    assert {**record_a.__dict__, "seconds": 0} == {**record_b.__dict__, "seconds": 0}
    assert model_a.config.router_threshold == model_b.config.router_threshold
    state_a, state_b = model_a.state_dict(), model_b.state_dict()
    assert state_a.keys() == state_b.keys()
    for key in state_a:
        assert torch.equal(state_a[key], state_b[key]), key


def test_fit_with_measurements_made_once_equals_the_fit_measuring_itself(monkeypatch):
    model = convert_model(tiny_base("llama", num_layers=6), router_kind="threshold")
    calib = _batches(3)
    measured = measure_layers(model, calib, FitOptions(kv_fraction=1.0), progress=False)
    assert len(measured.removal_costs["attention"]) == 6 and sorted(measured.scores) == list(range(6))
    assert measured.dense_lookup is not None and measured.lookup["attention"]
    for target in (0.85, 0.7):
        settings = FitOptions(kv_fraction=target)
        itself = fit_routers(model, calib, settings, progress=False)
        with monkeypatch.context() as patch:  # given every measurement, the fit measures nothing again
            for name in ("layer_removal_costs", "layer_lookup_accuracy", "fisher_scores"):
                patch.setattr(fit, name, lambda *a, name=name, **k: pytest.fail(f"{name} measured again"))
            given = fit_routers(model, calib, settings, progress=False, measured=measured)
        _same_fit(itself, given)
    # only the costs given: the fit measures look-up and scores the layers it needs itself, with the same result
    costs_only = replace(LayerMeasurements.taken_with(settings), removal_costs=measured.removal_costs)
    _same_fit(itself, fit_routers(model, calib, settings, progress=False, measured=costs_only))


def test_given_measurements_steer_the_fit_and_must_match_it():
    model = convert_model(tiny_base("llama", num_layers=6), router_kind="threshold")
    calib = _batches(2)
    measured = measure_layers(model, calib, FitOptions(kv_fraction=1.0), progress=False)
    # make layer 5 by far the cheapest and layer 2 ruinous: the fit must follow the costs it is given
    costs = [1.0, 1.0, 100.0, 1.0, 1.0, 0.0]
    steered = replace(measured, removal_costs={"attention": costs})
    _, record = fit_routers(model, calib, FitOptions(kv_fraction=0.9), progress=False, measured=steered)
    assert 5 in record.routed_layers and 2 not in record.routed_layers
    assert record.removal_cost == {"attention": costs} and record.refused_layers["2"].startswith("ruinous")
    with pytest.raises(ValueError, match="routing_sink_tokens=4, the fit asks for 2"):
        fit_routers(model, calib, FitOptions(kv_fraction=0.9, routing_sink_tokens=2), progress=False,
                    measured=measured)
    with pytest.raises(ValueError, match="6 layer costs, the model has 4 layers"):
        fit_routers(convert_model(tiny_base("llama"), router_kind="threshold"), calib, FitOptions(kv_fraction=0.9),
                    progress=False, measured=measured)


def test_quality_curve_runs_end_to_end_on_a_tiny_model(tmp_path):
    curve, report = _script("quality_curve"), _script("quality_curve_report")
    _, train, held_out = text_mod_checkpoint(tmp_path / "tiny")
    out = tmp_path / "curve.json"
    args = curve.parse_args([
        "--base", str(tmp_path / "tiny" / "base"), "--fractions", "0.8,0.6", "--trained-fractions", "0.8",
        "--steps", "1", "--batch-size", "1", "--train-seq-len", "32", "--train-tokens-per-source", "4000",
        "--blocks", "2", "--seq-len", "64", "--calib-seq-len", "64", "--calib-blocks", "2", "--examples", "3",
        "--threads", "1", "--out", str(out)])
    threads = torch.get_num_threads()
    try:
        result = curve.run(args, tmp_path / "tiny" / "base", {"pydoc": {"train": train, "held_out": held_out}})
    finally:
        torch.set_num_threads(threads)
    assert json.loads(out.read_text()) == result
    assert not result.get("errors") and not result["skipped_for_time"]
    assert result["base"]["pydoc"]["executed_fraction"] == 1.0
    every = {"0.8": curve.VARIANTS, "0.6": ["fitted", "removal", "random"]}
    for f, variants in every.items():
        for variant in variants:
            metrics = result["results"][variant][f]["pydoc"]
            assert metrics["perplexity"] > 1 and metrics["tokens"] == 128 and metrics["examples"] == 3, variant
            assert 0.0 <= metrics["last_word_accuracy"] <= 1.0
            if variant.startswith("removal"):  # whole layers deleted: 4 layers, 1 (0.8) or 2 (0.6) of them
                assert metrics["executed_fraction"] == round(1 - len(result["plans"][f]["removal_dropped_layers"]) / 4,
                                                             4)
            else:  # calibrated on another text: near the target, the sinks always run
                assert abs(metrics["executed_fraction"] - float(f)) < 0.15, (variant, f, metrics)
    for variant in ("lora", "topk", "removal+lora"):
        training = result["training"][variant]["0.8"]
        assert training["seconds"] > 0 and training["log"] and "loss" in training["log"][0]
    assert result["plans"]["0.8"]["chosen_plan"] in {"tokens", "layers", "mixed"}
    assert len(result["layer_removal_cost"]["attention"]) == len(result["shortgpt_cosine"]) == 4
    assert result["plans"]["0.8"]["plan"]["granularity"] and set(result["plans"]["0.8"]["plan"]["granularity"]) == {
        "attention"}

    md = tmp_path / "results.md"
    md.write_text("Written by people.\n\n<!-- begin: quality_curve -->\nold\n<!-- end: quality_curve -->\n\n"
                  "And here.\n")
    tables = report.write_report(result, md, tmp_path / "curve.png")
    text = md.read_text()
    assert text.startswith("Written by people.\n") and text.endswith("\nAnd here.\n") and "old" not in text
    assert tables in text and "### pydoc: perplexity" in tables
    assert f"{result['results']['lora']['0.8']['pydoc']['perplexity']:.2f}" in tables
    assert (tmp_path / "curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _docs_section(name: str) -> str:
    docs = (ROOT / "docs/results.md").read_text()
    section = re.search(rf"<!-- begin: {name} -->\n(.*?)\n<!-- end: {name} -->", docs, re.S)
    assert section, f"docs/results.md has no {name} markers"
    return section.group(1)


def test_the_tables_in_docs_are_those_of_the_committed_json():
    result = json.loads((ROOT / "benchmarks/results/quality_curve.json").read_text())
    assert _docs_section("quality_curve") + "\n" == _script("quality_curve_report").numbers_tables(result)
    kv_curve = json.loads((ROOT / "benchmarks/results/kv_curve.json").read_text())
    assert _docs_section("kv_curve") + "\n" == _script("kv_curve_report").numbers_tables(kv_curve)
    healing = json.loads((ROOT / "benchmarks/results/healing_curve.json").read_text())
    assert _docs_section("healing_curve") + "\n" == _script("healing_curve_report").numbers_tables(healing)
    topk = _script("topk_vs_threshold")
    record = json.loads((ROOT / "docs/results.json").read_text())
    assert _docs_section("topk_vs_threshold") == "\n".join(topk.variants_table(record))
    assert _docs_section("bistability") == "\n".join(topk.bistability_table(record))


def test_a_marked_section_is_replaced_and_nothing_else(tmp_path):
    path = tmp_path / "doc.md"
    path.write_text("head\n<!-- begin: x -->\nold\n<!-- end: x -->\ntail\n")
    atomic_replace_section(path, "x", "new\n")
    assert path.read_text() == "head\n<!-- begin: x -->\nnew\n<!-- end: x -->\ntail\n"
    path.write_text("no markers\n")
    with pytest.raises(ValueError, match="begin: x"):
        atomic_replace_section(path, "x", "new")
    assert path.read_text() == "no markers\n"


def test_cuda_peak_memory_is_taken_in_the_warm_up_round_of_each_model(monkeypatch):
    """No GPU here: the allocator's counters are stood in for, to check the bookkeeping `run_benchmark` reports."""
    from tqdm.auto import tqdm

    from modification.evaluation import benchmark

    allocator = {"now": 100, "peak": 100}
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda device: allocator.update(peak=allocator["now"]))
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device: allocator["now"])
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device: allocator["peak"])
    uses = {"mod": 50, "base": 80}
    calls = []

    def run(name: str):
        calls.append(name)
        allocator["peak"] = max(allocator["peak"], allocator["now"] + uses[name] * len(calls))  # later runs use more
        return 0.5, {"kv_bytes": uses[name]}

    times, warm_up = benchmark._alternating(run, 2, torch.device("cuda"), tqdm(disable=True))
    assert calls == ["mod", "base", "base", "mod", "mod", "base"]  # alternating, warm-up first
    assert times == {"mod": [0.5, 0.5], "base": [0.5, 0.5]}
    assert warm_up == {"mod": {"kv_bytes": 50, "peak_memory_bytes": 50},
                       "base": {"kv_bytes": 80, "peak_memory_bytes": 160}}
    assert benchmark._peak_memory_fields(warm_up) == {
        "mod_peak_memory_bytes": 50, "base_peak_memory_bytes": 160, "peak_memory_ratio": 50 / 160}
    _, on_cpu = benchmark._alternating(run, 1, torch.device("cpu"), tqdm(disable=True))
    assert benchmark._peak_memory_fields(on_cpu) == {} and "peak_memory_bytes" not in on_cpu["mod"]


def test_healing_curve_runs_name_their_parts_and_evaluate_a_merged_copy():
    healing = _script("healing_curve")
    spec = healing.RunSpec.parse("attention-fitted@0.9:lm:routers:texts")
    assert (spec.variant, spec.kv_fraction, spec.objective, spec.recipe, spec.data) == (
        "attention-fitted", 0.9, "lm", "routers", "texts")
    assert healing.RunSpec.parse("attention-removal@0.8").name == "attention-removal@0.8:distill:lora:repeat"
    assert healing.RunSpec.parse("attention-fitted@0.8:lora-fixed-routers").recipe == "lora-fixed-routers"
    for bad in ("attention-fitted", "nope@0.9", "attention-fitted@0.9:adam"):
        with pytest.raises(ValueError, match="run"):
            healing.RunSpec.parse(bad)
    from peft import LoraConfig, get_peft_model

    model = convert_model(tiny_base("llama", num_layers=4), router_kind="threshold")
    adapted = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    twin = healing.evaluation_copy(adapted)
    ids = _batches(1)[0]["input_ids"]
    with torch.no_grad():
        assert torch.allclose(twin(ids).logits, adapted(ids).logits, atol=1e-5)
    assert type(twin).__name__ == "MoDForCausalLM" and hasattr(adapted, "peft_config")  # the original keeps LoRA


def test_healing_curve_run_stopped_by_its_time_budget_continues_from_its_checkpoint(text_ckpt, tmp_path, monkeypatch):
    import argparse

    from modification.conversion.checkpoint import load_mod_model

    healing = _script("healing_curve")
    mod, train_file, _ = text_ckpt
    monkeypatch.setitem(healing.kv_curve.BUILDERS, "attention-removal", lambda curve, f: load_mod_model(str(mod)))
    ids = torch.randint(3, 300, (1, 32), generator=torch.Generator().manual_seed(0))
    monkeypatch.setattr(healing.kv_curve, "evaluate", lambda model, curve: {"loss": float(model(ids, labels=ids).loss)})
    curve = healing.kv_curve.Curve(args=None, base=None, held_out={}, long_text=None, calib=[], fit_options=None,
                                   measured=None, shortgpt=[], base_dir=mod, train_texts=[str(train_file)])
    spec = healing.RunSpec.parse("attention-removal@0.9:lm:full:texts")  # full: the LM loss moves every weight

    def args(work: str, max_minutes: float | None) -> argparse.Namespace:  # 128 tokens a step: points at steps 1, 4
        return argparse.Namespace(points=[128, 512], schedule_tokens=None, batch_size=2, seq_len=64, repeat_share=0.0,
                                  warmup_steps=0, max_minutes=max_minutes, save_steps=1, work_dir=str(tmp_path / work),
                                  chat_data=None)

    key = healing.run_key(spec, healing.schedule_tokens(args("a", None)))
    assert key == "attention-removal@0.9:lm:full:texts/512"
    stopped = healing.heal_run(curve, spec, args("a", 1e-9))  # the time budget ends it after its first step
    assert not stopped["complete"] and stopped["stopped_at_step"] == 1
    assert [p["steps"] for p in stopped["points"]] == [1]
    assert any((tmp_path / "a").rglob("checkpoint-1"))
    resumed = healing.heal_run(curve, spec, args("a", None))
    assert resumed["complete"] and [p["steps"] for p in resumed["points"]] == [1, 4]
    assert not any((tmp_path / "a").iterdir())  # a complete run leaves nothing behind
    whole = healing.heal_run(curve, spec, args("b", None))
    assert [p["tokens"] for p in whole["points"]] == [p["tokens"] for p in resumed["points"]] == [128, 512]
    for a, b in zip(whole["points"], resumed["points"]):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-6)
    assert abs(whole["points"][0]["loss"] - whole["points"][1]["loss"]) > 1e-4  # training moved it, by more than that
