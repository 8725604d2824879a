"""Conversion to checkpoint folders, loading through AutoModel with trust_remote_code, and bad input."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import VOCAB, place_in_hub_cache, save_base, tiny_base, tiny_tokenizer
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

from modification.cli.main import main as cli
from modification.conversion.checkpoint import CheckpointError, load_mod_model
from modification.conversion.convert import UnsupportedArchitectureError, convert_checkpoint
from modification.conversion.settings import ConvertSettings


def _ids():
    return torch.randint(3, VOCAB, (2, 19), generator=torch.Generator().manual_seed(11))


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2", "qwen3"])
def test_convert_cli_writes_loadable_checkpoint(tmp_path, arch):
    base_dir = save_base(arch, tmp_path / "base")
    (base_dir / "LICENSE").write_text("base licence text")
    out = tmp_path / "mod"
    assert cli(["convert", "--base", str(base_dir), "--out", str(out), "--router-threshold", "0.55"]) == 0
    assert (out / "LICENSE").read_text() == "base licence text"
    files = sorted(p.name for p in out.iterdir())
    for name in ["config.json", "configuration_mod.py", "modeling_mod.py", "model.safetensors", "tokenizer.json"]:
        assert name in files
    config = json.loads((out / "config.json").read_text())
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_mod.MoDForCausalLM"
    assert config["router_threshold"] == 0.55 and config["base_model_type"] == arch
    model = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()
    assert type(model).__name__ == "MoDForCausalLM" and type(model).__module__.startswith("transformers_modules")
    base = AutoModelForCausalLM.from_pretrained(base_dir).eval()
    with torch.no_grad():
        assert (model(_ids()).logits - base(_ids()).logits).abs().max().item() <= 1e-5
    assert (out / "tokenizer.json").read_bytes() == (base_dir / "tokenizer.json").read_bytes()
    assert (out / "tokenizer_config.json").read_bytes() == (base_dir / "tokenizer_config.json").read_bytes()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "temporary folders left behind"


def test_save_and_load_round_trip(tmp_path):
    from helpers import routed_model

    model = routed_model("llama")
    model.save_pretrained(tmp_path / "ck")
    loaded, _ = load_mod_model(str(tmp_path / "ck"))
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name
    with torch.no_grad():
        assert torch.equal(model(_ids()).logits, loaded(_ids()).logits)


def test_loads_by_repo_id_from_hub_cache_offline(tmp_path):
    from helpers import routed_model

    model = routed_model("qwen2")
    model.save_pretrained(tmp_path / "ck")
    tiny_tokenizer().save_pretrained(tmp_path / "ck")
    with torch.no_grad():
        torch.save({"ids": _ids(), "logits": model(_ids()).logits}, tmp_path / "expected.pt")
    place_in_hub_cache(tmp_path / "ck", tmp_path / "hub", "modification-test/tiny-mod")
    script = f"""
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
expected = torch.load({str(tmp_path / "expected.pt")!r})
model = AutoModelForCausalLM.from_pretrained("modification-test/tiny-mod", trust_remote_code=True).eval()
tok = AutoTokenizer.from_pretrained("modification-test/tiny-mod", trust_remote_code=True)
tok.padding_side = "left"
with torch.no_grad():
    assert torch.equal(model(expected["ids"]).logits, expected["logits"])
out = model.generate(**tok(["w1 w2 w3", "w4"], return_tensors="pt", padding=True), max_new_tokens=4, do_sample=False)
print("OK", type(model).__module__, tuple(out.shape))
"""
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(tmp_path / "hub"), HF_HOME=str(tmp_path / "home"))
    env.pop("HF_MODULES_CACHE", None)
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "OK transformers_modules" in result.stdout


def test_missing_trust_remote_code_is_a_clear_error(tmp_path):
    from helpers import routed_model

    routed_model("llama").save_pretrained(tmp_path / "ck")
    with pytest.raises(ValueError, match="trust_remote_code"):
        AutoModelForCausalLM.from_pretrained(tmp_path / "ck", trust_remote_code=False)


def test_unsupported_architecture_is_rejected_before_loading(tmp_path, capsys):
    GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=50)).save_pretrained(tmp_path / "gpt2")
    with pytest.raises(UnsupportedArchitectureError, match="llama, mistral, qwen2, qwen3"):
        convert_checkpoint(ConvertSettings(base=str(tmp_path / "gpt2"), out=str(tmp_path / "out")))
    assert cli(["convert", "--base", str(tmp_path / "gpt2"), "--out", str(tmp_path / "out")]) == 2
    assert "gpt2" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "flags,message",
    [(["--router-threshold", "1.2"], "router_threshold"), (["--routed-layers", "1,7"], "routed_layers")],
)
def test_bad_routing_arguments_leave_no_output(tmp_path, capsys, flags, message):
    base_dir = save_base("llama", tmp_path / "base")
    assert cli(["convert", "--base", str(base_dir), "--out", str(tmp_path / "out"), *flags]) == 2
    assert message in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base"]


def test_unknown_routing_field_is_rejected(tmp_path):
    base_dir = save_base("llama", tmp_path / "base")
    with pytest.raises(ValueError, match="convert.routing: unknown key.s. threshold"):  # the field is router_threshold
        convert_checkpoint(ConvertSettings(base=str(base_dir), out=str(tmp_path / "out"), routing={"threshold": 0.55}))
    assert not (tmp_path / "out").exists()


def test_existing_output_needs_overwrite(tmp_path):
    base_dir = save_base("llama", tmp_path / "base")
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(FileExistsError):
        convert_checkpoint(ConvertSettings(base=str(base_dir), out=str(out)))
    assert (out / "keep.txt").exists()
    convert_checkpoint(ConvertSettings(base=str(base_dir), out=str(out), overwrite=True))
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").exists()


def test_failure_during_write_leaves_no_partial_folder(tmp_path, monkeypatch):
    import modification.conversion.convert as convert_module

    base_dir = save_base("llama", tmp_path / "base")

    def broken_save(model, folder, companions_from=None):
        (Path(folder) / "config.json").write_text("{}")
        raise OSError("disk full")

    monkeypatch.setattr(convert_module, "save_checkpoint", broken_save)
    with pytest.raises(OSError, match="disk full"):
        convert_checkpoint(ConvertSettings(base=str(base_dir), out=str(tmp_path / "out")))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base"]


def test_corrupt_or_foreign_checkpoints_give_clear_errors(tmp_path):
    from helpers import routed_model

    routed_model("llama").save_pretrained(tmp_path / "ck")
    weights = tmp_path / "ck" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="could not load the weights"):
        load_mod_model(str(tmp_path / "ck"))
    (tmp_path / "ck" / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        load_mod_model(str(tmp_path / "ck"))
    tiny_base("llama").save_pretrained(tmp_path / "llama")
    with pytest.raises(CheckpointError, match="not a MoD checkpoint"):
        load_mod_model(str(tmp_path / "llama"))
    with pytest.raises(CheckpointError, match="neither an existing folder nor a Hub repo id"):
        load_mod_model(str(tmp_path / "nowhere" / "x" / "y"))
