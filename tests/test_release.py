"""`modification release`: the manifest, the exact command lines of each step, dry runs, and a demo release run
through convert and push (to the loopback Hub stub) with the steps that exist in this version."""

import re

import pytest
import yaml
from helpers import save_base
from hub_stub import HubStub
from publish_helpers import isolate_hub

from modification.conversion.cli import main as cli
from modification.push_scripts.release import DEFAULT_MANIFEST, STEPS, load_manifest, plan_release


def _write_manifest(tmp_path, base, **member_overrides) -> str:
    member = {
        "base": str(base), "base_model": "test-org/tiny-llama", "repo_id": "test-org/demo-mod",
        "routing": {"routed_layers": [1, 3], "threshold": [0.5, 0.6]},
        "train": {"data": ["tiny.txt"], "steps": 3, "lr": "1e-3"},
        "calibrate": {"data": "calib.txt"},
        **member_overrides,
    }
    manifest = {
        "version": 1,
        "work_dir": str(tmp_path / "work"),
        "defaults": {
            "routing": {"router_kind": "threshold", "gate_mode": "exact"},
            "train": {"recipe": "routers", "seq_len": 64, "lr": 1.0e-4},
            "calibrate": {"target": 0.75},
            "eval": {"data": ["held-out.txt"], "tasks": ["cloze", "copy"]},
            "push": {"private": True},
        },
        "members": {"demo": member},
    }
    path = tmp_path / "releases.yaml"
    path.write_text(yaml.safe_dump(manifest, sort_keys=False))
    return str(path)


def test_each_step_gets_the_exact_command_line(tmp_path):
    manifest = _write_manifest(tmp_path, "/models/tiny-base", license="mit")
    [member] = plan_release(load_manifest(manifest), ["demo"])
    w = str(tmp_path / "work" / "demo")
    assert [s.name for s in member.steps] == list(STEPS)
    assert [s.argv for s in member.steps] == [
        ["convert", "--base", "/models/tiny-base", "--out", f"{w}/converted", "--router-kind", "threshold",
         "--routed-layers", "1,3", "--threshold", "0.5,0.6", "--gate-mode", "exact"],
        ["train", "--model", f"{w}/converted", "--data", "tiny.txt", "--out", f"{w}/trained", "--recipe", "routers",
         "--steps", "3", "--seq-len", "64", "--lr", "0.001"],
        ["calibrate", "--model", f"{w}/trained", "--target", "0.75", "--data", "calib.txt", "--out", f"{w}/calibrated",
         "--seq-len", "64"],
        ["eval", "--model", f"{w}/calibrated", "--base", "/models/tiny-base", "--data", "held-out.txt",
         "--tasks", "cloze,copy"],
        ["push", "--checkpoint", f"{w}/calibrated", "--repo-id", "test-org/demo-mod", "--base-model",
         "test-org/tiny-llama", "--license", "mit", "--private"],
    ]
    # skipping train and calibrate hands the converted folder straight to eval and push
    manifest = _write_manifest(tmp_path, "org/base", train=None, calibrate=None, eval={"extra_args": ["--limit", "8"]})
    [member] = plan_release(load_manifest(manifest), None)
    assert [s.name for s in member.steps] == ["convert", "eval", "push"]
    assert member.steps[1].argv == ["eval", "--model", f"{w}/converted", "--base", "org/base", "--data",
                                    "held-out.txt", "--tasks", "cloze,copy", "--limit", "8"]
    assert member.steps[2].argv[:3] == ["push", "--checkpoint", f"{w}/converted"]


def test_shipped_manifest_plans_every_member_in_a_dry_run(capsys):
    manifest = load_manifest(DEFAULT_MANIFEST)
    members = plan_release(manifest, None)
    assert len(members) >= 2 and len({m.repo_id for m in members}) == len(members)
    for member in members:
        assert [s.name for s in member.steps] == list(STEPS), member.name
        assert "--license" in member.steps[-1].argv and "--base-model" in member.steps[-1].argv
    assert cli(["release", "--all", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert out.count("modification push --checkpoint") == len(members)
    assert "dry run: nothing was run" in out
    assert "[missing" not in out  # every step is a command of this version


@pytest.mark.parametrize("change,message", [
    ({"train": {"recipe": "everything"}}, "members.demo.train.recipe: must be one of routers, lora, full"),
    ({"routing": {"thresold": 0.5}}, "members.demo.routing: unknown key(s) thresold"),
    ({"repo_id": "no-org"}, "members.demo.repo_id: must look like org/name"),
    ({"calibrate": {"target": "most"}}, "members.demo.calibrate.target: must be a number"),
])
def test_manifest_mistakes_name_the_field(tmp_path, capsys, change, message):
    manifest = _write_manifest(tmp_path, "org/base", **change)
    assert cli(["release", "--manifest", manifest, "--members", "demo", "--dry-run"]) == 2
    assert message in capsys.readouterr().err
    assert cli(["release", "--manifest", manifest, "--members", "nobody", "--dry-run"]) == 2
    assert "unknown member(s) nobody" in capsys.readouterr().err


def test_missing_step_commands_fail_before_anything_runs(tmp_path, capsys, monkeypatch):
    import modification.push_scripts.release as release

    base = save_base("llama", tmp_path / "base")
    manifest = _write_manifest(tmp_path, base)
    # as with an older install of the package that lacks some commands
    monkeypatch.setattr(release, "available_commands", lambda: {"convert", "push"})
    assert cli(["release", "--manifest", manifest, "--members", "demo"]) == 2
    err = capsys.readouterr().err
    assert re.search(r"step\(s\) train, calibrate, eval cannot run: .* no `modification train`", err)
    assert "nothing was run" in err
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
        train={"recipe": "routers", "data": [str(train_txt)], "steps": 2, "seq_len": 64, "target": 0.8,
               "load_loss_coef": 1.0},
        calibrate={"target": 0.8, "data": [str(train_txt)]},
        eval={"data": [str(held_txt)], "tasks": None, "context_lengths": [128], "extra_args": ["--max-tokens", "3000"]},
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
    assert results["training"]["recipe"] == "routers" and results["routing"]["calibration"]["target_executed_fraction"] == 0.8
    [row] = results["quality"]["perplexity"]
    card = files["README.md"].decode()
    assert f"{row['mod']:.6g}" in card and f"{row['base']:.6g}" in card
