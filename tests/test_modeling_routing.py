"""The decoder layer's parts and the router outputs: routers decide (sinks included), `PackedTokens` gathers and
scatters, transformers' output recorder collects the router logits (dense routers' too), the cache takes its extra
arguments in `cache_kwargs`, and a config takes `output_attentions=True` that the forward then refuses."""

import pytest
import torch
from helpers import ARCHS, VOCAB, randomize_routers, routed_model, tiny_base
from transformers.utils.output_capturing import OutputRecorder

from modification.conversion.convert import convert_model
from modification.modeling import MoDCache, MoDConfig, MoDForCausalLM
from modification.modeling.modeling_mod import MoDPreTrainedModel, MoDRouter, PackedTokens, RoutingDecision


def _ids(batch: int = 2, seq: int = 12, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("arch", ARCHS)
def test_dense_model_is_the_base_model_bit_for_bit(arch):
    base = tiny_base(arch)
    model = convert_model(base, router_kind="dense")
    randomize_routers(model)  # dense routers score tokens but decide nothing
    with torch.no_grad():
        assert torch.equal(model(_ids()).logits, base(_ids()).logits)


def test_config_takes_output_attentions_and_the_forward_refuses_it(tmp_path):
    # transformers' config tests build every config with output_attentions=True among their common kwargs
    config = MoDConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                       num_attention_heads=4, output_attentions=True, attn_implementation="sdpa")
    assert config.output_attentions
    config.save_pretrained(tmp_path)  # validated again on save
    assert MoDConfig.from_pretrained(tmp_path).output_attentions
    model = MoDForCausalLM(config).eval()
    for module in (model, model.model):
        with pytest.raises(ValueError, match="cannot return attention weights"):
            module(_ids())
    with torch.no_grad():
        assert model(_ids(), output_attentions=False).attentions is None  # the argument wins over the config


def test_dense_routers_return_logits_and_still_run_every_token():
    model = convert_model(tiny_base("llama"), router_kind="dense").train()
    randomize_routers(model)
    ids = _ids()
    out = model(ids, labels=ids, output_router_decisions=True, output_hidden_states=True)
    routed = model.config.routed_layers
    assert len(out.router_logits) == len(routed)  # one per routed layer, as for routed models
    for logits, i in zip(out.router_logits, routed):
        assert logits.dtype == torch.float32 and logits.shape == ids.shape and not logits.requires_grad
        torch.testing.assert_close(logits, model.model.layers[i].router.score(out.hidden_states[i]))
    assert (torch.cat(out.router_logits) < 0).any()  # tokens that a threshold router at p = 0.5 would skip...
    assert all(bool(d.all()) for d in out.router_decisions) and bool(out.routed_fraction.eq(1).all())  # ...all run
    assert out.aux_loss is None and torch.equal(out.loss, out.lm_loss)
    out.loss.backward()
    routers = [p for n, p in model.named_parameters() if ".router." in n]
    assert routers and all(not p.requires_grad and p.grad is None for p in routers)  # frozen, as DDP needs


def test_dense_routers_stay_frozen_after_loading(tmp_path):
    """transformers' loader makes every floating-point weight it loads trainable; a dense checkpoint's routers must
    come back frozen (a trainable parameter that never gets a gradient breaks plain DDP)."""
    convert_model(tiny_base("llama"), router_kind="dense").save_pretrained(tmp_path)
    model, info = MoDForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    routers = [p for n, p in model.named_parameters() if ".router." in n]
    assert routers and not any(p.requires_grad for p in routers) and not info["missing_keys"]


def test_router_logits_are_recorded_from_the_routers():
    recorder = MoDPreTrainedModel._can_record_outputs["router_logits"]
    assert isinstance(recorder, OutputRecorder) and recorder.target_class is MoDRouter and recorder.index == 0
    model = routed_model("llama")
    returned = []
    for i in model.config.routed_layers:
        model.model.layers[i].router.register_forward_hook(lambda module, args, output: returned.append(output))
    with torch.no_grad():
        out = model(_ids(), output_router_logits=True)
    assert len(returned) == len(model.config.routed_layers)
    assert all(isinstance(d, RoutingDecision) for d in returned)
    assert len(out.router_logits) == len(returned)
    assert all(got is decision.logits for got, decision in zip(out.router_logits, returned))


def test_sinks_are_part_of_the_router_decision():
    model = routed_model("llama", routing_sink_tokens=3)
    router = model.model.layers[1].router
    with torch.no_grad():
        router.bias.fill_(-30.0)  # the rule alone runs no token
    hidden = torch.randn(2, 8, model.config.hidden_size, generator=torch.Generator().manual_seed(0))
    valid = torch.tensor([[True] * 8, [False] * 3 + [True] * 5])  # the second sequence left-padded by 3
    position_ids = (valid.long().cumsum(-1) - 1).clamp(min=0)
    decision = router(hidden, position_ids, valid, has_past=False)
    assert torch.equal(decision.mask, (position_ids < 3) & valid)
    assert decision.loss.item() == 0  # the objective counts the tokens the rule runs, not the sinks


def test_packed_tokens_gather_and_scatter():
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(2, 4, 3, generator=gen)
    cos, sin = torch.randn(2, 4, 6, generator=gen), torch.randn(2, 4, 6, generator=gen)
    mask = torch.tensor([[True, False, True, True], [False, False, True, False]])
    cache = MoDCache(num_layers=1)
    cache.advance(10)
    tokens = PackedTokens.pack(RoutingDecision(mask=mask, gate=torch.full((2, 4), 0.5)), hidden, (cos, sin), cache)
    assert tokens.lengths == [3, 1] and tokens.cu_seq_lens.tolist() == [0, 3, 4]
    assert tokens.columns.tolist() == [10, 12, 13, 12]
    packed = tokens.gather(hidden)
    assert torch.equal(packed, hidden[mask])
    assert torch.equal(tokens.cos, cos[mask]) and torch.equal(tokens.sin, sin[mask])
    assert torch.equal(tokens.gated(packed), 0.5 * packed)
    out = tokens.scatter(hidden, packed + 100)
    assert torch.equal(out[mask], hidden[mask] + 100) and torch.equal(out[~mask], hidden[~mask])
    # Every token: no gather, no scatter, no gate (the path the dense model traces and exports).
    every = PackedTokens.pack(RoutingDecision(), hidden, (cos, sin), None)
    assert every.index is None and every.lengths == [4, 4] and every.columns is None and every.gate is None
    assert every.gather(hidden).data_ptr() == hidden.data_ptr()
    assert every.scatter(hidden, every.gather(hidden)).data_ptr() == hidden.data_ptr()


def test_cache_update_takes_lengths_and_columns_in_cache_kwargs():
    cache = MoDCache(num_layers=1)
    k = torch.arange(3.0).view(3, 1, 1)
    with pytest.raises(ValueError, match="cache_kwargs with 'lengths' and 'columns'"):
        cache.update(k, k, 0)
    with pytest.raises(ValueError, match="cache_kwargs with 'lengths' and 'columns'"):
        cache.update(k, k, 0, {"lengths": [3]})
    keys, _, lengths = cache.update(k, -k, 0, cache_kwargs={"lengths": [2, 1], "columns": torch.tensor([0, 1, 0])})
    assert lengths == [2, 1] and torch.equal(keys, k)
    assert cache.layers[0].columns.tolist() == [0, 1, 0]
