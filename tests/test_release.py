"""`modification release`: the manifest, the settings of each step (as command lines), dry runs, a demo release run
through convert and push (to the loopback Hub stub), a CPU release with fitted routers, symbolic texts, a card and a
dry-run push (the chain of the smollm2-135m-instruct member, on a tiny model), and a member that gives the same
checkpoint and results as the same steps typed as commands."""

import json
import re
import shlex
import subprocess
import sys

import pytest
import yaml
from helpers import save_base
from hub_stub import HubStub
from publish_helpers import isolate_hub

from modification.cli.main import build_parser
from modification.cli.main import main as cli
from modification.cli.options import settings_from_args
from modification.push_scripts.release import DEFAULT_MANIFEST, load_manifest, plan_release

# The steps of a member without `fit` and `card` sections (the GPU members), and of the CPU member.
CLASSIC_STEPS = ["convert", "train", "calibrate", "eval", "push"]
GPU_MEMBER_STEPS = ["convert", "fit", "train", "calibrate", "eval", "push"]  # the shipped recipe fits first
CPU_MEMBER = "smollm2-135m-instruct"


def _write_manifest(tmp_path, base, **member_overrides) -> str:
    member = {
        "base": str(base), "base_model": "test-org/tiny-llama", "repo_id": "test-org/demo-mod",
        "convert": {"routing": {"routed_layers": [1, 3], "router_threshold": [0.5, 0.6]}},
        "train": {"data": ["tiny.txt"], "steps": 3, "learning_rate": "1e-3"},
        "calibrate": {"data": "calib.txt"},
        **member_overrides,
    }
    manifest = {
        "version": 1,
        "work_dir": str(tmp_path / "work"),
        "defaults": {
            "convert": {"routing": {"router_kind": "threshold", "gate_mode": "exact"}},
            "train": {"recipe": "routers", "seq_len": 64, "learning_rate": 1.0e-4},
            "calibrate": {"kv_fraction": 0.75},
            "eval": {"data": ["held-out.txt"], "tasks": ["cloze", "copy"]},
            "push": {"private": True},
        },
        "members": {"demo": member},
    }
    path = tmp_path / "releases.yaml"
    path.write_text(yaml.safe_dump(manifest, sort_keys=False))
    return str(path)


def test_each_step_gets_its_settings(tmp_path):
    manifest = _write_manifest(tmp_path, "/models/tiny-base", license="mit")
    [member] = plan_release(load_manifest(manifest), ["demo"])
    w = str(tmp_path / "work" / "demo")
    assert [s.name for s in member.steps] == CLASSIC_STEPS
    assert [s.command() for s in member.steps] == [
        f"modification convert --base /models/tiny-base --out {w}/converted --router-kind threshold --gate-mode exact "
        "--routed-layers 1,3 --router-threshold 0.5,0.6",
        f"modification train --model {w}/converted --data tiny.txt --out {w}/trained --recipe routers --steps 3 "
        "--seq-len 64 --learning-rate 0.001",
        f"modification calibrate --model {w}/trained --data calib.txt --kv-fraction 0.75 --out {w}/calibrated "
        "--seq-len 64",
        f"modification eval --model {w}/calibrated --data held-out.txt --base /models/tiny-base --tasks cloze,copy",
        f"modification push --checkpoint {w}/calibrated --repo-id test-org/demo-mod --private --base-model "
        "test-org/tiny-llama --license mit",
    ]
    # skipping train and calibrate hands the converted folder straight to eval and push
    manifest = _write_manifest(tmp_path, "org/base", train=None, calibrate=None, eval={"limit": 8})
    [member] = plan_release(load_manifest(manifest), None)
    assert [s.name for s in member.steps] == ["convert", "eval", "push"]
    evaluation = member.steps[1].settings
    assert (evaluation.model, evaluation.base, evaluation.data, evaluation.tasks, evaluation.limit) == (
        f"{w}/converted", "org/base", ["held-out.txt"], ["cloze", "copy"], 8.0)
    assert member.steps[2].settings.checkpoint == f"{w}/converted"


def test_shipped_manifest_plans_every_member_in_a_dry_run(capsys):
    manifest = load_manifest(DEFAULT_MANIFEST)
    members = plan_release(manifest, None)
    assert len(members) >= 2 and len({m.repo_id for m in members}) == len(members)
    parser = build_parser()
    for member in members:
        expected = ["convert", "fit", "eval", "card", "push"] if member.name == CPU_MEMBER else GPU_MEMBER_STEPS
        assert [s.name for s in member.steps] == expected, member.name
        push = member.steps[-1].settings
        assert push.license and push.base_model, member.name
        for step in member.steps:  # every step, typed as the plan prints it, runs with the same settings
            settings = settings_from_args(type(step.settings), parser.parse_args(shlex.split(step.command())[1:]))
            assert settings == step.settings
    assert cli(["release", "--all", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert out.count("modification push --checkpoint") == len(members)
    assert "dry run: nothing was run" in out


@pytest.mark.parametrize("change,message", [
    ({"train": {"recipe": "everything"}}, "members.demo.train.recipe: must be one of routers, lora, full"),
    ({"convert": {"routing": {"thresold": 0.5}}}, "members.demo.convert.routing: unknown key(s) thresold"),
    ({"repo_id": "no-org"}, "members.demo.repo_id: must look like org/name"),
    ({"calibrate": {"kv_fraction": "most"}}, "members.demo.calibrate.kv_fraction: must be a number"),
    ({"calibrate": {"data": "calib.txt", "kv_fraction": 0.7, "flop_fraction": 0.6, "flop_context_length": 4096}},
     "members.demo.calibrate.flop_fraction: give one budget, kv_fraction or flop_fraction, not both"),
    ({"train": {"steps": 2.5}}, "members.demo.train.steps: must be an integer"),
    ({"convert": {"routing": {"topk_capacity": [0.5]}}},
     "members.demo.convert.routing.topk_capacity: must be a number"),
    ({"eval": {"extra_args": ["--limit", "8"]}}, "members.demo.eval: unknown key(s) extra_args"),
])
def test_manifest_mistakes_name_the_field(tmp_path, capsys, change, message):
    manifest = _write_manifest(tmp_path, "org/base", **change)
    assert cli(["release", "--manifest", manifest, "--members", "demo", "--dry-run"]) == 2
    assert message in capsys.readouterr().err
    assert cli(["release", "--manifest", manifest, "--members", "nobody", "--dry-run"]) == 2
    assert "unknown member(s) nobody" in capsys.readouterr().err


def test_bad_settings_of_a_later_step_fail_before_anything_runs(tmp_path, capsys):
    base = save_base("llama", tmp_path / "base")
    manifest = _write_manifest(tmp_path, base, push={"private": "sometimes"})
    assert cli(["release", "--manifest", manifest, "--members", "demo"]) == 2
    assert "members.demo.push.private: must be true or false, got 'sometimes'" in capsys.readouterr().err
    assert not (tmp_path / "work").exists()


def test_demo_release_runs_convert_and_push_to_the_loopback_hub(tmp_path, monkeypatch, capsys):
    base = save_base("llama", tmp_path / "base")
    (base / "README.md").write_text("---\nlicense: mit\n---\n# tiny base\n")
    manifest = _write_manifest(tmp_path, base, train=None, calibrate=None, eval=None)
    converted = tmp_path / "work" / "demo" / "converted"
    with HubStub() as hub:
        # the steps run in subprocesses: they read the Hub settings from the environment
        isolate_hub(monkeypatch, tmp_path)
        monkeypatch.setenv("HF_ENDPOINT", hub.endpoint)
        monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")
        monkeypatch.setenv("HF_HOME", str(tmp_path / "home"))
        # without a token the release stops before converting anything
        assert cli(["release", "--manifest", manifest, "--members", "demo"]) == 2
        assert "no Hugging Face token" in capsys.readouterr().err and not converted.exists()

        monkeypatch.setenv("HF_TOKEN", hub.token)
        assert cli(["release", "--manifest", manifest, "--members", "demo", "--steps", "convert"]) == 0
        assert (converted / "model.safetensors").is_file()
        capsys.readouterr()
        assert cli(["release", "--manifest", manifest, "--members", "demo", "--dry-run"]) == 0
        plan = capsys.readouterr().out
        for name in ("README.md", "config.json", "model.safetensors", "modeling_mod.py", "tokenizer.json"):
            assert re.search(rf"^       {re.escape(name)}  [\d,]+ bytes$", plan, re.M), name
        assert cli(["release", "--manifest", manifest, "--members", "demo", "--steps", "push"]) == 0
    files = hub.files("test-org/demo-mod")
    assert (files["model.safetensors"] == (converted / "model.safetensors").read_bytes())
    card = files["README.md"].decode()
    assert "license: mit" in card and "base_model: test-org/tiny-llama" in card and "Not measured." in card
    assert hub.repos["test-org/demo-mod"]["private"] is True


def test_full_release_chain_runs_every_step_to_the_loopback_hub(tmp_path, monkeypatch):
    import json

    from helpers import text_mod_checkpoint

    _, train_txt, held_txt = text_mod_checkpoint(tmp_path / "model")
    base = tmp_path / "model" / "base"
    (base / "README.md").write_text("---\nlicense: mit\n---\n# tiny base\n")
    manifest = _write_manifest(
        tmp_path, base,
        train={"recipe": "routers", "data": [str(train_txt)], "steps": 2, "seq_len": 64, "kv_fraction": 0.8,
               "load_loss_coef": 1.0},
        calibrate={"kv_fraction": 0.8, "data": [str(train_txt)]},
        eval={"data": [str(held_txt)], "tasks": None, "context_lengths": [128], "max_tokens": 3000},
    )
    with HubStub() as hub:
        isolate_hub(monkeypatch, tmp_path)
        monkeypatch.setenv("HF_ENDPOINT", hub.endpoint)
        monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")
        monkeypatch.setenv("HF_HOME", str(tmp_path / "home"))
        monkeypatch.setenv("HF_TOKEN", hub.token)
        assert cli(["release", "--manifest", manifest, "--members", "demo"]) == 0
    files = hub.files("test-org/demo-mod")
    results = json.loads(files["results.json"])
    assert results["training"]["recipe"] == "routers"
    assert results["routing"]["calibration"]["budget"] == {"kv_fraction": 0.8}
    [row] = results["quality"]["perplexity"]
    card = files["README.md"].decode()
    assert f"{row['mod']:.6g}" in card and f"{row['base']:.6g}" in card


# ---------------------------------------------------------------------------------------------------------------
# The CPU member: fit, symbolic texts, card, dry-run push.


def test_cpu_member_fits_on_symbolic_texts_and_dry_runs_the_push():
    [member] = plan_release(load_manifest(DEFAULT_MANIFEST), [CPU_MEMBER], work_dir="work")
    steps = {s.name: s.settings for s in member.steps}
    w = f"work/{CPU_MEMBER}"
    convert, fit, evaluation, card, push = steps.values()
    assert (convert.base, convert.out, convert.dtype) == ("smollm2-135m-instruct", f"{w}/converted", "float32")
    assert (fit.model, fit.out, fit.kv_fraction, fit.routed_layers) == (f"{w}/converted", f"{w}/fitted", 0.9, "auto")
    assert fit.data == [f"{w}/texts/{kind}-train.txt" for kind in ("shakespeare", "kjv", "gcide")]
    assert (evaluation.model, evaluation.base) == (f"{w}/fitted", "smollm2-135m-instruct")
    assert evaluation.data == [f"{w}/texts/{kind}-held_out.txt" for kind in ("shakespeare", "kjv", "gcide")]
    assert evaluation.tasks is None and evaluation.context_lengths == [512]
    assert card.command_line() == (f"modification card --checkpoint {w}/fitted --repo-id {member.repo_id} --overwrite "
                                   "--base-model HuggingFaceTB/SmolLM2-135M-Instruct --license apache-2.0")
    assert push.checkpoint == f"{w}/fitted" and push.dry_run
    # no local path in the manifest: every text is linked into the member's folder before the steps run
    assert {k: sorted(v) for k, v in member.texts.items()} == {
        k: ["held_out", "train"] for k in ("shakespeare", "kjv", "gcide")}
    for step in member.steps:
        assert not any(a.startswith(("/", "~")) for a in shlex.split(step.command())), step.command()


@pytest.mark.parametrize("fit,message", [
    ({"kv_fraction": 0.8, "data": ["texts:poetry/train"]},
     "members.demo.fit.data: 'texts:poetry/train': texts are named"),
    ({"kv_fraction": 0.8, "data": ["texts:kjv/test"]}, "members.demo.fit.data: 'texts:kjv/test'"),
    ({"kv_fraction": 0.8, "data": ["a.txt"], "routed_layers": "some"},
     "members.demo.fit.routed_layers: must be auto"),
    ({"kv_fraction": 0.8, "data": ["a.txt"], "routing_granularity": "mlp"},
     "members.demo.fit.routing_granularity: must be one of attention, block, auto, got 'mlp'"),
    ({"kv_fraction": 0.8, "data": ["a.txt"], "steps": 3}, "members.demo.fit: unknown key(s) steps"),
    ({"data": ["a.txt"]}, "members.demo.fit.kv_fraction: is required"),
    ({"flop_fraction": 0.8, "data": ["a.txt"]}, "members.demo.fit.flop_context_length: is required with flop"),
    ({"kv_fraction": 0.8}, "members.demo.fit.data: is required"),
])
def test_fit_section_mistakes_name_the_field(tmp_path, capsys, fit, message):
    manifest = _write_manifest(tmp_path, "org/base", fit=fit)
    assert cli(["release", "--manifest", manifest, "--members", "demo", "--dry-run"]) == 2
    assert message in capsys.readouterr().err


def test_cpu_release_chain_with_fit_card_and_dry_run_push(tmp_path, monkeypatch, capfd):
    """convert -> fit -> eval -> card -> push --dry-run, each a subprocess, on a tiny model; the texts are named
    symbolically and linked in by the release (here to small stand-ins), and no token is needed."""
    import json

    from helpers import text_mod_checkpoint

    import modification.conversion.texts as texts

    _, train_txt, held_txt = text_mod_checkpoint(tmp_path / "model")
    base = tmp_path / "model" / "base"
    kinds = ("shakespeare", "kjv")
    monkeypatch.setattr(texts, "prepare_texts", lambda wanted: {
        kind: {"train": train_txt, "held_out": held_txt} for kind in wanted})
    manifest = _write_manifest(
        tmp_path, base, license="mit", train=None, calibrate=None, card={},
        fit={"kv_fraction": 0.8, "data": [f"texts:{k}/train" for k in kinds], "seq_len": 64,
             "blocks_per_source": 4},
        eval={"data": [f"texts:{k}/held_out" for k in kinds], "tasks": None, "context_lengths": [128],
              "max_tokens": 1500},
        push={"dry_run": True},
    )
    isolate_hub(monkeypatch, tmp_path)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert cli(["release", "--manifest", manifest, "--members", "demo"]) == 0
    out = capfd.readouterr().out  # the steps' own output: they run in subprocesses
    assert "dry run: nothing was uploaded" in out
    fitted = tmp_path / "work" / "demo" / "fitted"
    for kind in kinds:
        assert (tmp_path / "work" / "demo" / "texts" / f"{kind}-held_out.txt").read_text() == held_txt.read_text()
    results = json.loads((fitted / "results.json").read_text())
    assert [r["dataset"] for r in results["quality"]["perplexity"]] == [f"{k}-held_out.txt" for k in kinds]
    calibration = results["routing"]["calibration"]
    assert calibration["data"] == [f"{k}-train.txt" for k in kinds] and calibration["budget"] == {"kv_fraction": 0.8}
    assert calibration["fit"]["plan_fractions"]["kv_fraction"] == pytest.approx(0.8)
    assert abs(results["efficiency"]["kv_fraction"] - 0.8) < 0.1
    card = (fitted / "README.md").read_text()
    assert "license: mit" in card and "base_model: test-org/tiny-llama" in card
    for row in results["quality"]["perplexity"]:
        assert f"{row['mod']:.6g}" in card and f"{row['base']:.6g}" in card


def _without(value, keys=("seconds", "created", "updated", "commands")):
    """A JSON value without its timings and dates (and the commands that made it)."""
    if isinstance(value, dict):
        return {k: _without(v, keys) for k, v in value.items() if k not in keys}
    return [_without(v, keys) for v in value] if isinstance(value, list) else value


def test_a_member_and_the_same_steps_typed_as_commands_give_the_same_checkpoint(tmp_path, monkeypatch):
    """The release runs a member's steps from their settings files; typing the same steps as flags, in a folder of
    the same layout, gives the same weights, config and results (timings and dates aside)."""
    from helpers import text_mod_checkpoint

    _, train_txt, held_txt = text_mod_checkpoint(tmp_path / "model")
    base = tmp_path / "model" / "base"
    manifest = _write_manifest(
        tmp_path, base, license="mit", train=None, calibrate=None, card={},
        fit={"kv_fraction": 0.8, "data": [str(train_txt)], "seq_len": 64, "blocks_per_source": 4},
        eval={"data": [str(held_txt)], "tasks": None, "context_lengths": [128], "max_tokens": 1500},
        push={"dry_run": True},
    )
    isolate_hub(monkeypatch, tmp_path)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for folder in ("release", "by-hand"):
        (tmp_path / folder).mkdir()
    monkeypatch.chdir(tmp_path / "release")
    assert cli(["release", "--manifest", manifest, "--members", "demo", "--work-dir", "work"]) == 0
    monkeypatch.chdir(tmp_path / "by-hand")
    w = "work/demo"
    for argv in (
        ["convert", "--base", str(base), "--out", f"{w}/converted", "--router-kind", "threshold", "--gate-mode",
         "exact", "--routed-layers", "1,3", "--router-threshold", "0.5,0.6"],
        ["fit", "--model", f"{w}/converted", "--out", f"{w}/fitted", "--data", str(train_txt), "--kv-fraction",
         "0.8", "--seq-len", "64", "--blocks-per-source", "4"],
        ["eval", "--model", f"{w}/fitted", "--base", str(base), "--data", str(held_txt), "--context-lengths", "128",
         "--max-tokens", "1500"],
        ["card", "--checkpoint", f"{w}/fitted", "--repo-id", "test-org/demo-mod", "--overwrite", "--base-model",
         "test-org/tiny-llama", "--license", "mit"],
    ):  # typed in a shell: a process each, as the release runs them
        assert subprocess.run([sys.executable, "-m", "modification.cli", *argv]).returncode == 0, argv
    released, typed = (tmp_path / run / w / "fitted" for run in ("release", "by-hand"))
    assert (released / "model.safetensors").read_bytes() == (typed / "model.safetensors").read_bytes()
    for name in ("config.json", "results.json"):
        release_json, typed_json = (json.loads((folder / name).read_text()) for folder in (released, typed))
        assert _without(release_json) == _without(typed_json), name
    results = json.loads((released / "results.json").read_text())
    assert results["quality"]["perplexity"] and results["routing"]["calibration"]["fit"]["routed_layers"]
    # the release records each step as the flags typed here: the same command
    assert results["commands"] == json.loads((typed / "results.json").read_text())["commands"]
