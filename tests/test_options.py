"""One declaration per option (issue 11): every routing field and every training setting round-trips
command line -> config / settings -> results.json -> model card; a routing field missing from any derived surface
fails here; the flags and manifest keys renamed in 0.2 still work and warn."""

import dataclasses
import json
import re
from pathlib import Path

import pytest
import yaml

from modification.cli.main import build_parser
from modification.cli.main import main as cli
from modification.cli.options import RENAMED, flag
from modification.conversion.results import routing_section
from modification.conversion.settings import CalibrateSettings, FitSettings, TrainSettings, settings_fields
from modification.evaluation.settings import BenchSettings, EvalSettings
from modification.model_cards.card import _routing_rows, _training_rows, fmt, render_card
from modification.modeling.configuration_mod import ROUTING_FIELDS, MoDConfig
from modification.push_scripts.manifest import SECTION_KEYS, load_manifest, plan_release


# A value other than the default for every routing field (a new field without one here fails the first test). The
# routed layers fit the 4-layer test models.
ROUTING_SAMPLES = {
    "router_kind": "topk",
    "routed_layers": [0, 2],
    "router_threshold": [0.3, 0.45],
    "routing_granularity": ["attention", "block"],
    "topk_capacity": 0.7,
    "gate_mode": "scale",
    "router_init_bias": 1.5,
    "load_loss_coef": 0.02,
    "load_loss_target": [0.6, 0.75],
    "topk_aux_loss_coef": 0.03,
    "routing_sink_tokens": 2,
}

# The same for the training settings; `fsdp` needs several GPUs, so the training run leaves it out.
TRAIN_SAMPLES = {
    "data": None,  # the test's text file
    "text_field": "body",
    "split": "validation",
    "data_config": "cfg",
    "recipe": "routers",
    "steps": 2,
    "seq_len": 32,
    "batch_size": 2,
    "grad_accum": 2,
    "learning_rate": 0.002,
    "router_learning_rate": 0.003,
    "warmup_steps": 1,
    "weight_decay": 0.05,
    "load_loss_coef": 0.5,
    "executed_fraction": 0.9,
    "lora_r": 4,
    "lora_alpha": 8,
    "lora_dropout": 0.1,
    "save_steps": 2,
    "logging_steps": 1,
    "eval_steps": 1,
    "eval_fraction": 0.25,
    "seed": 3,
    "gradient_checkpointing": True,
    "fsdp": True,
    "data_weights": [1.0],
    "max_tokens_per_source": 4000,
}


def _defaults(cls) -> dict:
    return {f.name: (f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default)
            for f in dataclasses.fields(cls)}


def _argv(values: dict) -> list[str]:
    """Command-line arguments written by hand from the naming rule: field `a_b` is flag `--a-b`, lists are
    comma-separated except `data`, a true bool is the bare flag."""
    argv = []
    for name, value in values.items():
        if value is True:
            argv.append("--" + name.replace("_", "-"))
        elif name == "data":
            argv += ["--data", *value]
        else:
            text = ",".join(map(str, value)) if isinstance(value, list) else str(value)
            argv += ["--" + name.replace("_", "-"), text]
    return argv


def test_samples_cover_every_declared_field():
    assert set(ROUTING_SAMPLES) == set(ROUTING_FIELDS)
    assert set(TRAIN_SAMPLES) == {f.name for f in settings_fields(TrainSettings)}
    defaults = _defaults(MoDConfig)
    assert all(ROUTING_SAMPLES[name] != defaults[name] for name in ROUTING_FIELDS)
    defaults = _defaults(TrainSettings)
    assert all(TRAIN_SAMPLES[name] != defaults[name] for name in TRAIN_SAMPLES if name != "data")


def test_every_routing_field_is_on_every_derived_surface(tmp_path):
    """convert's flags, the manifest's routing keys, the results' routing section, the card's routing rows and the
    config's docstring: each lists every field of ROUTING_FIELDS, with the declaration's help."""
    convert = build_parser()._subparsers._group_actions[0].choices["convert"]
    flags = {a.option_strings[0]: a for a in convert._actions if a.option_strings}
    config = MoDConfig(num_hidden_layers=4, **ROUTING_SAMPLES)
    section = routing_section(config)
    rows = dict(_routing_rows(section))
    for name in ROUTING_FIELDS:
        declared = MoDConfig.__dataclass_fields__[name]
        assert flags[flag(name)].help.startswith(declared.metadata["help"]), name
        assert section[name] == ROUTING_SAMPLES[name]
        [label] = [k for k in rows if f"`{name}`" in k]
        assert fmt(ROUTING_SAMPLES[name]) in rows[label] or ", ".join(map(fmt, ROUTING_SAMPLES[name])) in rows[label]
        assert f"        {name} (defaults to" in MoDConfig.__doc__
    # the manifest takes every field as a routing key and turns it into the same flag
    manifest = {"members": {"m": {"base": "org/base", "repo_id": "org/m", "routing": ROUTING_SAMPLES}}}
    (tmp_path / "releases.yaml").write_text(yaml.safe_dump(manifest))
    [member] = plan_release(load_manifest(tmp_path / "releases.yaml"), None, work_dir=str(tmp_path))
    parsed = build_parser().parse_args(member.steps[0].argv)
    assert {name: getattr(parsed, name) for name in ROUTING_FIELDS} == ROUTING_SAMPLES


def test_settings_sections_of_the_manifest_are_the_settings_fields():
    for section, cls in (("fit", FitSettings), ("train", TrainSettings), ("calibrate", CalibrateSettings),
                         ("eval", EvalSettings)):
        assert set(SECTION_KEYS[section]) == {f.name for f in settings_fields(cls)} | {"extra_args"}
    for cls in (FitSettings, TrainSettings, CalibrateSettings, EvalSettings, BenchSettings):
        assert all(f.metadata["help"] for f in settings_fields(cls)), cls


@pytest.fixture
def offline_card(monkeypatch):
    """The card looks the base's licence up on the Hub unless offline; these tests name it."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)


def test_routing_fields_round_trip_cli_config_results_card(tmp_path, offline_card):
    from helpers import text_mod_checkpoint

    _, _, held = text_mod_checkpoint(tmp_path / "model")
    base = tmp_path / "model" / "base"
    out = tmp_path / "mod"
    assert cli(["convert", "--base", str(base), "--out", str(out), *_argv(ROUTING_SAMPLES)]) == 0
    config = json.loads((out / "config.json").read_text())
    assert {name: config[name] for name in ROUTING_FIELDS} == ROUTING_SAMPLES
    assert cli(["eval", "--model", str(out), "--base", str(base), "--data", str(held), "--context-lengths", "64",
                "--max-tokens", "200", "--no-progress"]) == 0
    results = json.loads((out / "results.json").read_text())
    assert {name: results["routing"][name] for name in ROUTING_FIELDS} == ROUTING_SAMPLES
    card = str(render_card(out, "org/tiny-mod", base_model="org/tiny", license="mit"))
    for name, value in ROUTING_SAMPLES.items():
        text = ", ".join(map(fmt, value)) if isinstance(value, list) else fmt(value)
        assert re.search(rf"^\| [^|]*`{name}`\) \| {re.escape(text)}", card, re.M), name


def test_training_settings_round_trip_cli_settings_results_card(tmp_path, offline_card):
    from helpers import text_mod_checkpoint

    from modification.cli.options import settings_from_args

    mod, train_txt, _ = text_mod_checkpoint(tmp_path / "model")
    values = {**TRAIN_SAMPLES, "data": [str(train_txt)]}
    args = build_parser().parse_args(["train", "--model", str(mod), "--out", "x", *_argv(values)])
    assert dataclasses.asdict(settings_from_args(TrainSettings, args)) == values  # CLI -> settings

    # A real run with every value but fsdp (field, split and config are not read from a .txt file).
    run = {**values, "fsdp": False}
    out = tmp_path / "trained"
    assert cli(["train", "--model", str(mod), "--out", str(out), *_argv({k: v for k, v in run.items() if v})]) == 0
    training = json.loads((out / "results.json").read_text())["training"]
    # settings -> results.json (data by file name: nothing local is published)
    assert [Path(d).name for d in training["data"]] == ["train.txt"]
    assert {name: training[name] for name in run if name != "data"} == {k: v for k, v in run.items() if k != "data"}
    card = str(render_card(out, "org/tiny-mod", base_model="org/tiny", license="mit"))
    rows = dict(_training_rows(training))
    for name, value in run.items():
        label = name.replace("_", " ")
        assert f"| {label} | {rows[label]} |" in card  # results.json -> card
        if name != "data" and not isinstance(value, bool):
            shown = ", ".join(map(fmt, value)) if isinstance(value, list) else fmt(value)
            assert shown in rows[label], name


@pytest.mark.parametrize("command,old,value,dest,expected", [
    (["convert", "--base", "b", "--out", "o"], "--threshold", "0.3", "router_threshold", 0.3),
    (["fit", "--model", "m", "--out", "o", "--data", "d", "--executed-fraction", "0.8"], "--sink-tokens", "2",
     "routing_sink_tokens", 2),
    (["fit", "--model", "m", "--out", "o", "--data", "d"], "--target", "0.7", "executed_fraction", 0.7),
    (["train", "--model", "m", "--out", "o", "--data", "d"], "--lr", "0.001", "learning_rate", 0.001),
    (["train", "--model", "m", "--out", "o", "--data", "d"], "--router-lr", "0.01", "router_learning_rate", 0.01),
    (["train", "--model", "m", "--out", "o", "--data", "d"], "--target", "0.8", "executed_fraction", 0.8),
    (["calibrate", "--model", "m", "--data", "d"], "--target", "0.75", "executed_fraction", 0.75),
    (["bench", "--model", "m"], "--target-executed-fraction", "0.6", "executed_fraction", 0.6),
    (["demo"], "--target", "0.7", "executed_fraction", 0.7),
])
def test_renamed_flags_still_work_and_warn(command, old, value, dest, expected):
    new = flag(RENAMED[old.removeprefix("--").replace("-", "_")])
    with pytest.warns(FutureWarning, match=f"{old} is deprecated .* use {new}"):
        args = build_parser().parse_args([*command, old, value])
    assert getattr(args, dest) == expected
    assert getattr(build_parser().parse_args([*command, new, value]), dest) == expected


def test_calibrate_requires_the_budget_under_its_new_name(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["calibrate", "--model", "m", "--data", "d"])
    assert "--executed-fraction" in capsys.readouterr().err


def test_renamed_manifest_keys_still_work_and_warn(tmp_path):
    member = {
        "base": "org/base", "repo_id": "org/m", "routing": {"threshold": 0.4},
        "fit": {"target": 0.8, "data": ["a.txt"], "sink_tokens": 2},
        "train": {"data": ["a.txt"], "lr": 0.001, "router_lr": 0.01, "target": 0.8},
        "calibrate": {"target": 0.75, "data": ["a.txt"]},
    }
    (tmp_path / "releases.yaml").write_text(yaml.safe_dump({"members": {"m": member}}))
    with pytest.warns(FutureWarning) as caught:
        [planned] = plan_release(load_manifest(tmp_path / "releases.yaml"), None, work_dir=str(tmp_path))
    messages = " ".join(str(w.message) for w in caught)
    for old, new in (("routing.threshold", "routing.router_threshold"), ("fit.target", "fit.executed_fraction"),
                     ("fit.sink_tokens", "fit.routing_sink_tokens"), ("train.lr", "train.learning_rate"),
                     ("train.router_lr", "train.router_learning_rate"), ("calibrate.target",
                                                                        "calibrate.executed_fraction")):
        assert f"members.m.{old} is deprecated" in messages and f"use members.m.{new}" in messages
    steps = {s.name: build_parser().parse_args(s.argv) for s in planned.steps if s.name != "push"}
    assert steps["convert"].router_threshold == 0.4
    assert (steps["fit"].executed_fraction, steps["fit"].routing_sink_tokens) == (0.8, 2)
    assert (steps["train"].learning_rate, steps["train"].router_learning_rate) == (0.001, 0.01)
    assert steps["train"].executed_fraction == 0.8 and steps["calibrate"].executed_fraction == 0.75


def test_readme_lists_every_routing_flag():
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    section = readme.split("## Convert, fit, train, calibrate", 1)[1].split("\n## ", 1)[0]
    for name in ROUTING_FIELDS:
        assert f"`{flag(name)}`" in section, name
