"""The look-up check (`conversion/lookup.py`): it scores exactly the second copy of a repeated passage, a perfect
copier scores 1, and on the real base it tells a working model from one that cannot look back."""

from types import SimpleNamespace

import pytest
import torch
from helpers import reference_text_files

from modification.conversion.bases import DEFAULT_BASE, bases_dir
from modification.conversion.lookup import (
    lookup_rows,
    passkey_prompts,
    passkey_rows,
    repeated_passage_batch,
    repeated_passage_scores,
)


class Copier(torch.nn.Module):
    """Predicts the token `distance - 1` positions back (a copy of what followed the same place `distance` earlier),
    or the token itself with `distance=1` (the previous-token guess)."""

    def __init__(self, vocab: int, distance: int):
        super().__init__()
        self.vocab, self.distance = vocab, distance
        self.dummy = torch.nn.Parameter(torch.zeros(()))

    def forward(self, input_ids, logits_to_keep, use_cache):
        length = input_ids.shape[1]
        source = (torch.arange(length) + 1 - self.distance).clamp(min=0)
        logits = torch.nn.functional.one_hot(input_ids[:, source], self.vocab).float() * 20.0
        return SimpleNamespace(logits=logits[:, -logits_to_keep:])


def test_batch_layout_and_scores():
    filler = torch.arange(100, 400)
    batch = repeated_passage_batch(filler, distance=96, passage_tokens=16, trials=3, seed=1)
    assert batch.shape == (3, 96 + 16)
    assert torch.equal(batch[:, :16], batch[:, 96:])  # the second copy starts `distance` after the first
    assert not torch.equal(batch[0, :16], batch[1, :16])  # each trial draws its own passage
    assert perfect_and_guess(batch, vocab=400, distance=96, passage_tokens=16) == (1.0, pytest.approx(0.0, abs=0.1))


def perfect_and_guess(batch, vocab, distance, passage_tokens):
    perfect = repeated_passage_scores(Copier(vocab, distance), batch, passage_tokens)
    guess = repeated_passage_scores(Copier(vocab, 1), batch, passage_tokens, batch_size=2)
    assert perfect["tokens"] == guess["tokens"] == batch.shape[0] * (passage_tokens - 1)
    assert perfect["loss"] < 1e-6 < guess["loss"]
    return perfect["accuracy"], guess["accuracy"]


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match="overlap"):
        repeated_passage_batch(torch.arange(1000), distance=10, passage_tokens=16, trials=1)
    with pytest.raises(ValueError, match="needs at least"):
        repeated_passage_batch(torch.arange(50), distance=500, passage_tokens=16, trials=1)


def test_the_real_base_copies_and_a_layer_deleted_breaks_it(tmp_path):
    """SmolLM2-135M-Instruct copies a 64-token random passage from 512 tokens back and retrieves a pass key from a
    512-token prompt; without its layer 16 (the layer whose removal costs the least perplexity) it does neither."""
    folder = bases_dir() / DEFAULT_BASE
    if not (folder / "config.json").is_file():
        pytest.skip(f"the base is not cached in {folder} (`modification fetch-base`)")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(2)
    base = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    _, held = reference_text_files(tmp_path)
    filler = torch.tensor(tokenizer(held.read_text())["input_ids"][:4000])
    (row,) = lookup_rows({"base": base}, filler, [512], passage_tokens=64, trials=2)
    assert row["base"]["accuracy"] > 0.4, row
    prompts = passkey_prompts(tokenizer, 512, trials=4)
    assert all(len(ids) <= 512 and answer == 6 for ids, answer in prompts)  # " " and five digits, one token each
    assert all(tokenizer.decode(ids[-5:]).isdigit() for ids, _ in prompts)
    (passkey,) = passkey_rows({"base": base}, tokenizer, [512], trials=4)
    assert passkey["base"]["accuracy"] == 1.0 and passkey["length"] == max(len(ids) for ids, _ in prompts)
    del base.model.layers[16]
    (broken,) = lookup_rows({"base": base}, filler, [512], passage_tokens=64, trials=2)
    assert broken["base"]["accuracy"] < 0.2 * row["base"]["accuracy"], (row, broken)
    (broken,) = passkey_rows({"base": base}, tokenizer, [512], trials=4)
    assert broken["base"]["accuracy"] <= 0.5 and broken["base"]["loss"] > 3 * passkey["base"]["loss"], broken
