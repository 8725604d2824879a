"""Model cards: rendered from config.json and results.json, parsed back by huggingface_hub, and truthful."""

import json
import logging
import re

import pytest
from huggingface_hub import ModelCard
from publish_helpers import (
    BASE_ID,
    REPO_ID,
    copy_checkpoint,
    make_checkpoint,
    numbers_in_text,
    numeric_leaves,
    sample_results,
)

from modification.cli.main import main as cli
from modification.conversion.checkpoint import read_mod_config
from modification.conversion.results import RESULTS_FILENAME
from modification.model_cards.card import card_problems, fmt, render_card
from modification.modeling.configuration_mod import ROUTING_FIELDS


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("card"))


def _eval_tuples(card):
    return sorted(
        (r.dataset_type, r.metric_type, tuple(sorted((r.metric_args or {}).items())), r.metric_value)
        for r in card.data.eval_results or []
    )


def test_rendered_card_parses_back_and_holds_exactly_the_results_numbers(checkpoint, tmp_path):
    out = tmp_path / "README.md"
    assert cli(["card", "--checkpoint", str(checkpoint), "--repo-id", REPO_ID, "--base-model", BASE_ID,
                "--out", str(out)]) == 0
    card = ModelCard.load(out)
    data = card.data
    assert data.base_model == BASE_ID and data.library_name == "transformers"
    assert data.license == "mit"  # from the base folder's own model card
    assert {"custom_code", "mixture-of-depths"} <= set(data.tags) and data.pipeline_tag == "text-generation"
    assert card_problems(card, checkpoint, REPO_ID) == []

    results = sample_results()
    expected = sorted(
        [(r["dataset"], "perplexity", (("context_length", r["context_length"]),), float(f"{r['mod']:.4g}"))
         for r in results["quality"]["perplexity"]]
        + [(r["task"], r["metric"], (), float(f"{r['mod']:.4g}")) for r in results["quality"]["tasks"]]
    )
    assert _eval_tuples(card) == expected  # model-index values: the JSON values to 4 significant digits
    front_matter = out.read_text().split("---")[1]
    assert "value: 91.23\n" in front_matter  # 91.2345678 in results.json: people read 4 digits
    assert not re.search(r"\d\.\d{5,}", front_matter), front_matter

    text = card.text
    assert f'AutoModelForCausalLM.from_pretrained("{REPO_ID}", trust_remote_code=True)' in text
    assert "model.generate(" in text
    assert "| tiny-text | 256 | 4096 | 91.2346 | 90.87 |" in text
    assert "| tiny-text | 64 | 1024 | 97.5 | n/a |" in text  # base not measured: said so, not invented
    assert "| tiny-cloze | acc | 200 | 0.61 | 0.625 |" in text
    assert "| 1024 | 0.8123 | 0.7312 | 0.7421 | n/a |" in text  # latency, FLOP fraction, KV fraction, peak memory
    assert "| 4 | n/a | 1.07 | n/a | n/a |" in text  # decode: what bench did not record is n/a
    # the look-up table: MoD and base accuracy, then their losses; a base not measured is n/a
    assert "| tiny-text | 192 | 32 | 3 | 0.4193 | 0.7419 | 3.377 | 1.2086 |" in text
    assert "| tiny-text | 96 | 16 | 5 | 0.5867 | n/a | 2.5 | n/a |" in text
    assert "| 479 | 4 | 0.25 | 1 | 0.99912 | 0.0848 |" in text  # passkey: prompt tokens, trials, accuracy, loss
    assert "| KV fraction (bytes of K/V cache, MoD / base) | 0.742188 |" in text
    assert "| FLOP fraction of a 4096-token prefill (executed / dense FLOPs) | 0.7004 |" in text
    assert "attention and MLP" in text  # what a skipped token leaves out: the whole block (the default granularity)
    assert "Hardware: device: Test CPU; device type: cpu; dtype: float32; torch threads: 2." in text
    assert "| recipe | routers" in text and "| data | test-org/tiny-text |" in text
    assert results["commands"][0] in text
    # No number that the results JSON does not hold (code blocks, ids, the citation and the date aside).
    allowed = {fmt(x) for x in numeric_leaves(results)}
    found = numbers_in_text(text, ignore=(REPO_ID, BASE_ID, "NAACL 2025", results["created"]))
    assert found and set(found) <= allowed, set(found) - allowed


def test_card_without_results_says_not_measured(tmp_path):
    folder = make_checkpoint(tmp_path, results=False)
    card = render_card(folder, REPO_ID, base_model=BASE_ID)
    reparsed = ModelCard(str(card))
    assert reparsed.data.eval_results is None and "model-index" not in str(card)
    sections = dict(re.findall(r"^## (\w+)\n\n(.*?)(?=^## |\Z)", reparsed.text, flags=re.S | re.M))
    assert sections["Quality"].strip() == "Not measured."
    assert sections["Efficiency"].strip() == "Not measured."
    assert "Not recorded" in sections["Training"]
    assert "From config.json" in sections["Routing"]
    assert "| router threshold (`router_threshold`) | 0.55 (every routed layer) |" in card.text
    # every number comes from config.json's routing fields
    config = read_mod_config(folder)
    allowed = {fmt(x) for name in ROUTING_FIELDS for x in numeric_leaves(getattr(config, name))}
    assert set(numbers_in_text(reparsed.text, ignore=(REPO_ID, BASE_ID, "NAACL 2025"))) <= allowed
    assert card_problems(reparsed, folder, REPO_ID) == []


def test_licence_flag_wins_with_a_warning_and_a_missing_licence_is_never_guessed(tmp_path, caplog, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # the base id is looked up in the Hub cache only
    folder = make_checkpoint(tmp_path / "a")
    with caplog.at_level(logging.WARNING):
        card = render_card(folder, REPO_ID, base_model=BASE_ID, license="apache-2.0")
    assert card.data.license == "apache-2.0"
    assert "says 'mit'" in caplog.text
    caplog.clear()
    bare = make_checkpoint(tmp_path / "b", base_license=None)
    with caplog.at_level(logging.WARNING):
        card = render_card(bare, REPO_ID, base_model=BASE_ID)
    assert card.data.license == "other" and card.data.license_name == "unknown"
    assert "could not find the base model's licence" in caplog.text
    assert "unknown: the base model's licence could not be read" in card.text


def test_results_measured_with_other_routing_are_refused(checkpoint, tmp_path, capsys):
    folder = copy_checkpoint(checkpoint, tmp_path / "ck")
    results = sample_results()
    results["routing"]["router_threshold"] = 0.5  # measured before calibration moved the threshold
    (folder / RESULTS_FILENAME).write_text(json.dumps(results))
    assert cli(["card", "--checkpoint", str(folder), "--repo-id", REPO_ID, "--base-model", BASE_ID]) == 2
    assert "router_threshold=0.5 but config.json has 0.55" in capsys.readouterr().err
    assert not (folder / "README.md").exists()


def test_card_problems_catch_edited_numbers_tags_and_repo(checkpoint, tmp_path, capsys):
    assert cli(["card", "--checkpoint", str(checkpoint), "--repo-id", REPO_ID, "--out", str(tmp_path / "c.md"),
                "--base-model", BASE_ID]) == 0
    text = (tmp_path / "c.md").read_text()
    edited = ModelCard(text.replace("value: 91.23", "value: 9.1"))
    assert any("model-index does not match" in p for p in card_problems(edited, checkpoint, REPO_ID))
    untagged = ModelCard(text.replace("- custom_code\n", ""))
    assert any("custom_code" in p for p in card_problems(untagged, checkpoint, REPO_ID))
    assert any("never names test-org/other" in p for p in card_problems(ModelCard(text), checkpoint, "test-org/other"))
    # an existing card is kept unless --overwrite
    assert cli(["card", "--checkpoint", str(checkpoint), "--repo-id", REPO_ID, "--out", str(tmp_path / "c.md")]) == 2
    assert "already exists" in capsys.readouterr().err
    assert cli(["card", "--checkpoint", REPO_ID, "--repo-id", REPO_ID]) == 2
    assert "--out is needed when --checkpoint is a Hub id" in capsys.readouterr().err
