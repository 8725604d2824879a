"""`modification push`: verification, the dry-run listing, an upload to a loopback Hub stub, and the download path.

The upload goes through huggingface_hub's real HTTP client to `tests/hub_stub.py` on 127.0.0.1 (no Hub-compatible
server can be installed here), so everything up to and including the HTTP requests is the code users run.
"""

import json
import os
import re
import subprocess
import sys

import pytest
import torch
from helpers import VOCAB, place_in_hub_cache
from hub_stub import HubStub
from publish_helpers import BASE_ID, REPO_ID, copy_checkpoint, isolate_hub, make_checkpoint

from modification.cli.main import main as cli
from modification.conversion.checkpoint import load_mod_model
from modification.model_cards.card import render_card

UPLOADED = {
    "README.md", "config.json", "configuration_mod.py", "generation_config.json", "model.safetensors",
    "modeling_mod.py", "results.json", "tokenizer.json", "tokenizer_config.json",
}
LISTED = re.compile(r"^  (\S+)\s+([\d,]+) bytes", re.M)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    folder = make_checkpoint(tmp_path_factory.mktemp("push"))
    (folder / "optimizer.pt").write_bytes(b"not for the Hub")
    (folder / "logs").mkdir()
    return folder


@pytest.fixture(scope="module")
def pushed(checkpoint, tmp_path_factory):
    """One real `modification push` in a fresh process (env vars as a user sets them) to a loopback Hub stub."""
    home = tmp_path_factory.mktemp("home")
    with HubStub() as hub:
        env = dict(os.environ, HF_ENDPOINT=hub.endpoint, HF_TOKEN=hub.token, HF_HUB_DISABLE_XET="1",
                   HF_HOME=str(home))
        env.pop("HF_HUB_OFFLINE", None)
        result = subprocess.run(
            [sys.executable, "-m", "modification.cli", "push", "--checkpoint", str(checkpoint),
             "--repo-id", REPO_ID, "--base-model", BASE_ID, "--private"],
            env=env, capture_output=True, text=True, timeout=300,
        )
        yield hub, result


def _push(*args):
    return cli(["push", "--repo-id", REPO_ID, "--base-model", BASE_ID, *args])


def test_dry_run_lists_exactly_the_files_it_would_upload_and_sends_nothing(checkpoint, tmp_path, monkeypatch, capsys):
    from huggingface_hub import constants

    isolate_hub(monkeypatch, tmp_path)  # no token anywhere
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # any HTTP request would raise
    assert _push("--checkpoint", str(checkpoint), "--dry-run") == 0
    out = capsys.readouterr().out
    listed = dict(LISTED.findall(out))
    assert set(listed) == UPLOADED
    card = str(render_card(checkpoint, REPO_ID, base_model=BASE_ID)).encode()
    for name, size in listed.items():
        expected = len(card) if name == "README.md" else (checkpoint / name).stat().st_size
        assert int(size.replace(",", "")) == expected, name
    assert re.search(r"^  README\.md .* bytes  \(model card rendered now\)$", out, re.M)
    assert "not uploaded (not checkpoint files): logs/, optimizer.pt" in out
    assert "no remote file is deleted" in out and "dry run: nothing was uploaded" in out


def _break(folder, case):
    if case == "missing modeling file":
        (folder / "modeling_mod.py").unlink()
    elif case == "stale modeling file":
        with open(folder / "modeling_mod.py", "a") as f:
            f.write("\n# an older copy\n")
    elif case == "config without auto_map":
        config = json.loads((folder / "config.json").read_text())
        del config["auto_map"]
        (folder / "config.json").write_text(json.dumps(config))
    elif case == "card without custom_code tag":
        card = str(render_card(folder, REPO_ID, base_model=BASE_ID)).replace("- custom_code\n", "")
        (folder / "README.md").write_text(card)
    elif case == "no tokenizer":
        (folder / "tokenizer_config.json").unlink()


@pytest.mark.parametrize("case,message", [
    ("missing modeling file", "modeling file modeling_mod.py is missing"),
    ("stale modeling file", "modeling_mod.py differs from this package's"),
    ("config without auto_map", "config.json has no auto_map"),
    ("card without custom_code tag", "tags must include custom_code"),
    ("no tokenizer", "no tokenizer"),
])
def test_verification_rejects_a_broken_folder_before_any_request(checkpoint, tmp_path, monkeypatch, capsys, case,
                                                                   message):
    folder = copy_checkpoint(checkpoint, tmp_path / "ck")
    _break(folder, case)
    with HubStub() as hub:
        isolate_hub(monkeypatch, tmp_path, endpoint=hub.endpoint, token=hub.token)
        assert _push("--checkpoint", str(folder)) == 2
        assert _push("--checkpoint", str(folder), "--dry-run") == 2
    captured = capsys.readouterr()
    assert message in captured.err and "is not ready to publish" in captured.err
    assert "would push" not in captured.out
    assert hub.requests == []


def test_push_without_a_token_is_a_clear_error_before_any_request(checkpoint, tmp_path, monkeypatch, capsys):
    with HubStub() as hub:
        isolate_hub(monkeypatch, tmp_path, endpoint=hub.endpoint)
        assert _push("--checkpoint", str(checkpoint)) == 2
    assert "no Hugging Face token: set HF_TOKEN or run `hf auth login`" in capsys.readouterr().err
    assert hub.requests == []


def test_upload_is_one_commit_of_exactly_the_checkpoint_files(pushed, checkpoint):
    hub, result = pushed
    assert result.returncode == 0, result.stderr[-3000:]
    repo = hub.repos[REPO_ID]
    assert repo["private"] is True
    assert len(repo["commits"]) == 1 and len(hub.calls("POST", r"/commit/")) == 1
    commit = repo["commits"][0]
    assert f"commit: {hub.endpoint}/{REPO_ID}/commit/{commit['oid']}" in result.stdout
    files = hub.files(REPO_ID)
    assert set(files) == UPLOADED
    for name in UPLOADED - {"README.md"}:
        assert files[name] == (checkpoint / name).read_bytes(), name
    assert files["README.md"] == str(render_card(checkpoint, REPO_ID, base_model=BASE_ID)).encode()
    # weights went through LFS (hashed upload), small files inline; the card's metadata was validated first
    assert ("lfsFile", "model.safetensors") in commit["ops"] and ("file", "config.json") in commit["ops"]
    assert len(hub.calls("PUT", r"^/_lfs/")) == 1
    assert len(hub.calls("POST", r"^/api/validate-yaml$")) == 1
    assert not any(op[0].startswith("deleted") for op in commit["ops"])
    api_calls = [r for r in hub.requests if r["path"].startswith("/api/") and "agent-harnesses" not in r["path"]]
    assert api_calls and all(r["auth"] == f"Bearer {hub.token}" for r in api_calls)


def test_remote_files_are_deleted_only_when_asked_and_prs_leave_main_alone(pushed, checkpoint, tmp_path, monkeypatch,
                                                                           capsys):
    hub, result = pushed
    assert result.returncode == 0, result.stderr[-3000:]
    main = hub.repos[REPO_ID]["refs"]["main"]
    main["model-00001-of-00002.safetensors"] = b"a stale shard"
    main[".gitattributes"] = b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n"
    isolate_hub(monkeypatch, tmp_path, endpoint=hub.endpoint, token=hub.token)
    commits = len(hub.repos[REPO_ID]["commits"])

    assert _push("--checkpoint", str(checkpoint)) == 0  # nothing changed: no commit, nothing deleted
    assert len(hub.repos[REPO_ID]["commits"]) == commits
    assert "model-00001-of-00002.safetensors" in hub.files(REPO_ID)

    assert _push("--checkpoint", str(checkpoint), "--delete-missing") == 0
    assert hub.repos[REPO_ID]["commits"][-1]["ops"] == [("deletedFile", "model-00001-of-00002.safetensors")]
    assert set(hub.files(REPO_ID)) == UPLOADED | {".gitattributes"}

    folder = copy_checkpoint(checkpoint, tmp_path / "ck")
    (folder / "generation_config.json").write_text('{"do_sample": false}\n')
    assert _push("--checkpoint", str(folder), "--create-pr") == 0
    assert "pull request: " in capsys.readouterr().out
    assert hub.repos[REPO_ID]["commits"][-1]["pr"] is True
    assert hub.files(REPO_ID)["generation_config.json"] == (checkpoint / "generation_config.json").read_bytes()
    assert hub.files(REPO_ID, "refs/pr/1")["generation_config.json"] == b'{"do_sample": false}\n'

    assert _push("--checkpoint", str(folder), "--revision", "v2") == 0
    assert hub.files(REPO_ID, "v2")["generation_config.json"] == b'{"do_sample": false}\n'


def test_published_repo_loads_by_id_from_the_hub_cache_offline(pushed, checkpoint, tmp_path):
    hub, result = pushed
    assert result.returncode == 0, result.stderr[-3000:]
    downloaded = tmp_path / "as-uploaded"
    downloaded.mkdir()
    for name, data in hub.files(REPO_ID).items():
        (downloaded / name).write_bytes(data)
    place_in_hub_cache(downloaded, tmp_path / "hub", REPO_ID)
    model, _ = load_mod_model(str(checkpoint))
    ids = torch.randint(3, VOCAB, (2, 13), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        torch.save({"ids": ids, "logits": model(ids).logits}, tmp_path / "expected.pt")
    script = f"""
import sys, torch
from huggingface_hub import ModelCard, hf_hub_download
from transformers import AutoModelForCausalLM, AutoTokenizer
from modification.cli.main import main
expected = torch.load({str(tmp_path / "expected.pt")!r})
model = AutoModelForCausalLM.from_pretrained({REPO_ID!r}, trust_remote_code=True).eval()
tok = AutoTokenizer.from_pretrained({REPO_ID!r}, trust_remote_code=True)
with torch.no_grad():
    assert torch.equal(model(expected["ids"]).logits, expected["logits"])
out = model.generate(**tok("w1 w2 w3", return_tensors="pt"), max_new_tokens=3, do_sample=False)
card = ModelCard.load(hf_hub_download({REPO_ID!r}, "README.md"))
print("LOADED", type(model).__module__, tuple(out.shape), card.data.base_model)
# a Hub id is accepted wherever a checkpoint folder is
assert main(["card", "--checkpoint", {REPO_ID!r}, "--repo-id", {REPO_ID!r}, "--out", "-"]) == 0
sys.exit(main(["push", "--checkpoint", {REPO_ID!r}, "--repo-id", "test-org/tiny-mod-mirror", "--new-card",
               "--dry-run"]))
"""
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(tmp_path / "hub"), HF_HOME=str(tmp_path / "home"))
    for name in ("HF_ENDPOINT", "HF_TOKEN", "HF_MODULES_CACHE"):
        env.pop(name, None)
    run = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "LOADED transformers_modules" in run.stdout and "(1, 6) test-org/tiny-llama" in run.stdout
    assert "would push" in run.stdout and "test-org/tiny-mod-mirror" in run.stdout
    assert set(dict(LISTED.findall(run.stdout))) == UPLOADED
