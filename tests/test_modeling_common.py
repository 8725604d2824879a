"""MoD against transformers' conventions: a model tester with common model tests and generation tests, in the style
of transformers' own `ModelTesterMixin` / `GenerationTesterMixin` (written for this package), run on a dense, a
threshold-routed and a top-k-routed configuration. Deliberate differences are listed in the README ("Differences
from transformers models") and skipped here with the same reason."""

from __future__ import annotations

import copy
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from helpers import randomize_routers
from transformers import AutoModelForCausalLM, DynamicCache, Trainer, TrainingArguments

from modification.modeling import MoDCache, MoDConfig, MoDForCausalLM, MoDModel
from modification.modeling.modeling_mod import MoDAttention, MoDRouter, sdpa_packed_attention_forward


class MoDModelTester:
    """Tiny configurations and inputs for one router kind."""

    def __init__(self, router_kind: str, batch_size: int = 3, seq_length: int = 11, vocab_size: int = 99,
                 num_hidden_layers: int = 4, seed: int = 0):
        self.router_kind = router_kind
        self.batch_size = batch_size
        self.seq_length = seq_length
        self.vocab_size = vocab_size
        self.num_hidden_layers = num_hidden_layers
        self.seed = seed

    def get_config(self, **overrides) -> MoDConfig:
        fields = dict(
            vocab_size=self.vocab_size, hidden_size=32, intermediate_size=37, num_hidden_layers=self.num_hidden_layers,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, initializer_range=0.1,
            pad_token_id=0, bos_token_id=1, eos_token_id=2, router_kind=self.router_kind, topk_capacity=0.5,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        )
        fields.update(overrides)
        return MoDConfig(**fields)

    def create_model(self, model_class=MoDForCausalLM, config: MoDConfig | None = None) -> torch.nn.Module:
        """A model with routers that skip about half of the tokens (the freshly initialised ones route all)."""
        torch.manual_seed(self.seed)
        model = model_class(config or self.get_config())
        randomize_routers(model if model_class is MoDForCausalLM else _Wrap(model), seed=self.seed)
        return model.eval()

    def prepare_config_and_inputs_for_common(self) -> tuple[MoDConfig, dict]:
        gen = torch.Generator().manual_seed(self.seed)
        input_ids = torch.randint(3, self.vocab_size, (self.batch_size, self.seq_length), generator=gen)
        return self.get_config(), {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}

    def left_padded_inputs(self, lengths: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        gen = torch.Generator().manual_seed(self.seed + 1)
        width = max(lengths)
        ids = torch.zeros(len(lengths), width, dtype=torch.long)
        mask = torch.zeros(len(lengths), width, dtype=torch.long)
        for i, n in enumerate(lengths):
            ids[i, width - n:] = torch.randint(3, self.vocab_size, (n,), generator=gen)
            mask[i, width - n:] = 1
        return ids, mask


class _Wrap:
    """Lets `randomize_routers` reach the layers of a bare `MoDModel`."""

    def __init__(self, model):
        self.model = model


def _generate(model, **kwargs):
    kwargs.setdefault("max_new_tokens", 5)
    kwargs.setdefault("pad_token_id", 0)
    kwargs.setdefault("eos_token_id", None)
    with torch.no_grad():
        return model.generate(**kwargs)


class ModelTesterMixin:
    model_tester: MoDModelTester
    all_model_classes = (MoDModel, MoDForCausalLM)

    def test_config_round_trip(self, tmp_path):
        config, _ = self.model_tester.prepare_config_and_inputs_for_common()
        config.save_pretrained(tmp_path)
        loaded = MoDConfig.from_pretrained(tmp_path)
        assert loaded.to_dict() == config.to_dict()
        assert MoDConfig.from_dict(config.to_dict()).to_json_string() == config.to_json_string()
        assert loaded.keys_to_ignore_at_inference == MoDConfig.keys_to_ignore_at_inference

    @pytest.mark.parametrize("model_class", (MoDModel, MoDForCausalLM))
    def test_save_load(self, tmp_path, model_class):
        config, inputs = self.model_tester.prepare_config_and_inputs_for_common()
        model = self.model_tester.create_model(model_class, config)
        with torch.no_grad():
            first = model(**inputs)[0]
        model.save_pretrained(tmp_path)
        loaded = model_class.from_pretrained(tmp_path).eval()
        for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
            assert torch.equal(a, b), name
        with torch.no_grad():
            assert torch.equal(first, loaded(**inputs)[0])
        # The saved folder carries its code: it loads through the Auto classes with trust_remote_code.
        if model_class is MoDForCausalLM:
            remote = AutoModelForCausalLM.from_pretrained(tmp_path, trust_remote_code=True).eval()
            assert type(remote).__module__.startswith("transformers_modules")
            with torch.no_grad():
                assert torch.equal(first, remote(**inputs)[0])

    def test_router_state_dict_names_and_kinds(self):
        model = self.model_tester.create_model()
        config = model.config
        router_keys = sorted(k for k in model.state_dict() if ".router." in k)
        assert router_keys == sorted(
            f"model.layers.{i}.router.{p}" for i in config.routed_layers for p in ("bias", "weight"))
        expected = {"threshold": "ThresholdRouter", "topk": "TopKRouter", "dense": "DenseRouter"}[config.router_kind]
        for i, layer in enumerate(model.model.layers):
            assert hasattr(layer, "router") == (i in config.routed_layers)
            if hasattr(layer, "router"):
                assert type(layer.router).__name__ == expected and isinstance(layer.router, MoDRouter)

    def test_model_outputs_equivalence(self):
        config, inputs = self.model_tester.prepare_config_and_inputs_for_common()
        model = self.model_tester.create_model(config=config)
        labels = inputs["input_ids"]
        with torch.no_grad():
            for kwargs in ({}, {"labels": labels}, {"output_hidden_states": True},
                           {"labels": labels, "use_cache": False},
                           {"output_router_logits": True, "labels": labels}, {"output_router_decisions": True}):
                as_dict = model(**inputs, **kwargs)
                as_tuple = model(**inputs, **kwargs, return_dict=False)
                assert isinstance(as_tuple, tuple) and len(as_tuple) == len(as_dict.to_tuple())
                for a, b in zip(as_dict.to_tuple(), as_tuple):
                    if isinstance(a, torch.Tensor):
                        assert torch.equal(a, b)

    def test_tuple_order_is_transformers_order(self):
        config, inputs = self.model_tester.prepare_config_and_inputs_for_common()
        model = self.model_tester.create_model(config=config)
        labels = inputs["input_ids"]
        with torch.no_grad():
            logits, cache = model(**inputs, return_dict=False)  # as Llama: (logits, cache) without labels
            assert logits.shape[-1] == config.vocab_size and isinstance(cache, MoDCache)
            loss, logits, cache = model(**inputs, labels=labels, return_dict=False)  # loss first with labels
            assert loss.dim() == 0 and logits.dim() == 3
            assert len(model(**inputs, use_cache=False, return_dict=False)) == 1
            out = model(**inputs)
            assert out.attentions is None  # the field exists, as on every transformers output
            # config.return_dict=False is honoured by the head model and the base model alike
            model.config.return_dict = False
            assert isinstance(model(**inputs), tuple) and isinstance(model.model(**inputs), tuple)
            model.config.return_dict = True
            hidden, cache = model.model(**inputs, return_dict=False)
            assert hidden.shape == (*inputs["input_ids"].shape, config.hidden_size)

    def test_hidden_states_output(self):
        config, inputs = self.model_tester.prepare_config_and_inputs_for_common()
        model = self.model_tester.create_model(config=config)
        with torch.no_grad():
            out = model(**inputs, output_hidden_states=True)
            base = model.model(**inputs)
        assert len(out.hidden_states) == config.num_hidden_layers + 1
        assert all(h.shape == (*inputs["input_ids"].shape, config.hidden_size) for h in out.hidden_states)
        assert torch.equal(out.hidden_states[0], model.model.embed_tokens(inputs["input_ids"]))
        assert torch.equal(out.hidden_states[-1], base.last_hidden_state)  # the last one is after the final norm
        model.config.output_hidden_states = True
        with torch.no_grad():
            assert len(model(**inputs).hidden_states) == config.num_hidden_layers + 1
        model.config.output_hidden_states = False

    def test_attention_weights_are_refused_clearly(self):
        config, inputs = self.model_tester.prepare_config_and_inputs_for_common()
        model = self.model_tester.create_model(config=config)
        for module in (model, model.model):
            with pytest.raises(ValueError, match="cannot return attention weights"):
                module(**inputs, output_attentions=True)
        model.config.output_attentions = True  # accepted when set, as by every config, but not silently ignored:
        for module in (model, model.model):
            with pytest.raises(ValueError, match="cannot return attention weights"):
                module(**inputs)
        model.config.output_attentions = False

    @pytest.mark.parametrize("model_class", (MoDModel, MoDForCausalLM))
    def test_inputs_embeds_matches_input_ids(self, model_class):
        config, inputs = self.model_tester.prepare_config_and_inputs_for_common()
        model = self.model_tester.create_model(model_class, config)
        embeds = model.get_input_embeddings()(inputs["input_ids"])
        with torch.no_grad():
            from_ids = model(**inputs)[0]
            from_embeds = model(inputs_embeds=embeds, attention_mask=inputs["attention_mask"])[0]
        assert torch.equal(from_ids, from_embeds)
        with pytest.raises(ValueError, match="exactly one"):
            model(input_ids=inputs["input_ids"], inputs_embeds=embeds)

    @pytest.mark.parametrize("tie", [False, True])
    def test_resize_tokens_embeddings(self, tie):
        config = self.model_tester.get_config(tie_word_embeddings=tie)
        model = self.model_tester.create_model(config=config)
        _, inputs = self.model_tester.prepare_config_and_inputs_for_common()
        with torch.no_grad():
            before = model(**inputs).logits
        vocab = config.vocab_size
        model.resize_token_embeddings(vocab + 10)
        assert model.config.vocab_size == vocab + 10
        assert model.get_input_embeddings().weight.shape[0] == vocab + 10
        assert model.get_output_embeddings().weight.shape[0] == vocab + 10
        with torch.no_grad():
            after = model(**inputs).logits
            model(torch.full((1, 3), vocab + 9))  # the new ids embed and run
        assert torch.equal(after[..., :vocab], before)  # old tokens are untouched
        model.resize_token_embeddings(vocab - 15)
        assert model.get_output_embeddings().weight.shape[0] == vocab - 15
        if tie:
            assert model.get_output_embeddings().weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()

    def test_gradient_checkpointing_matches(self):
        config, inputs = self.model_tester.prepare_config_and_inputs_for_common()
        model = self.model_tester.create_model(config=config).train()
        labels = inputs["input_ids"]
        model(**inputs, labels=labels).loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        model.zero_grad()
        model.activation_checkpointing_enable()  # transformers 5's name for gradient checkpointing
        assert model.is_activation_checkpointing
        out = model(**inputs, labels=labels)
        assert out.cache is None  # no cache while checkpointing: a replayed layer would write it twice
        out.loss.backward()
        for name, param in model.named_parameters():
            if name in grads:
                assert torch.allclose(grads[name], param.grad, atol=1e-6), name
        model.activation_checkpointing_disable()
        assert not model.is_activation_checkpointing

    def test_training_gives_every_trainable_parameter_a_gradient(self):
        config, inputs = self.model_tester.prepare_config_and_inputs_for_common()
        model = self.model_tester.create_model(config=config).train()
        model(**inputs, labels=inputs["input_ids"]).loss.backward()
        missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
        assert not missing
        routers = [p for n, p in model.named_parameters() if ".router." in n]
        if config.router_kind == "dense":  # kept for the weights, frozen: DDP needs every trainable param to get a grad
            assert routers and not any(p.requires_grad for p in routers)
        else:
            assert all(p.requires_grad and p.grad.abs().sum() > 0 for p in routers)

    def test_left_padding_compatibility(self):
        model = self.model_tester.create_model()
        lengths = [9, 4, 7]
        ids, mask = self.model_tester.left_padded_inputs(lengths)
        position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
        with torch.no_grad():
            padded = model(ids, attention_mask=mask, position_ids=position_ids).logits[:, -1]
            for i, n in enumerate(lengths):
                alone = model(ids[i:i + 1, -n:]).logits[0, -1]
                torch.testing.assert_close(padded[i], alone, atol=1e-5, rtol=1e-5)

    def test_torch_compile_matches_eager(self):
        # `_can_compile_fullgraph` is False (routing makes shapes data-dependent): compile with graph breaks.
        config, inputs = self.model_tester.prepare_config_and_inputs_for_common()
        model = self.model_tester.create_model(config=config)
        torch._dynamo.reset()
        compiled = torch.compile(model, backend="aot_eager")
        with torch.no_grad():
            expected = model(**inputs, use_cache=False).logits
            got = compiled(**inputs, use_cache=False).logits
        torch.testing.assert_close(got, expected)

    def test_output_router_logits_mixtral_convention(self):
        config, inputs = self.model_tester.prepare_config_and_inputs_for_common()
        model = self.model_tester.create_model(config=config)
        labels = inputs["input_ids"]
        with torch.no_grad():
            plain = model(**inputs, labels=labels)
            out = model(**inputs, labels=labels, output_router_logits=True)
        routed = config.routed_layers  # dense too: its routers score the tokens, every token runs
        assert len(out.router_logits) == len(routed)
        hidden = model(**inputs, output_hidden_states=True).hidden_states
        for logits, i in zip(out.router_logits, routed):  # raw logits of the router, float32, [batch, seq]
            assert logits.dtype == torch.float32 and logits.shape == inputs["input_ids"].shape
            torch.testing.assert_close(logits, model.model.layers[i].router.score(hidden[i]))
        assert out.routed_fraction.shape == (config.num_hidden_layers,)
        if config.router_kind != "dense":
            coef = config.router_aux_loss_coef
            assert coef == (config.topk_aux_loss_coef if config.router_kind == "topk" else config.load_loss_coef)
            torch.testing.assert_close(out.loss, out.lm_loss + coef * out.aux_loss)
            torch.testing.assert_close(plain.loss, out.loss)  # the objective trains routers with or without the flag
        else:
            assert out.aux_loss is None and torch.equal(out.loss, out.lm_loss)
        # the config default, as Mixtral's
        model.config.output_router_logits = True
        with torch.no_grad():
            assert len(model(**inputs).router_logits) == len(routed)
        model.config.output_router_logits = False
        # MoD's own flag still gives the decisions too
        with torch.no_grad():
            detailed = model(**inputs, output_router_decisions=True)
        assert len(detailed.router_decisions) == config.num_hidden_layers
        assert len(detailed.router_logits) == len(routed)

    def test_trainer_train_and_evaluate_with_compute_metrics(self, tmp_path):
        config, inputs = self.model_tester.prepare_config_and_inputs_for_common()
        model = self.model_tester.create_model(config=config)
        rows = [{"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
                for ids in inputs["input_ids"]]
        seen = {}

        def compute_metrics(eval_pred):
            seen["predictions"] = eval_pred.predictions
            predictions = np.asarray(eval_pred.predictions)
            return {"accuracy": float((predictions[:, :-1].argmax(-1) == eval_pred.label_ids[:, 1:]).mean())}

        args = TrainingArguments(
            output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=2, per_device_eval_batch_size=2,
            learning_rate=1e-3, report_to=[], use_cpu=True, save_strategy="no", logging_steps=1, disable_tqdm=True,
        )
        trainer = Trainer(model=model, args=args, train_dataset=rows, eval_dataset=rows,
                          compute_metrics=compute_metrics)
        trainer.train()
        metrics = trainer.evaluate()
        # compute_metrics gets the logits alone, not a tuple with the routing outputs
        assert isinstance(seen["predictions"], np.ndarray)
        assert seen["predictions"].shape == (len(rows), self.model_tester.seq_length, config.vocab_size)
        assert "eval_accuracy" in metrics and np.isfinite(metrics["eval_loss"])

    def test_foreign_caches_are_rejected_clearly(self):
        config, inputs = self.model_tester.prepare_config_and_inputs_for_common()
        model = self.model_tester.create_model(config=config)
        with pytest.raises(TypeError, match="need a MoDCache, got a DynamicCache"):
            model(**inputs, cache=DynamicCache(config=config))
        with pytest.raises(TypeError, match="need a MoDCache, got a DynamicCache"):
            model(**inputs, past_key_values=DynamicCache(config=config))  # the deprecated name too
        with pytest.raises(NotImplementedError, match="continuous batching"):
            model.generate_batch(inputs=[[5, 6, 7]])
        with pytest.raises(ValueError, match="cache_implementation='static'"):
            _generate(model, input_ids=inputs["input_ids"], cache_implementation="static")

    def test_cache_goes_through_its_api(self):
        """Attention writes K/V through `update`, the model advances the seen length once per forward."""
        calls = {"update": 0, "advance": []}

        class CountingCache(MoDCache):
            def update(self, *args, **kwargs):
                calls["update"] += 1
                return super().update(*args, **kwargs)

            def advance(self, num_tokens):
                calls["advance"].append(num_tokens)
                super().advance(num_tokens)

        config, inputs = self.model_tester.prepare_config_and_inputs_for_common()
        model = self.model_tester.create_model(config=config)
        cache = CountingCache(config=config)
        with torch.no_grad():
            out = model(**inputs, cache=cache, output_router_decisions=True)
        ran_layers = sum(bool(d.any()) for d in out.router_decisions)
        assert calls == {"update": ran_layers, "advance": [self.model_tester.seq_length]}
        assert cache.get_seq_length() == self.model_tester.seq_length
        assert cache.cached_tokens() == [int(d.sum()) for d in out.router_decisions]
        kv = cache.layers[0]
        assert cache.kv_bytes() >= 2 * kv.keys.numel() * kv.keys.element_size()

    def test_attention_runs_with_head_sharded_projections(self):
        """Tensor parallelism (`tp_plan`) shards q/k/v column-wise and o row-wise: each rank holds half the heads, and
        attention must take its head count from the projections, not from the config."""
        config, inputs = self.model_tester.prepare_config_and_inputs_for_common()
        model = self.model_tester.create_model(config=config)
        for layer in model.model.layers:
            attn = layer.self_attn
            for name in ("q_proj", "k_proj", "v_proj"):
                full = getattr(attn, name)
                setattr(attn, name, torch.nn.Linear(config.hidden_size, full.out_features // 2, bias=False))
            attn.o_proj = torch.nn.Linear(attn.o_proj.in_features // 2, config.hidden_size, bias=False)
        with torch.no_grad():
            assert model(**inputs).logits.shape == (*inputs["input_ids"].shape, config.vocab_size)


class GenerationTesterMixin:
    model_tester: MoDModelTester
    # Top-k routing is non-causal in prefill (a token's rank depends on later tokens) and decodes with the causal
    # rule: generating with a cache is not the same as recomputing every step without one (see the README).
    cache_equals_recompute = True

    def _skip_if_first_forward_changes_routing(self):
        if not self.cache_equals_recompute:
            pytest.skip("top-k routing is non-causal in prefill: assisted decoding's first forward routes the prompt "
                        "together with the first draft tokens, so its tokens differ from greedy decoding's")

    def _prompt(self, batch_size: int = 2):
        _, inputs = self.model_tester.prepare_config_and_inputs_for_common()
        return inputs["input_ids"][:batch_size], inputs["attention_mask"][:batch_size]

    def _check_cache_equals_recompute(self, **kwargs):
        if not self.cache_equals_recompute:
            pytest.skip("top-k routing decodes with the causal rule: cached generation differs from recomputation")
        model = self.model_tester.create_model()
        ids, mask = self._prompt()
        torch.manual_seed(0)
        cached = _generate(model, input_ids=ids, attention_mask=mask, **kwargs)
        torch.manual_seed(0)
        recomputed = _generate(model, input_ids=ids, attention_mask=mask, use_cache=False, **kwargs)
        assert torch.equal(cached, recomputed)
        return cached

    def test_greedy_generate_equals_recompute(self):
        out = self._check_cache_equals_recompute(do_sample=False)
        assert out.shape == (2, self.model_tester.seq_length + 5)

    def test_sample_generate_equals_recompute(self):
        out = self._check_cache_equals_recompute(do_sample=True, top_k=10, num_return_sequences=2)
        assert out.shape == (4, self.model_tester.seq_length + 5)

    def test_beam_search_equals_recompute(self):
        out = self._check_cache_equals_recompute(do_sample=False, num_beams=3, num_return_sequences=2)
        assert out.shape == (4, self.model_tester.seq_length + 5)

    def test_beam_sample_equals_recompute(self):
        self._check_cache_equals_recompute(do_sample=True, num_beams=2)

    def test_generate_dict_outputs(self):
        model = self.model_tester.create_model()
        ids, mask = self._prompt()
        out = _generate(model, input_ids=ids, attention_mask=mask, do_sample=False, return_dict_in_generate=True,
                        output_scores=True, output_logits=True, output_hidden_states=True)
        plain = _generate(model, input_ids=ids, attention_mask=mask, do_sample=False)
        assert torch.equal(out.sequences, plain)
        assert len(out.scores) == len(out.logits) == len(out.hidden_states) == 5
        assert out.logits[0].shape == (2, self.model_tester.vocab_size)
        assert len(out.hidden_states[0]) == self.model_tester.num_hidden_layers + 1
        assert out.hidden_states[0][0].shape[1] == self.model_tester.seq_length  # prefill, then one token per step
        assert out.hidden_states[1][0].shape[1] == 1
        assert isinstance(out.cache, MoDCache)
        with pytest.raises(ValueError, match="cannot return attention weights"):
            _generate(model, input_ids=ids, attention_mask=mask, output_attentions=True, return_dict_in_generate=True)

    def test_batched_left_padded_generate_equals_one_by_one(self):
        model = self.model_tester.create_model()
        lengths = [9, 4, 7]
        ids, mask = self.model_tester.left_padded_inputs(lengths)
        batched = _generate(model, input_ids=ids, attention_mask=mask, do_sample=False)
        for i, n in enumerate(lengths):
            alone = _generate(model, input_ids=ids[i:i + 1, -n:], do_sample=False)
            assert torch.equal(alone[0, -5:], batched[i, -5:])

    def test_generate_from_inputs_embeds(self):
        model = self.model_tester.create_model()
        ids, mask = self._prompt()
        from_ids = _generate(model, input_ids=ids, attention_mask=mask, do_sample=False)
        embeds = model.get_input_embeddings()(ids)
        from_embeds = _generate(model, inputs_embeds=embeds, attention_mask=mask, do_sample=False)
        assert torch.equal(from_embeds, from_ids[:, ids.shape[1]:])  # generate returns only new tokens for embeds

    def test_generate_continues_from_returned_cache(self):
        model = self.model_tester.create_model()
        ids, mask = self._prompt(batch_size=1)
        full = _generate(model, input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=6)
        first = _generate(model, input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=3,
                          return_dict_in_generate=True)
        cache = first.cache
        more = _generate(model, input_ids=first.sequences, attention_mask=torch.ones_like(first.sequences),
                         cache=cache, do_sample=False, max_new_tokens=3)
        assert torch.equal(more, full)

    def test_assisted_decoding_matches_greedy(self):
        self._skip_if_first_forward_changes_routing()
        model = self.model_tester.create_model()
        assistant = copy.deepcopy(model)
        with torch.no_grad():  # a different draft model, so that some candidates are rejected
            for p in assistant.parameters():
                p.add_(torch.randn_like(p) * 0.05)
        ids, mask = self._prompt(batch_size=1)
        greedy = _generate(model, input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=8)
        assisted = _generate(model, input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=8,
                             assistant_model=assistant)
        assert torch.equal(assisted, greedy)

    def test_prompt_lookup_decoding_matches_greedy(self):
        self._skip_if_first_forward_changes_routing()
        model = self.model_tester.create_model()
        ids = torch.tensor([[5, 6, 7, 8, 5, 6, 7, 8, 5, 6, 7]])  # repeats, so that lookups propose candidates
        greedy = _generate(model, input_ids=ids, do_sample=False, max_new_tokens=8)
        lookup = _generate(model, input_ids=ids, do_sample=False, max_new_tokens=8, prompt_lookup_num_tokens=3)
        assert torch.equal(lookup, greedy)


class TestDenseMoD(ModelTesterMixin, GenerationTesterMixin):
    model_tester = MoDModelTester("dense")

    def test_export(self):
        config, inputs = self.model_tester.prepare_config_and_inputs_for_common()
        model = self.model_tester.create_model(config=config)
        ids = inputs["input_ids"]
        exported = torch.export.export(model, args=(), kwargs={"input_ids": ids, "use_cache": False}, strict=False)
        with torch.no_grad():
            torch.testing.assert_close(exported.module()(input_ids=ids, use_cache=False).logits,
                                       model(ids, use_cache=False).logits)

    def test_trains_under_plain_ddp(self, tmp_path):
        """DistributedDataParallel with its default `find_unused_parameters=False` needs every trainable parameter to
        get a gradient in every step. The process group lives in a process of its own, on loopback, with a timeout:
        a gloo group that waits forever cannot hang the suite."""
        config, inputs = self.model_tester.prepare_config_and_inputs_for_common()
        model = self.model_tester.create_model(config=config)
        model.save_pretrained(tmp_path / "model")
        torch.save(inputs, tmp_path / "inputs.pt")
        script = f"""
import datetime, torch, torch.distributed as dist
from modification.modeling import MoDForCausalLM
dist.init_process_group("gloo", init_method="file://{tmp_path / 'store'}", rank=0, world_size=1,
                        timeout=datetime.timedelta(seconds=60))
try:
    model = torch.nn.parallel.DistributedDataParallel(MoDForCausalLM.from_pretrained("{tmp_path / 'model'}").train())
    inputs = torch.load("{tmp_path / 'inputs.pt'}")
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    for _ in range(3):
        model(**inputs, labels=inputs["input_ids"]).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
finally:
    dist.destroy_process_group()
print("trained")
"""
        env = {**os.environ, "GLOO_SOCKET_IFNAME": "lo", "MASTER_ADDR": "127.0.0.1", "OMP_NUM_THREADS": "1"}
        proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=180, env=env)
        assert proc.returncode == 0 and "trained" in proc.stdout, proc.stderr[-3000:]


class TestThresholdMoD(ModelTesterMixin, GenerationTesterMixin):
    model_tester = MoDModelTester("threshold")


class TestTopKMoD(ModelTesterMixin, GenerationTesterMixin):
    model_tester = MoDModelTester("topk")
    cache_equals_recompute = False

    def test_cached_decoding_uses_the_causal_rule(self):
        """What top-k generation does instead: the prompt is routed top-k, every new token by `sigmoid >= p`."""
        model = self.model_tester.create_model()
        ids, mask = self._prompt()
        with torch.no_grad():
            prefill = model(ids, attention_mask=mask, output_router_decisions=True)
            step = model(ids[:, :1], cache=prefill.cache, attention_mask=torch.cat([mask, mask[:, :1]], 1),
                         output_router_decisions=True)
        for i in model.config.routed_layers:
            capacity = int(np.ceil(self.model_tester.seq_length * model.config.topk_capacity))
            assert prefill.router_decisions[i].sum(1).tolist() == [capacity] * 2
        for logits, i in zip(step.router_logits, model.config.routed_layers):
            assert torch.equal(step.router_decisions[i], logits.sigmoid() >= model.model.layers[i].router.threshold)


def test_config_validates_on_construction_update_and_save(tmp_path):
    from huggingface_hub.errors import StrictDataclassError

    tester = MoDModelTester("threshold")
    with pytest.raises(StrictDataclassError, match="router_threshold"):
        tester.get_config(router_threshold=2.0)
    config = tester.get_config()
    with pytest.raises(StrictDataclassError, match="router_threshold"):
        config.router_threshold = 2.0
    with pytest.raises(StrictDataclassError, match="router_threshold"):
        config.update({"router_threshold": 1.5})
    with pytest.raises(StrictDataclassError, match="router_kind"):
        config.router_kind = "random"
    config.router_threshold = [0.4, 0.6]
    config.router_threshold[1] = 2.0  # changed in place: no setter runs, so saving checks it
    with pytest.raises(StrictDataclassError, match="router_threshold"):
        config.save_pretrained(tmp_path / "bad")
    assert not (tmp_path / "bad" / "config.json").exists()
    config.router_threshold = [0.4, 0.6]
    config.routed_layers = [1, 7]  # only the whole config knows there are 4 layers
    with pytest.raises(StrictDataclassError, match="routed_layers"):
        config.validate()


def test_router_aux_loss_coef_is_the_coefficient_of_the_router_kind():
    tester = MoDModelTester("threshold")
    config = tester.get_config(load_loss_coef=0.2, topk_aux_loss_coef=0.3)
    assert config.router_aux_loss_coef == 0.2
    config.router_aux_loss_coef = 0.5
    assert config.load_loss_coef == 0.5
    assert MoDModelTester("topk").get_config(topk_aux_loss_coef=0.3).router_aux_loss_coef == 0.3
    assert tester.get_config(router_aux_loss_coef=0.7).load_loss_coef == 0.7  # accepted on construction too


class TestAttentionImplementations:
    """Attention goes through transformers' attention-interface registry and is chosen once, by name."""

    def _model_and_inputs(self):
        tester = MoDModelTester("threshold")
        _, inputs = tester.prepare_config_and_inputs_for_common()
        ids, mask = tester.left_padded_inputs([9, 4, 7])
        return tester.create_model(), {"input_ids": ids, "attention_mask": mask}

    def test_set_attn_implementation_switches_the_function_once(self, monkeypatch):
        import modification.modeling.modeling_mod as mm

        model, inputs = self._model_and_inputs()
        assert model.config._attn_implementation == "sdpa"
        with torch.no_grad():
            expected = model(**inputs).logits
        model.set_attn_implementation("eager")
        assert model.config._attn_implementation == "eager"
        attention_layers = [m for m in model.modules() if isinstance(m, MoDAttention)]
        assert all(m.attention_function is sdpa_packed_attention_forward for m in attention_layers)
        # chosen once: forward calls never look the backend up again
        monkeypatch.setattr(mm, "resolve_attention_function", lambda name: pytest.fail("looked up per call"))
        with torch.no_grad():
            assert torch.equal(model(**inputs).logits, expected)
        monkeypatch.undo()
        model.set_attn_implementation("sdpa")
        assert model.config._attn_implementation == "sdpa"
        loaded_eager = MoDModelTester("threshold").create_model(
            config=MoDModelTester("threshold").get_config(attn_implementation="eager"))
        assert loaded_eager.config._attn_implementation == "eager"

    def test_unavailable_or_unsuitable_implementations_are_refused(self):
        model, _ = self._model_and_inputs()
        with pytest.raises(ImportError, match="FlashAttention2"):
            model.set_attn_implementation("flash_attention_2")  # flash-attn is not installed here
        with pytest.raises(ImportError, match="torch_varlen.*CUDA"):
            model.set_attn_implementation("torch_varlen")
        with pytest.raises(ValueError, match="flex_attention"):
            model.set_attn_implementation("flex_attention")
        with pytest.raises(ValueError, match="cannot run MoD's packed"):
            model.set_attn_implementation("paged|eager")
        assert model.config._attn_implementation == "sdpa"  # a refused request changes nothing

    def test_flash_attention_path_matches_exact_path(self, monkeypatch):
        """`flash_attention_2` runs transformers' `flash_attention_forward` in its padding-free varlen mode; here its
        kernel is replaced by a CPU twin (the exact path) to check the arguments MoD passes."""
        import transformers.modeling_flash_attention_utils as fa_utils
        import transformers.modeling_utils as modeling_utils

        calls = []

        def flash_attn_varlen_twin(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                                   softmax_scale=None, causal=False):
            assert causal and cu_seqlens_q.dtype == torch.int32 and q.dim() == 3
            calls.append(max_seqlen_q)
            out, _ = sdpa_packed_attention_forward(
                None, *(t.transpose(0, 1).unsqueeze(0) for t in (q, k, v)), None, softmax_scale, dropout_p,
                cu_seq_lens_q=cu_seqlens_q, cu_seq_lens_k=cu_seqlens_k, max_length_q=max_seqlen_q,
                max_length_k=max_seqlen_k)
            return out[0]

        process = fa_utils._lazy_define_process_function(flash_attn_varlen_twin)
        twin = ((None, flash_attn_varlen_twin, None, None, None), (process, dict))
        monkeypatch.setattr(fa_utils, "lazy_import_flash_attention", lambda *a, **k: twin)
        monkeypatch.setattr(modeling_utils, "lazy_import_flash_attention", lambda *a, **k: twin)
        monkeypatch.setattr(modeling_utils.PreTrainedModel, "_flash_attn_can_dispatch", lambda self, *a, **k: True)

        model, inputs = self._model_and_inputs()
        with torch.no_grad():
            expected = model(**inputs).logits
        expected_tokens = _generate(model, **inputs, do_sample=False)
        model.set_attn_implementation("flash_attention_2")
        with torch.no_grad():
            got = model(**inputs).logits
        mask = inputs["attention_mask"].bool()
        torch.testing.assert_close(got[mask], expected[mask])
        assert torch.equal(_generate(model, **inputs, do_sample=False), expected_tokens)  # decoding with a cache
        assert calls and 1 in calls

    def test_torch_varlen_path_matches_exact_path(self, monkeypatch):
        import modification.modeling.modeling_mod as mm

        def varlen_twin(q, k, v, cu_q, cu_k, max_q, max_k, *, scale=None, window_size=(-1, -1), enable_gqa=False):
            assert window_size == (-1, 0) and cu_q.dtype == torch.int32
            out, _ = sdpa_packed_attention_forward(
                None, *(t.transpose(0, 1).unsqueeze(0) for t in (q, k, v)), None, scale, cu_seq_lens_q=cu_q,
                cu_seq_lens_k=cu_k, max_length_q=max_q, max_length_k=max_k)
            return out[0]

        monkeypatch.setattr(mm, "varlen_attn", varlen_twin)
        monkeypatch.setattr(mm, "torch_varlen_available", lambda: True)
        model, inputs = self._model_and_inputs()
        with torch.no_grad():
            expected = model(**inputs).logits
        expected_tokens = _generate(model, **inputs, do_sample=False)
        model.set_attn_implementation("torch_varlen")
        assert model.model.layers[0].self_attn.attention_function is mm.torch_varlen_attention_forward
        with torch.no_grad():
            got = model(**inputs).logits
        mask = inputs["attention_mask"].bool()
        torch.testing.assert_close(got[mask], expected[mask])
        assert torch.equal(_generate(model, **inputs, do_sample=False), expected_tokens)


def test_mod_cache_update_is_ragged_per_sequence():
    cache = MoDCache(num_layers=1)
    k1 = torch.arange(5.0).view(5, 1, 1)
    keys, values, lengths = cache.update(k1, -k1, 0, {"lengths": [3, 2], "columns": torch.tensor([0, 1, 2, 1, 2])})
    assert lengths == [3, 2] and torch.equal(keys, k1)
    k2 = torch.tensor([10.0, 11.0]).view(2, 1, 1)
    keys, values, lengths = cache.update(k2, -k2, 0, cache_kwargs={"lengths": [1, 1], "columns": torch.tensor([3, 3])})
    assert lengths == [4, 3]
    assert keys.flatten().tolist() == [0, 1, 2, 10, 3, 4, 11]  # each sequence's new row after its cached ones
    assert torch.equal(values, -keys)
    cache.advance(4)
    assert cache.get_seq_length() == 4 and cache.cached_tokens() == [7]
    cache.crop(-1)  # forget input column 3
    assert cache.get_seq_length() == 3 and cache.layers[0].lengths == [3, 2]
    assert cache.layers[0].keys.flatten().tolist() == [0, 1, 2, 3, 4]
    cache.reorder_cache(torch.tensor([1, 1, 0]))
    assert cache.layers[0].lengths == [2, 2, 3] and cache.layers[0].keys.flatten().tolist() == [3, 4, 3, 4, 0, 1, 2]
    assert cache.kv_bytes() == 2 * 7 * 4

