"""Cheap routers (`modification fit`) and attention sinks: the budget is met, sinks always run, generation with sinks
equals recomputation, a fit's per-layer plan survives recalibration, and on the real base the fitted routers reach
the calibrated executed fraction on held-out text."""

import os

import pytest
import torch
from huggingface_hub.errors import StrictDataclassError
from helpers import VOCAB, tiny_base

from modification.conversion.calibrate import _collect, executed_fraction, planned_fractions
from modification.conversion.convert import convert_model
from modification.conversion.fit import (
    FitSettings, calibration_batches, fit_routers, fold_thresholds_into_biases, mean_loss, with_routed_layers,
)
from modification.modeling import MoDConfig


def _settings(**kw) -> FitSettings:
    """`fit_routers` reads the fit's own fields; the step's folders and text (required by the step) are not read."""
    return FitSettings(model="mod", out="fitted", data=["calib.txt"], **kw)


def _batches(n: int, seq: int = 48, seed: int = 0) -> list[dict]:
    gen = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(3, VOCAB, (1, seq), generator=gen)} for _ in range(n)]


@pytest.fixture(scope="module")
def tiny_fitted():
    base = tiny_base("llama", num_layers=6)
    model = convert_model(base, router_kind="threshold")
    calib = _batches(4)
    fitted, record = fit_routers(model, calib, _settings(executed_fraction=0.8, max_skip=0.6), progress=False)
    fold_thresholds_into_biases(fitted)
    return fitted, record, calib


def test_fit_meets_the_budget_and_records_its_choice(tiny_fitted):
    model, record, calib = tiny_fitted
    _, routed = _collect(model, calib)
    assert abs(executed_fraction(routed) - 0.8) <= 0.02
    assert record.routed_layers == model.config.routed_layers
    assert record.chosen_plan in record.plan_loss_increase
    assert set(record.plan_loss_increase) == {"tokens", "layers", "mixed"}
    assert len(record.layer_removal_cost) == 6
    assert model.config.router_threshold == 0.5  # thresholds folded into the biases
    assert model.config.calibration["fit"]["chosen_plan"] == record.chosen_plan


def test_sink_tokens_run_every_routed_layer(tiny_fitted):
    model, _, calib = tiny_fitted
    assert model.config.routing_sink_tokens == 4
    out = model(**calib[0], use_cache=False, output_router_decisions=True)
    decisions = torch.stack(out.router_decisions)  # [layers, batch, seq]
    assert decisions[:, :, :4].all()
    assert not decisions[:, :, 4:].all(), "the routers must skip some tokens"


def test_sinks_follow_position_ids_under_left_padding(tiny_fitted):
    model, _, _ = tiny_fitted
    ids = torch.randint(3, VOCAB, (2, 20), generator=torch.Generator().manual_seed(5))
    mask = torch.ones_like(ids)
    mask[1, :7] = 0
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    out = model(ids, attention_mask=mask, position_ids=pos, use_cache=False, output_router_decisions=True)
    for decision in (out.router_decisions[j] for j in model.config.routed_layers):
        assert decision[0, :4].all() and decision[1, 7:11].all()
        assert not decision[1, :7].any(), "padding never runs a layer"


def test_generation_with_sinks_equals_recompute(tiny_fitted):
    model, _, _ = tiny_fitted
    prompt = torch.randint(3, VOCAB, (1, 9), generator=torch.Generator().manual_seed(2))
    cached = model.generate(prompt, max_new_tokens=8, do_sample=False)
    ids = prompt
    for _ in range(8):
        with torch.no_grad():
            nxt = model(ids, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
        ids = torch.cat([ids, nxt], dim=1)
    assert torch.equal(cached, ids)


def test_sink_tokens_field_is_validated():
    with pytest.raises(StrictDataclassError, match="routing_sink_tokens"):
        MoDConfig(num_hidden_layers=2, hidden_size=16, num_attention_heads=2, routing_sink_tokens=-1)


def test_fit_rejects_impossible_budgets():
    model = convert_model(tiny_base("llama", num_layers=4), router_kind="threshold")
    with pytest.raises(ValueError, match=r"executed_fraction must lie in \(0, 1\]"):
        fit_routers(model, _batches(1), _settings(executed_fraction=1.5), progress=False)
    with pytest.raises(ValueError, match="routable layers"):
        fit_routers(model, _batches(2), _settings(executed_fraction=0.05, max_skip=0.5), progress=False)
    with pytest.raises(ValueError, match="router_kind"):
        dense = convert_model(tiny_base("llama"), router_kind="dense")
        fit_routers(dense, _batches(1), _settings(executed_fraction=0.8), progress=False)


def test_recalibration_keeps_the_fit_plan(tiny_fitted):
    model, record, _ = tiny_fitted
    fractions = planned_fractions(model.config, 0.8)
    assert fractions is not None
    for j, skip in record.planned_skip.items():
        assert abs((1.0 - fractions[int(j)]) - skip) < 1e-6
    # a smaller budget scales every layer's skipped share by the same factor
    more = planned_fractions(model.config, 0.85)
    assert more is not None, "a smaller budget can always be scaled down from the plan"
    ratios = {round((1 - more[int(j)]) / s, 6) for j, s in record.planned_skip.items() if s > 0}
    assert ratios == {round(0.15 / 0.2, 6)}


def test_with_routed_layers_keeps_the_weights():
    base = tiny_base("llama")
    model = convert_model(base, router_kind="threshold", routed_layers=[1])
    other = with_routed_layers(model, [0, 2])
    assert other.config.routed_layers == [0, 2]
    ids = _batches(1)[0]
    for layer in other.model.layers:
        if layer.has_router:
            layer.router.bias.data.fill_(30.0)
    with torch.no_grad():
        assert torch.allclose(other(**ids).logits, base(**ids).logits, atol=1e-5)


# ---------------------------------------------------------------------------------------------------------------------
# The real base (SmolLM2-135M-Instruct): what the recipe was built for
# ---------------------------------------------------------------------------------------------------------------------


def _real_base_and_texts():
    from modification.conversion.bases import bases_dir
    from modification.conversion.texts import available_text_kinds, prepare_texts

    folder = bases_dir() / "smollm2-135m-instruct"
    if not (folder / "model.safetensors").is_file():
        if os.environ.get("CI"):
            pytest.fail("CI must fetch the real base first (`modification fetch-base smollm2-135m-instruct`)")
        pytest.skip("the real base is not fetched (`modification fetch-base smollm2-135m-instruct`)")
    kinds = available_text_kinds()
    if not kinds:
        pytest.skip("no offline text available (fetch-corpus, or the Debian packages bible-kjv / dict-gcide)")
    return folder, prepare_texts(kinds)


def test_fitted_routers_reach_the_budget_on_held_out_text_of_the_real_base():
    from transformers import AutoTokenizer, LlamaForCausalLM

    folder, texts = _real_base_and_texts()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    base = LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32)
    model = convert_model(base, router_kind="threshold")
    data = [str(paths["train"]) for paths in texts.values()]
    calib, _ = calibration_batches(data, tokenizer, seq_len=128, blocks_per_source=3, held_out_fraction=0.0,
                                   progress=False)
    held = [str(paths["held_out"]) for paths in texts.values()]
    held_batches, _ = calibration_batches(held, tokenizer, seq_len=128, blocks_per_source=4, held_out_fraction=0.0,
                                          progress=False)
    fitted, record = fit_routers(model, calib, _settings(executed_fraction=0.9, label_samples=1), progress=False)
    _, routed = _collect(fitted, held_batches)
    assert abs(executed_fraction(routed) - 0.9) <= 0.02, record
    # the ruinous layers (the first and the last, by measurement) are never routed
    costs = record.layer_removal_cost
    worst = sorted(range(len(costs)), key=lambda j: -costs[j])[:3]
    assert not set(worst) & set(record.routed_layers), (worst, record.routed_layers)
    assert 0 not in record.routed_layers and 29 not in record.routed_layers
    # quality (a loose bound): the fitted model at 0.9 loses less than 0.5 nats per token against the dense model
    dense_loss = mean_loss(model, held_batches)
    assert mean_loss(fitted, held_batches) - dense_loss < 0.5
