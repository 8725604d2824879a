"""The MoD model against the real transformers models and against a slow masked reference."""

import pytest
import torch
from helpers import ARCHS, VOCAB, left_padded_batch, reference_forward, routed_model, tiny_base
from huggingface_hub.errors import StrictDataclassError

from modification.conversion.convert import convert_model
from modification.conversion.train import enable_checkpointing
from modification.modeling import MoDConfig, MoDForCausalLM
from modification.modeling.modeling_mod import sdpa_packed_attention_forward


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("routing", [{"router_kind": "dense"}, {"router_kind": "threshold", "gate_mode": "exact"}])
def test_converted_model_matches_base(arch, routing):
    base = tiny_base(arch)
    model = convert_model(base, **routing)
    ids, mask = left_padded_batch([37, 20, 5], seed=1)
    ids2 = torch.randint(3, VOCAB, (2, 41), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = base(ids2).logits
        got = model(ids2, output_router_logits=True)
    assert got.routed_fraction.eq(1).all(), "every token must be routed right after conversion"
    assert (got.logits - expected).abs().max().item() <= 1e-5
    # left-padded batch: positions from the mask, as generate() passes them
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        expected = base(ids, attention_mask=mask, position_ids=pos).logits
        got = model(ids, attention_mask=mask, position_ids=pos).logits
    diff = (got - expected).abs().amax(-1)[mask.bool()]
    assert diff.max().item() <= 1e-5


def test_qwen2_biases_and_qwen3_qk_norm_are_used():
    qwen2 = convert_model(tiny_base("qwen2"))
    assert qwen2.model.layers[0].self_attn.q_proj.bias is not None
    assert qwen2.model.layers[0].self_attn.o_proj.bias is None
    qwen3 = convert_model(tiny_base("qwen3"))
    assert hasattr(qwen3.model.layers[0].self_attn, "q_norm") and qwen3.config.head_dim == 16


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
@pytest.mark.parametrize("gate_mode", ["scale", "exact"])
def test_gathered_computation_equals_masked_reference(arch, gate_mode):
    model = routed_model(arch, gate_mode=gate_mode)
    ids, mask = left_padded_batch([48, 31, 12], seed=2)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        out = model(ids, attention_mask=mask, position_ids=pos, output_router_decisions=True)
    ref_logits, ref_masks = reference_forward(model, ids, mask, pos)
    for layer_idx in model.config.routed_layers:
        assert torch.equal(out.router_decisions[layer_idx], ref_masks[layer_idx])
        frac = ref_masks[layer_idx][mask.bool()].float().mean().item()
        assert 0.2 < frac < 0.8, f"layer {layer_idx} routes {frac:.2f}: the test needs a real fraction skipped"
    diff = (out.logits - ref_logits).abs().amax(-1)[mask.bool()]
    assert diff.max().item() <= 1e-5


def test_topk_routing_equals_reference_and_has_fixed_capacity():
    model = routed_model("llama", router_kind="topk", topk_capacity=0.25, gate_mode="scale")
    ids = torch.randint(3, VOCAB, (2, 40), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        out = model(ids, output_router_decisions=True, labels=ids)
    ref_logits, ref_masks = reference_forward(model, ids)
    for layer_idx in model.config.routed_layers:
        assert torch.equal(out.router_decisions[layer_idx], ref_masks[layer_idx])
        assert out.router_decisions[layer_idx].sum(1).tolist() == [10, 10]
    assert (out.logits - ref_logits).abs().max().item() <= 1e-5
    assert out.aux_loss is not None and out.aux_loss.item() > 0  # the BCE that trains the causal predictor


def test_load_loss_is_exposed_and_added_to_loss():
    model = routed_model("llama", load_loss_coef=0.5)
    ids = torch.randint(3, VOCAB, (2, 30), generator=torch.Generator().manual_seed(6))
    out = model(ids, labels=ids)
    assert out.router_logits is None and out.aux_loss is None  # returned only on request, as in Mixtral
    out2 = model(ids, labels=ids, output_router_logits=True)
    assert len(out2.router_logits) == len(model.config.routed_layers)  # one per routed layer
    frac = out2.routed_fraction[model.config.routed_layers]
    mean_gates = torch.stack([logits.sigmoid().mean() for logits in out2.router_logits])
    assert torch.allclose(out2.aux_loss, (frac * mean_gates).sum(), atol=1e-6)  # raw, as Mixtral's
    assert model.config.router_aux_loss_coef == 0.5
    assert torch.allclose(out2.loss, out2.lm_loss + 0.5 * out2.aux_loss)
    assert torch.allclose(out.loss, out2.loss)
    out.loss.backward()
    router = model.model.layers[1].router
    assert router.weight.grad is not None and router.weight.grad.abs().sum() > 0


def test_exact_gate_passes_gradient_to_router_from_lm_loss():
    model = routed_model("llama", gate_mode="exact", load_loss_coef=0.0)
    ids = torch.randint(3, VOCAB, (2, 30), generator=torch.Generator().manual_seed(7))
    out = model(ids, labels=ids, output_router_logits=True)
    assert torch.equal(out.loss, out.lm_loss)  # load_loss_coef=0: the LM loss alone
    out.loss.backward()
    assert model.model.layers[1].router.weight.grad.abs().sum() > 0


def test_gradient_checkpointing_matches():
    model = routed_model("llama").train()
    ids = torch.randint(3, VOCAB, (2, 24), generator=torch.Generator().manual_seed(8))
    model(ids, labels=ids).loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    enable_checkpointing(model)
    model(ids, labels=ids).loss.backward()
    for name, grad in grads.items():
        assert torch.allclose(grad, dict(model.named_parameters())[name].grad, atol=1e-6), name


def test_packed_attention_matches_per_sequence_sdpa():
    gen = torch.Generator().manual_seed(0)
    q_lens, k_lens = [3, 1, 5], [7, 1, 5]
    q = torch.randn(sum(q_lens), 4, 8, generator=gen)
    k = torch.randn(sum(k_lens), 2, 8, generator=gen)
    v = torch.randn(sum(k_lens), 2, 8, generator=gen)
    cu_q = torch.tensor([0, 3, 4, 9])
    cu_k = torch.tensor([0, 7, 8, 13])
    packed = [t.transpose(0, 1).unsqueeze(0) for t in (q, k, v)]  # the attention interface's layout, batch of one
    out, _ = sdpa_packed_attention_forward(None, *packed, None, 8**-0.5, cu_seq_lens_q=cu_q, cu_seq_lens_k=cu_k,
                                           max_length_q=5, max_length_k=7)
    out = out[0]
    for i in range(3):
        qi, ki, vi = q[cu_q[i]:cu_q[i + 1]], k[cu_k[i]:cu_k[i + 1]], v[cu_k[i]:cu_k[i + 1]]
        ki, vi = ki.repeat_interleave(2, 1), vi.repeat_interleave(2, 1)
        scores = torch.einsum("qhd,khd->hqk", qi, ki) * 8**-0.5
        offset = k_lens[i] - q_lens[i]
        allowed = torch.arange(k_lens[i])[None] <= torch.arange(q_lens[i])[:, None] + offset
        ref = torch.einsum("hqk,khd->qhd", scores.masked_fill(~allowed, float("-inf")).softmax(-1), vi)
        assert torch.allclose(out[cu_q[i]:cu_q[i + 1]], ref, atol=1e-6)


@pytest.mark.parametrize(
    "field,value,match",
    [
        ("router_threshold", 1.5, "router_threshold"),
        ("router_threshold", 0.0, "router_threshold"),
        ("routed_layers", [1, 9], "routed_layers"),
        ("router_kind", "random", "router_kind"),
        ("gate_mode", "soft", "gate_mode"),
        ("topk_capacity", 0.0, "topk_capacity"),
        ("router_threshold", [0.5, 0.5, 0.5], "router_threshold"),
    ],
)
def test_bad_routing_config_names_the_field(field, value, match):
    with pytest.raises(StrictDataclassError, match=match):  # transformers 5 configs validate through @strict
        MoDConfig(num_hidden_layers=4, hidden_size=64, num_attention_heads=4, **{field: value})


def test_attention_weights_are_refused_clearly():
    model = routed_model("llama")
    with pytest.raises(ValueError, match="cannot return attention weights"):
        model(torch.randint(3, VOCAB, (1, 8)), output_attentions=True)


def test_per_layer_thresholds():
    config = MoDConfig(num_hidden_layers=4, hidden_size=64, num_attention_heads=4, router_threshold=[0.3, 0.7])
    model = MoDForCausalLM(config)
    assert model.model.layers[1].router.threshold == 0.3 and model.model.layers[3].router.threshold == 0.7
    assert [i for i, layer in enumerate(model.model.layers) if hasattr(layer, "router")] == [1, 3]
