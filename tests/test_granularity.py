"""Attention-only routing (`routing_granularity`), the router's rules (features, sinks, threshold logits, override)
and the routing plan (`RoutingPlan`, `MoDConfig.prefill_flops`)."""

import json

import pytest
import test_modeling_common as common
import torch
from helpers import VOCAB, left_padded_batch, reference_forward, routed_model, tiny_base
from huggingface_hub.errors import StrictDataclassError
from test_generation import greedy_without_cache

from modification.conversion.convert import convert_model
from modification.modeling import MoDConfig, MoDForCausalLM, RoutingPlan
from modification.modeling.modeling_mod import THRESHOLD_LOGIT_LIMIT, logit_to_threshold, threshold_to_logit

GRANULARITIES = {"block": "block", "attention": "attention", "mixed": ["attention", "block"]}


def _ids(batch: int = 2, seq: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))


def _kv_entry_bytes(model) -> int:
    """Bytes of one token's K and V in one layer."""
    config = model.config
    return 2 * config.num_key_value_heads * config.head_dim * next(model.parameters()).element_size()


# --------------------------------------------------------------------------------------------------------------------
# Exact when dense; gathered compute equals the masked reference
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2"])
def test_attention_granularity_dense_is_the_base(arch):
    base = tiny_base(arch)
    ids, mask = left_padded_batch([37, 20, 5], seed=1)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    dense = convert_model(base, router_kind="dense", routing_granularity="attention")
    routed_all = convert_model(base, routing_granularity=["attention", "block"])  # every token routed at conversion
    with torch.no_grad():
        assert torch.equal(dense(_ids()).logits, base(_ids()).logits)  # bit for bit
        expected = base(ids, attention_mask=mask, position_ids=pos).logits
        for model in (dense, routed_all):
            out = model(ids, attention_mask=mask, position_ids=pos, output_router_logits=True)
            assert out.routed_fraction.eq(1).all()
            assert (out.logits - expected).abs().amax(-1)[mask.bool()].max().item() <= 1e-5


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
@pytest.mark.parametrize("gate_mode", ["scale", "exact"])
@pytest.mark.parametrize("granularity", ["attention", "mixed"])
def test_attention_routed_compute_equals_masked_reference(arch, gate_mode, granularity):
    model = routed_model(arch, gate_mode=gate_mode, routing_granularity=GRANULARITIES[granularity])
    ids, mask = left_padded_batch([48, 31, 12], seed=2)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        out = model(ids, attention_mask=mask, position_ids=pos, output_router_decisions=True)
        block = routed_model(arch, gate_mode=gate_mode)(ids, attention_mask=mask, position_ids=pos).logits
    ref_logits, ref_masks = reference_forward(model, ids, mask, pos)
    for layer_idx in model.config.routed_layers:
        assert torch.equal(out.router_decisions[layer_idx], ref_masks[layer_idx])
        frac = ref_masks[layer_idx][mask.bool()].float().mean().item()
        assert 0.2 < frac < 0.8, f"layer {layer_idx} routes {frac:.2f}: the test needs a real fraction skipped"
    valid = mask.bool()
    assert (out.logits - ref_logits).abs().amax(-1)[valid].max().item() <= 1e-5
    assert (out.logits - block).abs().amax(-1)[valid].max().item() > 1e-2  # skipped tokens did run the MLP


def test_padding_runs_nothing_and_never_enters_the_cache():
    model = routed_model("llama", routing_granularity="attention")
    ids, mask = left_padded_batch([14, 6], seed=4)
    with torch.no_grad():
        out = model(ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0), use_cache=True,
                    output_hidden_states=True, output_router_decisions=True)
    pad = ~mask.bool()
    embeddings = out.hidden_states[0]
    for hidden in out.hidden_states[1:-1]:  # each layer's output (the last one is after the final norm)
        assert torch.equal(hidden[pad], embeddings[pad])
    n_valid = int(mask.sum())
    for layer_idx, decision in enumerate(out.router_decisions):
        assert not decision[pad].any()
        assert out.cache.cached_tokens()[layer_idx] == int(decision.sum()) <= n_valid


@pytest.mark.parametrize("model_and_inputs", ["attention", "mixed"], indirect=True)
class TestAttentionImplementationsWithAttentionGranularity(common.TestAttentionImplementations):
    """The attention-implementation tests (eager, flash_attention_2 and torch_varlen through CPU twins of their
    kernels, cached decoding included) on models whose routed layers skip attention only."""

    @pytest.fixture(autouse=True)
    def model_and_inputs(self, request):
        self.granularity = GRANULARITIES[request.param]

    def _model_and_inputs(self):
        tester = common.MoDModelTester("threshold")
        ids, mask = tester.left_padded_inputs([9, 4, 7])
        model = tester.create_model(config=tester.get_config(routing_granularity=self.granularity))
        return model, {"input_ids": ids, "attention_mask": mask}


# --------------------------------------------------------------------------------------------------------------------
# Cached generation and the KV cache
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("granularity", GRANULARITIES)
def test_cached_batched_generation_equals_recompute(granularity):
    model = routed_model("llama", seed=4, routing_granularity=GRANULARITIES[granularity], routing_sink_tokens=2)
    ids, mask = left_padded_batch([23, 9, 15, 4], seed=3)
    out = model.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False, pad_token_id=0,
                         eos_token_id=None, return_dict_in_generate=True)
    assert torch.equal(out.sequences, greedy_without_cache(model, ids, mask, 12))
    seen = int(mask.sum()) + 4 * 11  # the last generated token is never fed back
    cached = out.cache.cached_tokens()
    assert all(cached[i] < seen for i in model.config.routed_layers)  # routing active, prefill and decoding


@pytest.mark.parametrize("granularity", GRANULARITIES)
def test_kv_bytes_equal_the_routed_share_exactly(granularity):
    model = routed_model("llama", routing_granularity=GRANULARITIES[granularity])
    ids, mask = left_padded_batch([40, 25, 33], seed=5)
    with torch.no_grad():
        out = model(ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0), use_cache=True,
                    output_router_decisions=True)
    n_valid, n_layers = int(mask.sum()), model.config.num_hidden_layers
    ran = [int(d.sum()) for d in out.router_decisions]
    assert out.cache.cached_tokens() == ran
    assert out.cache.kv_bytes() == sum(ran) * _kv_entry_bytes(model)
    kv_fraction = out.cache.kv_bytes() / (n_layers * n_valid * _kv_entry_bytes(model))
    assert 0.5 < kv_fraction < 0.95  # a real share skipped
    assert kv_fraction == pytest.approx(out.routed_fraction.double().mean().item(), abs=1e-7)
    shares = [out.routed_fraction[j].item() for j in model.config.routed_layers]
    measured = RoutingPlan.from_config(model.config, shares)
    assert measured.kv_fraction() == pytest.approx(kv_fraction, abs=1e-7)


@torch.no_grad()
def _apply_plan(model, plan: RoutingPlan, batch: torch.Tensor) -> None:
    """Make `model` route `plan` on `batch` exactly: shares 1 and 0 by the router override, the others by a threshold
    half-way between the logits of the last token kept and the first skipped, layer by layer (a layer's threshold
    changes what the next one sees)."""
    thresholds = [0.5] * len(plan.routed_layers)
    model.config.router_threshold = thresholds
    for i, (j, share) in enumerate(zip(plan.routed_layers, plan.routed_share)):
        router = model.model.layers[j].router
        if share in (0.0, 1.0):
            router.override = "run" if share == 1.0 else "skip"
            continue
        logits = model(batch, output_router_logits=True).router_logits[i].flatten().sort(descending=True).values
        k = round(share * logits.numel())
        thresholds[i] = logit_to_threshold((logits[k - 1].item() + logits[k].item()) / 2)
        model.config.router_threshold = list(thresholds)


def test_plan_kv_fraction_matches_a_measured_forward():
    model = routed_model("llama", routed_layers=[0, 1, 2, 3], routing_granularity=["block", "attention"] * 2)
    plan = RoutingPlan(4, [0, 1, 2, 3], [1.0, 0.5, 0.0, 0.25], ["block", "attention", "block", "attention"])
    batch = _ids(2, 16, seed=7)
    _apply_plan(model, plan, batch)
    with torch.no_grad():
        out = model(batch, use_cache=True, output_router_logits=True)
    assert out.routed_fraction.tolist() == list(plan.layer_shares())
    dense_bytes = 4 * batch.numel() * _kv_entry_bytes(model)
    assert out.cache.kv_bytes() / dense_bytes == plan.kv_fraction() == (1.0 + 0.5 + 0.0 + 0.25) / 4


# --------------------------------------------------------------------------------------------------------------------
# The router's rules
# --------------------------------------------------------------------------------------------------------------------


def test_router_scores_its_features():
    model = routed_model("llama")
    router = model.model.layers[1].router
    hidden = torch.randn(2, 5, model.config.hidden_size, dtype=torch.bfloat16)
    features = router.features(hidden)
    assert features.dtype == torch.float32
    torch.testing.assert_close(features.pow(2).mean(-1), torch.ones(2, 5), atol=1e-4, rtol=0)
    torch.testing.assert_close(router.score(hidden), features @ router.weight[0] + router.bias)


def test_sinks_count_from_the_first_real_token():
    model = routed_model("llama", routing_sink_tokens=2)
    router = model.model.layers[1].router
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    sinks = router.sink_mask((mask.cumsum(-1) - 1).clamp(min=0), mask.bool())
    assert sinks.tolist() == [[False, False, True, True, False], [True, True, False, False, False]]
    assert torch.equal(router.sink_mask(None, mask.bool()), sinks)  # positions counted from the padding mask


def test_threshold_logit_and_its_inverse():
    for p in (1e-6, 0.2, 0.5, 0.73, 1 - 1e-6):
        assert logit_to_threshold(threshold_to_logit(p)) == pytest.approx(p, rel=1e-12)
    assert threshold_to_logit(0.5) == 0.0 and threshold_to_logit(0.25) == pytest.approx(-threshold_to_logit(0.75))
    for limit in (THRESHOLD_LOGIT_LIMIT, -THRESHOLD_LOGIT_LIMIT):  # clamped: a threshold stays inside (0, 1)
        assert logit_to_threshold(10 * limit) == logit_to_threshold(limit) and 0.0 < logit_to_threshold(limit) < 1.0
    model = routed_model("llama", router_threshold=[0.3, 0.7])
    router = model.model.layers[3].router
    assert router.threshold_logit == threshold_to_logit(0.7)
    with torch.no_grad():  # a token whose logit is exactly the threshold's runs the layer (g >= p)
        router.weight.zero_()
        router.bias.fill_(router.threshold_logit)
        assert model(_ids(), output_router_logits=True).routed_fraction[3].item() == 1.0
        router.bias.fill_(router.threshold_logit - 1e-4)
        assert model(_ids(), output_router_logits=True).routed_fraction[3].item() == 0.0


@pytest.mark.parametrize("granularity", ["block", "attention"])
def test_router_override_runs_or_skips_every_token_but_the_sinks(granularity):
    base = tiny_base("llama")
    model = routed_model("llama", routing_granularity=granularity, routing_sink_tokens=2, gate_mode="scale")
    ids, mask = left_padded_batch([12, 7], seed=6)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    routers = [model.model.layers[j].router for j in model.config.routed_layers]
    for router in routers:
        router.override = "run"
    with torch.no_grad():  # every token runs, ungated: the base model
        out = model(ids, attention_mask=mask, position_ids=pos, output_router_logits=True)
        expected = base(ids, attention_mask=mask, position_ids=pos).logits
    assert out.routed_fraction.eq(1).all() and out.aux_loss is None
    assert (out.logits - expected).abs().amax(-1)[mask.bool()].max().item() <= 1e-5
    for router in routers:
        router.override = "skip"
    with torch.no_grad():
        out = model(ids, attention_mask=mask, position_ids=pos, use_cache=True, output_router_decisions=True)
        for router in routers:  # the same by the rule: no token passes the threshold, sinks run with gate 1
            router.override = None
            router.weight.zero_()
            router.bias.fill_(-THRESHOLD_LOGIT_LIMIT)
        model.config.gate_mode = "exact"
        torch.testing.assert_close(model(ids, attention_mask=mask, position_ids=pos).logits, out.logits)
    sinks = routers[0].sink_mask(pos, mask.bool())
    for j in model.config.routed_layers:
        assert torch.equal(out.router_decisions[j], sinks) and out.cache.cached_tokens()[j] == 4
    with pytest.raises(ValueError, match="override must be None, 'run' or 'skip'"):
        routers[0].override = "skipped"
    dense = convert_model(base, router_kind="dense", routing_granularity=granularity, routing_sink_tokens=2)
    for j in dense.config.routed_layers:  # dense routers take the switch too
        dense.model.layers[j].router.override = "skip"
    with torch.no_grad():
        skipped = dense(ids, attention_mask=mask, position_ids=pos, output_router_decisions=True)
    assert all(torch.equal(skipped.router_decisions[j], sinks) for j in dense.config.routed_layers)
    torch.testing.assert_close(skipped.logits, out.logits)  # the same weights, layers skipped the same way


def test_granularity_is_read_from_the_config_at_every_call():
    model = routed_model("llama")
    with torch.no_grad():
        block = model(_ids()).logits
        model.config.routing_granularity = "attention"
        attention = model(_ids()).logits
        assert torch.equal(attention, routed_model("llama", routing_granularity="attention")(_ids()).logits)
    assert not torch.equal(block, attention)


# --------------------------------------------------------------------------------------------------------------------
# The routing plan
# --------------------------------------------------------------------------------------------------------------------


def _tiny_config(**routing) -> MoDConfig:
    return MoDConfig(vocab_size=10, hidden_size=8, intermediate_size=12, num_hidden_layers=3, num_attention_heads=2,
                     num_key_value_heads=1, head_dim=4, **routing)


def _hand_count(config: MoDConfig, T: int, runs: dict[int, tuple[set[int], str]]) -> float:
    """FLOPs of a prefill of T tokens counted one multiply-add at a time (2 FLOPs each): `runs[layer]` holds the
    positions that run the layer's attention and its granularity (other layers: every position, "block")."""
    h, d, n_q, n_kv, m, V = 8, 4, 2, 1, 12, 10
    macs = 0
    for layer in range(config.num_hidden_layers):
        attended, granularity = runs.get(layer, (set(range(T)), "block"))
        for t in range(T):
            if t in attended:
                macs += h * n_q * d + 2 * h * n_kv * d + n_q * d * h  # q, k, v, o
                keys = [s for s in attended if s <= t]
                macs += n_q * len(keys) * (d + d)  # q.k and p.v, per head and key
            if t in attended or granularity == "attention":
                macs += 3 * h * m  # gate, up, down
    macs += T * h * V  # the LM head on every token
    return 2.0 * macs


def test_flop_count_matches_a_hand_count():
    config = _tiny_config(routed_layers=[0, 2], routing_granularity=["attention", "block"])
    for T in (1, 5, 9):
        flops = config.prefill_flops(T)
        assert flops["total"] == _hand_count(config, T, {})
        assert flops["total"] == sum(map(sum, (flops[k] for k in ("attention_projections", "attention_scores", "mlp"))
                                         )) + flops["lm_head"]
    # A routed share r: r of the projections, r^2 of the attention (routed tokens spread evenly), r of a "block"
    # layer's MLP and all of an "attention" layer's. Every other token of T = 8 routed in both layers:
    T, plan = 8, RoutingPlan.from_config(config, 0.5)
    runs = {0: (set(range(0, T, 2)), "attention"), 2: (set(range(0, T, 2)), "block")}
    dense = config.prefill_flops(T)
    projections, scores, mlp = (dense[k][0] for k in ("attention_projections", "attention_scores", "mlp"))
    # Both routed layers run q/k/v/o for 4 of 8 tokens, and 1 + 2 + 3 + 4 = 10 of the 36 attention pairs, where r^2
    # counts 9 (the T(T+1)/2 of the dense count has the diagonal): 2 layers x 2 FLOPs x 2 heads x 1 pair x (d + d).
    exact = _hand_count(config, T, runs)
    assert exact - config.prefill_flops(T, plan)["total"] == 2 * 2 * 2 * (10 - 9) * (4 + 4)
    assert config.prefill_flops(T, plan)["total"] == pytest.approx(
        dense["total"] - 2 * (0.5 * projections + 0.75 * scores) - 0.5 * mlp)
    assert plan.flop_fraction(config, T) == config.prefill_flops(T, plan)["total"] / dense["total"]
    # the r^2 rule converges on the exact count of routed pairs at long context
    one_layer = MoDConfig(vocab_size=10, hidden_size=8, intermediate_size=12, num_hidden_layers=1,
                          num_attention_heads=2, num_key_value_heads=1, head_dim=4, routed_layers=[0])
    counted = one_layer.prefill_flops(1000, RoutingPlan(1, [0], [0.5], ["attention"]))["attention_scores"][0]
    assert counted / (2 * 2 * (4 + 4) * (500 * 501 / 2)) == pytest.approx(1.0, abs=2e-3)


def test_attention_share_of_a_layer_grows_with_context():
    """SmolLM2-135M's shape: attention is about a third of a dense layer's prefill FLOPs at 512 tokens, two thirds
    at 8k (a prefill's queries see (T + 1) / 2 keys on average; a token decoded at position T sees T)."""
    config = MoDConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                       num_attention_heads=9, num_key_value_heads=3, head_dim=64)
    share = {}
    for T in (512, 2048, 4096, 8192):
        f = config.prefill_flops(T)
        attention = f["attention_projections"][0] + f["attention_scores"][0]
        share[T] = attention / (attention + f["mlp"][0])
    assert 0.25 < share[512] < share[2048] < share[4096] < share[8192] and share[8192] > 0.6


def test_plan_kv_fraction_and_scaling():
    plan = RoutingPlan(6, [1, 2, 4], [0.5, 1.0, 0.0], ["attention", "block", "attention"])
    assert plan.layer_shares() == [1.0, 0.5, 1.0, 1.0, 0.0, 1.0] and plan.kv_fraction() == 4.5 / 6
    half = plan.scaled(kv_fraction=5.25 / 6)  # half the skipped work, in the same proportions
    assert half.routed_share == pytest.approx((0.75, 1.0, 0.5)) and half.granularity == plan.granularity
    assert half.kv_fraction() == pytest.approx(5.25 / 6, abs=1e-12)
    more = plan.scaled(kv_fraction=4 / 6)  # layer 4 is skipped whole already: layer 1 takes the rest
    assert more.routed_share == pytest.approx((0.0, 1.0, 0.0))
    even = RoutingPlan(4, [0, 3], [1.0, 1.0], ["block", "block"]).scaled(kv_fraction=0.75)  # skips nothing: evenly
    assert even.routed_share == pytest.approx((0.5, 0.5))
    config = _tiny_config(routed_layers=[0, 2], routing_granularity=["attention", "block"])
    start = RoutingPlan.from_config(config, [0.6, 0.9])
    for T in (16, 4096):
        target = (1.0 + start.flop_fraction(config, T)) / 2
        scaled = start.scaled(flop_fraction=target, config=config, context_length=T)
        assert scaled.flop_fraction(config, T) == pytest.approx(target, abs=1e-9)
        assert (1 - scaled.routed_share[0]) / (1 - scaled.routed_share[1]) == pytest.approx(4.0)


def test_plan_survives_save_and_load(tmp_path):
    model = routed_model("llama", routed_layers=[0, 1, 3], routing_granularity="attention")
    plan = RoutingPlan(4, [0, 1, 3], [0.9, 0.5, 0.7], ["attention", "block", "attention"])
    fields = {k: v for k, v in model.config.to_dict().items() if k not in ("architectures", "model_type",
                                                                             "transformers_version")}
    config = MoDConfig(**{**fields, **plan.config_fields()})
    new = MoDForCausalLM(config)
    new.load_state_dict(model.state_dict())
    new.config.router_threshold = [0.2, 0.6, 0.7]  # recalibration changes thresholds, not the plan
    new.save_pretrained(tmp_path)
    stored = json.loads((tmp_path / "config.json").read_text())
    assert stored["routing_plan"] == plan.to_dict() and stored["routing_granularity"] == list(plan.granularity)
    loaded = MoDForCausalLM.from_pretrained(tmp_path).eval()
    assert RoutingPlan.from_config(loaded.config) == plan
    assert loaded.model.layers[1].skips_attention_only is False and loaded.model.layers[3].skips_attention_only
    with torch.no_grad():
        assert torch.equal(loaded(_ids()).logits, new.eval()(_ids()).logits)
    rescaled = plan.scaled(kv_fraction=0.9)
    loaded.config.routing_plan = rescaled.to_dict()  # a new budget, same layers: still valid
    loaded.config.validate()
    assert RoutingPlan.from_config(loaded.config).kv_fraction() == pytest.approx(0.9)


# --------------------------------------------------------------------------------------------------------------------
# Bad values name the field
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "routing,match",
    [
        ({"routing_granularity": "mlp"}, "routing_granularity"),
        ({"routing_granularity": ["attention", "sideways"]}, "routing_granularity"),
        ({"routing_granularity": ["attention"]}, "routing_granularity is a list of 1 values but there are 2"),
        ({"routing_plan": {"num_layers": 4, "routed_layers": [1, 3], "routed_share": [0.5, 1.5],
                           "granularity": ["block", "block"]}}, r"routing_plan\.routed_share"),
        ({"routing_plan": {"num_layers": 4, "routed_layers": [1, 3], "routed_share": [0.5, 0.5],
                           "granularity": ["block", "mlp"]}}, r"routing_plan\.granularity"),
        ({"routing_plan": {"num_layers": 4, "routed_layers": [1, 2], "routed_share": [0.5, 0.5],
                           "granularity": ["block", "block"]}}, "routing_plan .* disagrees"),
        ({"routing_plan": {"num_layers": 4, "routed_layers": [1, 3], "routed_share": [0.5, 0.5],
                           "granularity": ["attention", "block"]}}, "routing_plan .* disagrees"),
        ({"routing_plan": {"layers": [1, 3]}}, "routing_plan must be a dict with keys"),
    ],
)
def test_bad_granularity_or_plan_names_the_field(routing, match):
    with pytest.raises(StrictDataclassError, match=match):
        MoDConfig(num_hidden_layers=4, hidden_size=64, num_attention_heads=4, **routing)


def test_bad_budget_names_the_field():
    plan = RoutingPlan(4, [1, 3], [0.5, 0.5], ["attention", "block"])
    config = _tiny_config(routed_layers=[0, 2])
    with pytest.raises(ValueError, match=r"kv_fraction must lie in \(0, 1\], got 0"):
        plan.scaled(kv_fraction=0)
    with pytest.raises(ValueError, match="kv_fraction=0.4 is out of reach: this plan gives 0.5000"):
        plan.scaled(kv_fraction=0.4)
    with pytest.raises(ValueError, match="give one budget"):
        plan.scaled(flop_fraction=0.8)  # no config to count FLOPs with
    with pytest.raises(ValueError, match="give one budget"):
        plan.scaled(kv_fraction=0.8, flop_fraction=0.8, config=config, context_length=8)
    with pytest.raises(ValueError, match="context_length must be an integer >= 1"):
        config.prefill_flops(0)
    with pytest.raises(ValueError, match=r"routing_plan\.num_layers is 4, the model has 3"):
        config.prefill_flops(8, plan)
    with pytest.raises(ValueError, match=r"routing_plan\.routed_layers must be sorted indices in \[0, 3\]"):
        RoutingPlan(4, [3, 1], [0.5, 0.5], ["block", "block"])
    with pytest.raises(ValueError, match=r"routing_plan\.routed_share must be one value in \[0, 1\] per routed"):
        RoutingPlan(4, [1, 3], [0.5], ["block", "block"])


def test_attention_routing_trains_the_router_and_checkpoints():
    from modification.conversion.train import enable_checkpointing

    model = routed_model("llama", routing_granularity="attention", load_loss_coef=0.0).train()
    ids = _ids(2, 24, seed=8)
    model(ids, labels=ids).loss.backward()  # the LM loss alone reaches the router, through the attention gate
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    assert grads["model.layers.1.router.weight"].abs().sum() > 0
    model.zero_grad()
    enable_checkpointing(model)
    model(ids, labels=ids).loss.backward()
    for name, grad in grads.items():
        assert torch.allclose(grad, dict(model.named_parameters())[name].grad, atol=1e-6), name
