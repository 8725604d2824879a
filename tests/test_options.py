"""One declaration per option (issue 11), one settings object per step (issue 17): every routing field and every
training setting round-trips command line -> config / settings -> results.json -> model card; a routing field
missing from any derived surface fails here; flags and a `--config` file give equal settings for every step, and a
wrong key names the key and the step; each option has one name."""

import dataclasses
import importlib
import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from modification.cli.commands import COMMANDS
from modification.cli.main import build_parser
from modification.cli.main import main as cli
from modification.cli.options import settings_from_args
from modification.conversion.results import routing_section
from modification.conversion.settings import ChatDataSettings, TrainSettings
from modification.conversion.steps import SettingsError, flag
from modification.evaluation.settings import RoutingMapSettings
from modification.model_cards.card import _routing_rows, _training_rows, fmt, render_card
from modification.modeling.configuration_mod import ROUTING_FIELDS, MoDConfig
from modification.push_scripts.manifest import STEP_SETTINGS, load_manifest, plan_release

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
    "max_tokens": 256,  # 2 steps of 2 x 2 x 32 tokens, as `steps`
    "max_minutes": 30.0,
    "seq_len": 32,
    "batch_size": 2,
    "grad_accum": 2,
    "learning_rate": 0.002,
    "router_learning_rate": 0.003,
    "warmup_steps": 1,
    "weight_decay": 0.05,
    "load_loss_coef": 0.5,
    "flop_fraction": 0.9,  # a budget: this one, or kv_fraction (TRAIN_BUDGET_ALTERNATIVE)
    "flop_context_length": 64,
    "distill_weight": 0.5,
    "distill_temperature": 1.5,
    "lm_weight": 0.5,
    "hidden_mse_weight": 0.1,
    "hidden_mse_layers": [1, -1],
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
    "repeat_share": 0.5,
    "repeat_tokens": 8,
    "recalibrate": False,
}

# One budget is given: the samples give the FLOP budget, so the KV budget stays unset.
TRAIN_BUDGET_ALTERNATIVE = "kv_fraction"

# Values other than the defaults for some fields of every command's settings (folders, lists, bools, unions).
SETTINGS_SAMPLES = {
    "convert": {"base": "org/base", "out": "mod", "dtype": "bfloat16", "revision": "v1", "overwrite": True,
                "trust_remote_code": True, "routing": ROUTING_SAMPLES},
    "fit": {"model": "mod", "out": "fitted", "data": ["a.txt", "b c.txt"], "flop_fraction": 0.7,
            "flop_context_length": 4096, "routing_granularity": "auto", "routed_layers": [1, 3], "ridge": 0.01,
            "min_lookup_share": 0.5, "progress": False},
    "train": {**{k: v for k, v in TRAIN_SAMPLES.items() if k != "data"}, "data": ["a.txt"], "model": "mod",
              "out": "trained", "checkpoint_dir": "ck", "resume": True, "save_adapter": True, "overwrite": True,
              "teacher": "org/teacher"},
    "calibrate": {"model": "mod", "data": ["a.txt"], "kv_fraction": 0.75, "global_threshold": True,
                  "max_blocks": 8},
    "eval": {"model": "mod", "base": "org/base", "no_base": True, "data": ["a.txt"], "context_lengths": [64, 128],
             "tasks": ["x", "y"], "tasks_path": ["p1", "p2"], "limit": 0.5, "tasks_batch_size": "auto",
             "device": "cpu", "dtype": "float32", "full_context": False, "lookup_distances": [64, 256],
             "lookup_passage_tokens": 32, "lookup_trials": 2},
    "bench": {"model": "mod", "lengths": [16, 32], "decode_batch_sizes": [], "threads": 1, "kv_fraction": 0.6},
    "card": {"checkpoint": "mod", "repo_id": "org/m", "out": "-", "license": "mit"},
    "push": {"checkpoint": "mod", "repo_id": "org/m", "private": True, "create_pr": True, "dry_run": True,
             "commit_message": "hi there", "base_model": "org/base"},
    "show-routing": {"model": "mod", "text": "some words", "max_tokens": 32},
    "chat-data": {"base": "org/base", "prompts": 32, "max_new_tokens": 64, "batch_size": 4, "seed": 3,
                  "texts": ["shakespeare", "kjv"], "out": "chat.jsonl", "overwrite": True, "progress": False},
}
SETTINGS = {**STEP_SETTINGS, "show-routing": RoutingMapSettings, "chat-data": ChatDataSettings}


def _defaults(cls) -> dict:
    return {f.name: (f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default)
            for f in dataclasses.fields(cls)}


def _argv(values: dict) -> list[str]:
    """Command-line arguments written by hand from the naming rule: field `a_b` is flag `--a-b`, lists are
    comma-separated except `data`, a true bool is the bare flag, a false one `--no-` and the flag."""
    argv = []
    for name, value in values.items():
        if isinstance(value, bool):
            argv.append(("--" if value else "--no-") + name.replace("_", "-"))
        elif name == "data":
            argv += ["--data", *value]
        else:
            text = ",".join(map(str, value)) if isinstance(value, list) else str(value)
            argv += ["--" + name.replace("_", "-"), text]
    return argv


def test_samples_cover_every_declared_field():
    assert set(ROUTING_SAMPLES) == set(ROUTING_FIELDS)
    assert set(TRAIN_SAMPLES) | {TRAIN_BUDGET_ALTERNATIVE} == {
        f.name for f in dataclasses.fields(TrainSettings) if f.metadata.get("recorded", True)}
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
    # the manifest takes every field as a routing key of convert, and the flags give the same settings
    manifest = {"members": {"m": {"base": "org/base", "repo_id": "org/m", "convert": {"routing": ROUTING_SAMPLES}}}}
    (tmp_path / "releases.yaml").write_text(yaml.safe_dump(manifest))
    [member] = plan_release(load_manifest(tmp_path / "releases.yaml"), None, work_dir=str(tmp_path))
    converted = member.steps[0].settings
    assert converted.routing == ROUTING_SAMPLES
    parsed = build_parser().parse_args(["convert", "--base", "org/base", "--out", converted.out,
                                        *_argv(ROUTING_SAMPLES)])
    assert settings_from_args(type(converted), parsed) == converted


def test_the_manifest_sections_and_the_commands_take_the_same_settings():
    for step, cls in SETTINGS.items():
        assert importlib.import_module(f"modification.cli.{COMMANDS[step]}").SETTINGS is cls, step
        assert cls.step == step and all(f.metadata["help"] for f in dataclasses.fields(cls)), step
    assert set(SETTINGS_SAMPLES) == set(SETTINGS)


@pytest.mark.parametrize("step", list(SETTINGS))
def test_config_file_and_flags_give_equal_settings(tmp_path, step):
    cls, values = SETTINGS[step], SETTINGS_SAMPLES[step]
    expected = cls(**values)
    config = tmp_path / f"{step}.yaml"
    config.write_text(yaml.safe_dump(values))
    parser = build_parser()
    assert settings_from_args(cls, parser.parse_args([step, "--config", str(config)])) == expected
    assert cls.from_yaml(config) == expected
    argv = shlex.split(expected.command_line())
    assert argv[:2] == ["modification", step]
    assert settings_from_args(cls, parser.parse_args(argv[1:])) == expected
    # flags given with --config override its values (convert's routing key by key)
    first = dataclasses.fields(cls)[0].name  # the model, base or checkpoint
    both = parser.parse_args([step, "--config", str(config), flag(first), "other"])
    assert settings_from_args(cls, both) == dataclasses.replace(expected, **{first: "other"})
    if step == "convert":
        both = parser.parse_args([step, "--config", str(config), "--router-threshold", "0.7"])
        assert settings_from_args(cls, both).routing == {**ROUTING_SAMPLES, "router_threshold": 0.7}


@pytest.mark.parametrize("step", list(SETTINGS))
def test_a_wrong_key_names_the_key_and_the_step(tmp_path, capsys, step):
    config = tmp_path / "settings.yaml"
    config.write_text(yaml.safe_dump({**SETTINGS_SAMPLES[step], "seq_lenn": 4}))
    assert cli([step, "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert f"error: {step} settings in {config}: unknown key(s) seq_lenn; the {step} settings are" in err
    if step in STEP_SETTINGS:  # and in the release manifest: the member, the step, the key
        manifest = {"members": {"m": {"base": "org/base", "repo_id": "org/m", step: {"seq_lenn": 4}}}}
        (tmp_path / "releases.yaml").write_text(yaml.safe_dump(manifest))
        message = rf"^members\.m\.{step}: unknown key\(s\) seq_lenn; the {step} settings are"
        with pytest.raises(SettingsError, match=message):
            plan_release(load_manifest(tmp_path / "releases.yaml"), None, work_dir=str(tmp_path))


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

    mod, train_txt, _ = text_mod_checkpoint(tmp_path / "model")
    values = {**TRAIN_SAMPLES, "data": [str(train_txt)]}
    args = build_parser().parse_args(["train", "--model", str(mod), "--out", "x", *_argv(values)])
    assert settings_from_args(TrainSettings, args).recorded() == {**values, TRAIN_BUDGET_ALTERNATIVE: None}

    # A real run with every value but fsdp (field, split and config are not read from a .txt file).
    run = {**values, "fsdp": False}
    out = tmp_path / "trained"
    flags = _argv({k: v for k, v in run.items() if k != "fsdp"})
    assert cli(["train", "--model", str(mod), "--out", str(out), *flags]) == 0
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


@pytest.mark.parametrize("command,old", [
    (["convert", "--base", "b", "--out", "o"], "--threshold"),
    (["fit", "--model", "m", "--out", "o", "--data", "d"], "--sink-tokens"),
    (["fit", "--model", "m", "--out", "o", "--data", "d"], "--target"),
    (["train", "--model", "m", "--out", "o", "--data", "d"], "--lr"),
    (["train", "--model", "m", "--out", "o", "--data", "d"], "--router-lr"),
    (["bench", "--model", "m"], "--target-executed-fraction"),
    (["fit", "--model", "m", "--out", "o", "--data", "d"], "--executed-fraction"),
    (["calibrate", "--model", "m", "--data", "d"], "--executed-fraction"),
    (["fit", "--model", "m", "--out", "o", "--data", "d"], "--kv"),  # no abbreviations either
])
def test_one_name_per_option(command, old, capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args([*command, old, "0.5"])
    assert f"unrecognized arguments: {old}" in capsys.readouterr().err


def test_a_missing_required_setting_names_it(capsys):
    assert cli(["calibrate", "--model", "m", "--data", "d"]) == 2
    assert "modification calibrate: error: calibrate.kv_fraction: is required" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [["--help"], ["fit", "--help"], ["demo", "--help"]])
def test_help_imports_no_torch(argv):
    """Command modules import what is heavy inside `run`; the parser is built only for the command asked for."""
    code = ("import sys\nfrom modification.cli.main import main\ntry:\n    main(sys.argv[1:])\nexcept SystemExit:\n"
            "    pass\nprint('torch imported:', 'torch' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, timeout=300)
    assert result.stdout.rstrip().endswith("torch imported: False"), result.stdout[-500:] + result.stderr[-2000:]


def test_readme_lists_every_routing_flag():
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    section = readme.split("## Convert, fit, train, calibrate", 1)[1].split("\n## ", 1)[0]
    for name in ROUTING_FIELDS:
        assert f"`{flag(name)}`" in section, name
