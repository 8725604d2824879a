"""The data pipeline: sources, packing, mixing by weight, held-out split, and clear errors."""

import json

import pytest
import torch
from helpers import tiny_tokenizer

from modification.conversion.data import (
    DataError,
    load_blocks,
    mix_blocks,
    read_documents,
    split_blocks,
    tokenize_and_pack,
)


def test_sources_of_every_kind(tmp_path):
    (tmp_path / "a.txt").write_text("w1 w2 w3")
    (tmp_path / "b.jsonl").write_text(json.dumps({"body": "w4 w5"}) + "\n\n" + json.dumps({"body": "w6"}) + "\n")
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "x.txt").write_text("w7")
    (folder / "sub").mkdir()
    (folder / "sub" / "y.json").write_text(json.dumps([{"text": "w8"}, {"text": "w9"}]))
    from datasets import Dataset

    Dataset.from_dict({"text": ["w10 w11", "w12"]}).save_to_disk(str(tmp_path / "saved"))
    assert list(read_documents(str(tmp_path / "a.txt"))) == ["w1 w2 w3"]
    assert list(read_documents(str(tmp_path / "b.jsonl"), text_field="body")) == ["w4 w5", "w6"]
    assert list(read_documents(str(folder))) == ["w8", "w9", "w7"]  # sorted paths: sub/y.json before x.txt
    assert list(read_documents(str(tmp_path / "saved"))) == ["w10 w11", "w12"]


def test_packing_joins_documents_with_eos_and_drops_the_remainder():
    tok = tiny_tokenizer()
    blocks = tokenize_and_pack(["w1 w2 w3", "w4 w5"], tok, seq_len=3, progress=False)
    eos = tok.eos_token_id
    assert blocks.tolist() == [[5, 6, 7], [eos, 8, 9]]  # w_i has id i + 4; the final EOS is the dropped remainder


def test_mixing_follows_the_weights_and_the_split_holds_out_the_tail():
    a = torch.arange(40).view(20, 2)
    b = torch.arange(100, 120).view(10, 2)
    train, held = split_blocks([a, b], 0.1)
    assert [t.shape[0] for t in train] == [18, 9] and torch.equal(held[0], a[18:]) and torch.equal(held[1], b[9:])
    mixed = mix_blocks(train, [0.25, 0.75], num_blocks=40, seed=1)
    from_b = int((mixed[:, 0] >= 100).sum())
    assert mixed.shape == (40, 2) and from_b == 30  # b has 9 blocks: they repeat to supply 30
    assert not any(row.tolist() in held[0].tolist() + held[1].tolist() for row in mixed)
    with pytest.raises(DataError, match="2 data weights given for 1"):
        mix_blocks([a], [0.5, 0.5])


def test_data_errors_are_clear(tmp_path, monkeypatch):
    import datasets.config
    import huggingface_hub.constants

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)  # as under HF_HUB_OFFLINE=1: no network retries
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    tok = tiny_tokenizer()
    (tmp_path / "bad.jsonl").write_text("{not json\n")
    (tmp_path / "short.txt").write_text("w1 w2")
    with pytest.raises(DataError, match="bad.jsonl:1 is not valid JSON"):
        list(read_documents(str(tmp_path / "bad.jsonl")))
    with pytest.raises(DataError, match="fewer than seq_len=64 tokens"):
        load_blocks([str(tmp_path / "short.txt")], tok, 64, progress=False)
    with pytest.raises(DataError, match="does not exist"):
        list(read_documents(str(tmp_path / "nope" / "x.txt")))
    with pytest.raises(DataError, match="holds no .txt"):
        (tmp_path / "empty").mkdir()
        list(read_documents(str(tmp_path / "empty")))
    # a name that is no dataset (offline): a DataError naming it, not a traceback from datasets
    with pytest.raises(DataError, match="surely-not-a-dataset-9731"):
        list(read_documents("surely-not-a-dataset-9731"))
