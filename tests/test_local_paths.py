"""Nothing local leaves the machine: public names for paths (`conversion/local_paths.py`), the check `push` runs
before an upload, and a demo-made checkpoint pushed to the loopback Hub with no path of this machine in any file."""

import json
import os
from pathlib import Path

import pytest
from hub_stub import HubStub
from publish_helpers import BASE_ID, REPO_ID, copy_checkpoint, isolate_hub, make_checkpoint

from modification.cli.main import main as cli
from modification.conversion.bases import KNOWN_BASES, bases_dir
from modification.conversion.checkpoint import CODE_FILES, MODELING_DIR, CheckpointError
from modification.conversion.corpus import cache_dir
from modification.conversion.local_paths import local_path_problems, public_command, public_name, public_strings
from modification.model_cards.card import render_card
from modification.model_cards.settings import PushSettings
from modification.push_scripts.push import push_checkpoint

REGISTRY_NAME = "smollm2-135m-instruct"


@pytest.fixture
def work(tmp_path, monkeypatch):
    """A working directory `work/` with a sibling folder `elsewhere/`, and a base cache of its own."""
    monkeypatch.setenv("MODIFICATION_CACHE", str(tmp_path / "cache"))
    (tmp_path / "work").mkdir()
    monkeypatch.chdir(tmp_path / "work")
    return tmp_path


def test_public_name(work):
    snapshot = work / "hub" / "models--test-org--tiny-llama" / "snapshots" / ("0" * 40)
    assert public_name(str(snapshot)) == public_name(str(snapshot / "config.json")) == "test-org/tiny-llama"
    assert public_name(str(bases_dir() / REGISTRY_NAME)) == KNOWN_BASES[REGISTRY_NAME].hub_id
    assert public_name(str(work / "work" / "texts" / "a.txt")) == "./texts/a.txt"  # never read as a Hub id
    assert public_name(str(work / "work")) == "."
    assert public_name(str(work / "elsewhere" / "llama")) == "llama"
    assert public_name("~/models/llama") == "llama" and public_name(r"C:\Users\me\llama") == "llama"
    for unchanged in ("test-org/tiny-llama", "demo-out", "texts/a.txt", "/", "/data", "https://huggingface.co/a/b",
                      "wikitext/wikitext-2-raw-v1:test", "<local>/a.txt"):
        assert public_name(unchanged) == unchanged
    nested = {"data": [str(work / "elsewhere" / "a.txt"), "b.txt"], "tokens": 3, "fit": {"seconds": 1.5}}
    assert public_strings(nested) == {"data": ["a.txt", "b.txt"], "tokens": 3, "fit": {"seconds": 1.5}}


def test_public_command(work):
    elsewhere = work / "elsewhere"
    snapshot = work / "hub" / "models--test-org--tiny-llama" / "snapshots" / ("0" * 40)
    command = (f"modification eval --model {work / 'work' / 'demo-out'} --base {bases_dir() / REGISTRY_NAME} "
               f"--data {elsewhere / 'a.txt'} 'texts/b c.txt' --out={elsewhere / 'o'} --tasks-path {snapshot}")
    public = public_command(command)
    # the registry name, not the Hub id: `--base smollm2-135m-instruct` runs on the same (dequantised) weights
    assert public == ("modification eval --model ./demo-out --base smollm2-135m-instruct --data '<local>/a.txt' "
                      "'texts/b c.txt' '--out=<local>/o' --tasks-path test-org/tiny-llama")
    assert public_command(public) == public
    assert str(elsewhere) not in public_command(f"modification eval --model '{elsewhere / 'x'}")  # unbalanced quote


def test_local_path_problems_name_the_file_and_field(tmp_path):
    config = {"base_model_name_or_path": "test-org/tiny-llama",
              "calibration": {"data": ["a.txt", "/root/texts/b.txt"], "held": ["~/c.txt", r"C:\Users\me\d.txt"]}}
    results = {"commands": [f"modification eval --model {tmp_path}/mod"], "url": "https://example.org/home/x/y",
               "note": "/", "short": "/data"}
    card = "# card\n\nsee https://huggingface.co/home/x\n\nconverted from `/home/someone/llama`\n"
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(b"\0\0/root/not/text")
    tokenizer = {"model": {"vocab": {"/usr/bin": 5}, "merges": ["/usr/bin /x", "/ab/cd"]}, "added_tokens": []}
    problems = local_path_problems({
        "config.json": json.dumps(config).encode(), "results.json": json.dumps(results).encode(),
        "README.md": card.encode(), "model.safetensors": weights, "tokenizer.json": json.dumps(tokenizer).encode(),
    })
    assert problems == [
        "config.json: calibration.data[1] = '/root/texts/b.txt'",
        "config.json: calibration.held[0] = '~/c.txt'",
        "config.json: calibration.held[1] = 'C:\\\\Users\\\\me\\\\d.txt'",
        f"results.json: commands[0] = 'modification eval --model {tmp_path}/mod'",
        "README.md: line 5: 'converted from `/home/someone/llama`'",
    ]


def test_files_every_checkpoint_carries_are_clean():
    assert local_path_problems({name: MODELING_DIR / name for name in CODE_FILES}) == []
    fetched = bases_dir() / REGISTRY_NAME  # the real base's tokenizer, chat template and licence, when fetched
    if fetched.is_dir():
        assert local_path_problems({p.name: p for p in fetched.iterdir() if p.is_file()}) == []


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("local-paths"))


def _leak(folder: Path, where: str, path: str) -> str:
    if where == "config.json":
        config = json.loads((folder / "config.json").read_text())
        config["base_model_name_or_path"] = path
        (folder / "config.json").write_text(json.dumps(config, indent=2))
        return f"config.json: base_model_name_or_path = '{path}'"
    if where == "results.json":
        results = json.loads((folder / "results.json").read_text())
        results["training"]["data"].append(path)
        (folder / "results.json").write_text(json.dumps(results, indent=2))
        return f"results.json: training.data[1] = '{path}'"
    card = str(render_card(folder, REPO_ID, base_model=BASE_ID, license="mit")) + f"\nMade from `{path}`.\n"
    (folder / "README.md").write_text(card)
    return f"README.md: line {card.count(chr(10))}: 'Made from `{path}`.'"


@pytest.mark.parametrize("where", ["config.json", "results.json", "README.md"])
def test_push_refuses_a_folder_that_names_a_local_path(checkpoint, tmp_path, monkeypatch, capsys, where):
    from huggingface_hub import constants

    isolate_hub(monkeypatch, tmp_path)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # the dry run sends nothing either way
    folder = copy_checkpoint(checkpoint, tmp_path / "ck")
    expected = _leak(folder, where, str(tmp_path / "data" / "train.txt"))
    with pytest.raises(CheckpointError) as err:
        push_checkpoint(PushSettings(checkpoint=str(folder), repo_id=REPO_ID, dry_run=True, base_model=BASE_ID))
    message = str(err.value)
    assert f"  - {expected}\n" in message and "--allow-local-paths" in message
    assert push_checkpoint(PushSettings(checkpoint=str(folder), repo_id=REPO_ID, dry_run=True, base_model=BASE_ID,
                                        allow_local_paths=True))[1] is None

    push = ["push", "--checkpoint", str(folder), "--repo-id", REPO_ID, "--base-model", BASE_ID, "--dry-run"]
    assert cli(push) == 2
    assert expected in capsys.readouterr().err
    assert cli([*push, "--allow-local-paths"]) == 0
    assert "dry run: nothing was uploaded" in capsys.readouterr().out


def test_a_demo_made_checkpoint_pushed_to_the_hub_names_no_local_path(tmp_path, monkeypatch):
    """The whole path on a tiny base given by its absolute path: demo, card, push to the loopback Hub; then every
    uploaded file is searched for the folders of this machine with plain substring checks (not the scanner)."""
    from huggingface_hub import constants
    from test_demo import run_tiny_demo

    run_tiny_demo(monkeypatch, tmp_path, {})
    demo_card = (tmp_path / "demo-out" / "README.md").read_bytes()
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # the card looks up the licence of BASE_ID: cache only
    assert cli(["card", "--checkpoint", "demo-out", "--repo-id", REPO_ID, "--base-model", BASE_ID,
                "--overwrite"]) == 0
    with HubStub() as hub:
        isolate_hub(monkeypatch, tmp_path, endpoint=hub.endpoint, token=hub.token)
        assert cli(["push", "--checkpoint", "demo-out", "--repo-id", REPO_ID]) == 0
    uploaded = hub.files(REPO_ID)
    assert {"config.json", "results.json", "README.md", "model.safetensors", "tokenizer.json"} <= set(uploaded)

    local = {str(tmp_path), os.getcwd(), str(Path.home()), str(cache_dir()), constants.HF_HOME,
             constants.HF_HUB_CACHE}
    local |= {os.path.realpath(path) for path in local}
    local = {path.rstrip("/") for path in local if len(path.rstrip("/")) > 1}
    for name, data in {**uploaded, "README.md (the demo's own card)": demo_card}.items():
        for path in local:
            assert path.encode() not in data, f"{name} names {path}"
    # what the files say instead: the base by its path relative to the working directory, commands that run here
    results = json.loads(uploaded["results.json"])
    assert results["model"]["base_model"] == "./model/base"
    assert json.loads(uploaded["config.json"])["base_model_name_or_path"] == "./model/base"
    assert any("--base ./model/base" in command for command in results["commands"])
    assert b"(MoD) version of `./model/base`" in demo_card
