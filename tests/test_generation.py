"""Generation with the ragged MoDCache: same tokens as recomputing without a cache; K/V only for routed tokens."""

import pytest
import torch
from helpers import VOCAB, left_padded_batch, routed_model, tiny_base

from modification.conversion.convert import convert_model
from modification.modeling import MoDCache


@torch.no_grad()
def greedy_without_cache(model, ids, mask, new_tokens):
    """Recompute the whole sequence at every step (no cache), as generate() would feed it."""
    for _ in range(new_tokens):
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        logits = model(ids, attention_mask=mask, position_ids=pos, use_cache=False).logits[:, -1]
        nxt = logits.argmax(-1, keepdim=True)
        ids = torch.cat([ids, nxt], 1)
        mask = torch.cat([mask, torch.ones_like(nxt)], 1)
    return ids


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_cached_generate_matches_full_recompute(arch):
    model = routed_model(arch)
    ids, mask = left_padded_batch([23, 9, 15, 4], seed=3)
    out = model.generate(
        ids, attention_mask=mask, max_new_tokens=12, do_sample=False, pad_token_id=0, eos_token_id=None,
        return_dict_in_generate=True,
    )
    assert isinstance(out.cache, MoDCache)
    expected = greedy_without_cache(model, ids, mask, 12)
    assert torch.equal(out.sequences, expected)
    # routing is active during the decode steps: some layers hold fewer tokens than were seen
    cached = out.cache.cached_tokens()
    seen = int(mask.sum()) + 4 * 11  # the last generated token is never fed back
    assert max(cached[i] for i in model.config.routed_layers) < seen
    assert all(cached[i] == seen for i in range(4) if i not in model.config.routed_layers)


def test_batched_left_padded_generate_equals_one_by_one():
    model = routed_model("llama", seed=4)
    ids, mask = left_padded_batch([17, 6, 11], seed=5)
    batched = model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0,
                             eos_token_id=None)
    for i in range(3):
        single = ids[i : i + 1, mask[i].bool()]
        alone = model.generate(single, max_new_tokens=8, do_sample=False, pad_token_id=0, eos_token_id=None)
        assert torch.equal(alone[0, -8:], batched[i, -8:])


def test_cache_bytes_are_routed_fraction_of_dense_cache():
    base = tiny_base("llama")
    model = routed_model("llama")
    ids = torch.randint(3, VOCAB, (1, 200), generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        dense_cache = base(ids, use_cache=True).cache
        out = model(ids, use_cache=True, output_router_logits=True)
    dense_bytes = sum(layer.keys.nbytes + layer.values.nbytes for layer in dense_cache.layers)
    fraction = out.routed_fraction.mean().item()
    assert 0.5 < fraction < 0.95  # a real share of token-layers skipped
    ratio = out.cache.kv_bytes() / dense_bytes
    assert abs(ratio - fraction) <= 0.02 * fraction
    assert out.cache.cached_tokens() == [round(f * 200) for f in out.routed_fraction.tolist()]


def test_cache_reorder_and_crop():
    model = routed_model("llama")
    ids, mask = left_padded_batch([12, 7], seed=6)
    with torch.no_grad():
        out = model(ids, attention_mask=mask, use_cache=True)
    cache = out.cache
    before = [[k.clone() for k in layer.split()[0]] for layer in cache.layers]
    cache.reorder_cache(torch.tensor([1, 0]))
    for keys, layer in zip(before, cache.layers):
        assert all(torch.equal(a, b) for a, b in zip(keys[::-1], layer.split()[0]))
    cache.reorder_cache(torch.tensor([1, 0]))
    for keys, layer in zip(before, cache.layers):
        assert all(torch.equal(a, b) for a, b in zip(keys, layer.split()[0]))
    # feeding 3 more tokens then cropping them gives back the same cache
    more = torch.randint(3, VOCAB, (2, 3))
    with torch.no_grad():
        model(more, attention_mask=torch.cat([mask, torch.ones(2, 3, dtype=torch.long)], 1), cache=cache)
    assert cache.get_seq_length() == 15
    assert sum(cache.cached_tokens()) > sum(k.shape[0] for keys in before for k in keys)
    cache.crop(-3)
    assert cache.get_seq_length() == 12
    for keys, layer in zip(before, cache.layers):
        assert all(torch.equal(a, b) for a, b in zip(keys, layer.split()[0]))


def test_beam_search_and_sampling_run():
    model = routed_model("llama")
    ids, mask = left_padded_batch([10, 6], seed=7)
    beams = model.generate(ids, attention_mask=mask, max_new_tokens=5, num_beams=3, do_sample=False,
                           pad_token_id=0, eos_token_id=None)
    assert beams.shape == (2, 15)
    sampled = model.generate(ids, attention_mask=mask, max_new_tokens=5, do_sample=True, num_return_sequences=2,
                             pad_token_id=0, eos_token_id=None)
    assert sampled.shape == (4, 15)


def test_dense_conversion_generates_like_base():
    base = tiny_base("mistral")
    model = convert_model(base)
    ids, mask = left_padded_batch([14, 8], seed=8)
    expected = base.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False, pad_token_id=0,
                             eos_token_id=None)
    got = model.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False, pad_token_id=0,
                         eos_token_id=None)
    assert torch.equal(got, expected)
