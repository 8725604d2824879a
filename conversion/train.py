"""Router training with the transformers Trainer and peft: `routers`, `lora` (default) and `full` recipes.

The loss is the model's own: LM loss plus the routing objective (layer-load objective for threshold routing, BCE for
top-k). Per-layer routed fractions and mean gates are logged from the first step, because the layer-load objective is
bistable (too weak and the model stays dense, too strong and every gate shuts); holding each routed layer at its share
of a `RoutingPlan` (the checkpoint's, a fit's, or it brought to `kv_fraction` / `flop_fraction`) turns it into a
controller that settles at the budget (see `MoDConfig.load_loss_target`).
"""

from __future__ import annotations

import json
import logging
import math
import os
import warnings
from pathlib import Path

import torch
from transformers import AutoTokenizer, PrinterCallback, Trainer, TrainingArguments
from transformers.trainer_utils import get_last_checkpoint

from modification.modeling import MoDForCausalLM

from .atomic import atomic_output_dir
from .budget import checkpoint_plan
from .checkpoint import (
    fastest_attn_implementation,
    load_mod_model,
    read_mod_config,
    resolve_checkpoint,
    save_checkpoint,
)
from .data import PackedBlocks, load_blocks, mix_blocks, split_blocks
from .local_paths import data_names
from .results import RESULTS_FILENAME, update_results
from .settings import DEFAULT_LEARNING_RATE, TrainSettings

logger = logging.getLogger(__name__)

LORA_TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


class RoutingStatsTrainer(Trainer):
    """A Trainer that logs per-layer routed fractions and mean gates, and gives routers their own learning rate."""

    def __init__(self, *args, router_learning_rate: float = 1e-4, **kwargs):
        super().__init__(*args, **kwargs)
        self.router_learning_rate = router_learning_rate
        self._stats: dict[str, float] = {}
        self._stats_count = 0

    def create_optimizer(self, model=None):
        if self.optimizer is None:
            model = model if model is not None else self.model
            params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
            routers = [p for n, p in params if ".router." in n]
            others = [p for n, p in params if ".router." not in n]
            groups = [{"params": routers, "lr": self.router_learning_rate, "weight_decay": 0.0}]
            if others:
                groups.append({"params": others, "lr": self.args.learning_rate, "weight_decay": self.args.weight_decay})
            self.optimizer = torch.optim.AdamW(groups, betas=(self.args.adam_beta1, self.args.adam_beta2),
                                               eps=self.args.adam_epsilon)
        return self.optimizer

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        inputs = {**inputs, "output_router_decisions": True}
        loss, outputs = super().compute_loss(model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch)
        if model.training:
            lm_loss = outputs.lm_loss
            if lm_loss is not None and num_items_in_batch is not None:
                # the model normalised by the tokens of the whole accumulated batch; log this batch's mean
                local = (inputs["labels"][..., 1:] != -100).sum().clamp(min=1)
                lm_loss = lm_loss * num_items_in_batch / local
            self._record(outputs, lm_loss)
        return (loss, outputs) if return_outputs else loss

    @torch.no_grad()
    def _record(self, outputs, lm_loss) -> None:
        stats = {"kv_fraction": float(outputs.routed_fraction.mean())}  # K/V written over the dense model's
        if lm_loss is not None:
            stats["lm_loss"] = float(lm_loss)
        config = self.model.config
        if outputs.aux_loss is not None:  # raw, as Mixtral's: log the term the loss adds
            stats["routing_loss"] = float(config.router_aux_loss_coef * outputs.aux_loss)
        for i, logits in zip(config.routed_layers, outputs.router_logits):  # one per routed layer
            stats[f"routed/layer_{i}"] = float(outputs.routed_fraction[i])
            stats[f"gate/layer_{i}"] = float(torch.sigmoid(logits).mean())
        for key, value in stats.items():
            self._stats[key] = self._stats.get(key, 0.0) + value
        self._stats_count += 1

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs and self._stats_count:
            logs.update({k: round(v / self._stats_count, 5) for k, v in self._stats.items()})
            self._stats, self._stats_count = {}, 0
        super().log(logs, start_time)


def _prepare_model(model: MoDForCausalLM, settings: TrainSettings):
    """Set trainable parameters for the recipe; for `lora`, wrap with peft (routers as modules_to_save)."""
    if settings.recipe == "lora":
        from peft import LoraConfig, get_peft_model

        lora = LoraConfig(
            r=settings.lora_r, lora_alpha=settings.lora_alpha, lora_dropout=settings.lora_dropout,
            target_modules=LORA_TARGET_MODULES, modules_to_save=["router"], task_type="CAUSAL_LM",
        )
        return get_peft_model(model, lora)
    for name, param in model.named_parameters():
        param.requires_grad = settings.recipe == "full" or ".router." in name
    return model


def enable_checkpointing(model) -> None:
    """Activation (gradient) checkpointing under the name this transformers version uses."""
    enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
    enable()


def default_checkpoint_dir(out: str | os.PathLike) -> Path:
    out = Path(out)
    return out.with_name(out.name + "-checkpoints")


def train(settings: TrainSettings) -> Path:
    """Train the routers (and LoRA or all weights) of the MoD checkpoint `settings.model` and write a standalone
    checkpoint to `settings.out`.

    Checkpoints go to `settings.checkpoint_dir` every `save_steps`; `resume` continues from the last one there. With
    the `lora` recipe the adapter is merged into the output; `save_adapter` also writes it to `out/adapter` (loadable
    with `PeftModel.from_pretrained` on the input checkpoint).
    """
    out, resume, progress = Path(settings.out), settings.resume, settings.progress
    if out.exists() and not settings.overwrite:
        raise FileExistsError(f"{out} already exists; pass --overwrite to replace it")
    folder = resolve_checkpoint(settings.model)
    config = read_mod_config(folder)  # a clear error for a non-MoD folder, before anything else
    if settings.seq_len > config.max_position_embeddings:
        raise ValueError(
            f"seq_len={settings.seq_len} exceeds the model's max_position_embeddings={config.max_position_embeddings}"
        )
    checkpoint_dir = Path(settings.checkpoint_dir or default_checkpoint_dir(out))
    last = get_last_checkpoint(str(checkpoint_dir)) if checkpoint_dir.is_dir() else None
    if resume and last is None:
        raise FileNotFoundError(f"--resume: no checkpoint-* folder in {checkpoint_dir} to resume from")
    if not resume and last is not None:
        raise FileExistsError(f"{checkpoint_dir} already holds checkpoints; pass --resume to continue from {last}")

    tokenizer = AutoTokenizer.from_pretrained(folder, config=config)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    blocks = load_blocks(settings.data, tokenizer, settings.seq_len, settings.text_field, settings.split,
                         settings.data_config, settings.max_tokens_per_source, progress=progress)
    train_blocks, eval_blocks = split_blocks(blocks, settings.eval_fraction)
    needed = settings.steps * settings.batch_size * settings.grad_accum * world
    train_set = mix_blocks(train_blocks, settings.data_weights, needed if settings.data_weights else None,
                           seed=settings.seed)
    eval_set = torch.cat(eval_blocks) if settings.eval_fraction > 0 else None

    model, _ = load_mod_model(str(folder), dtype=torch.float32)
    if torch.cuda.is_available():  # the Trainer moves the model there
        model.set_attn_implementation(fastest_attn_implementation(torch.device("cuda")))
    if settings.load_loss_coef is not None:
        model.config.load_loss_coef = settings.load_loss_coef
    budget = settings.budget()
    if budget is not None or model.config.routing_plan is not None:
        # hold each routed layer at its share of the plan: the checkpoint's (a fit's), brought to the budget if given
        plan = checkpoint_plan(model.config)
        plan = budget.scale(plan, model.config) if budget is not None else plan
        model.config.routing_plan = plan.to_dict()
        model.config.load_loss_target = list(plan.routed_share)
    model.config.validate()
    if settings.gradient_checkpointing:
        enable_checkpointing(model)
    # peft still asks transformers for the deprecated `is_gradient_checkpointing`; the warning is not the user's to fix.
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
    trainable = _prepare_model(model, settings)

    use_cuda = torch.cuda.is_available()
    args = TrainingArguments(
        output_dir=str(checkpoint_dir),
        max_steps=settings.steps,
        per_device_train_batch_size=settings.batch_size,
        per_device_eval_batch_size=settings.batch_size,
        gradient_accumulation_steps=settings.grad_accum,
        learning_rate=settings.learning_rate or DEFAULT_LEARNING_RATE[settings.recipe],
        weight_decay=settings.weight_decay,
        warmup_steps=settings.warmup_steps,
        lr_scheduler_type="cosine",
        logging_steps=settings.logging_steps,
        logging_first_step=True,
        save_steps=settings.save_steps,
        save_total_limit=2,
        eval_strategy="steps" if settings.eval_steps and eval_set is not None else "no",
        eval_steps=settings.eval_steps,
        report_to=[],
        seed=settings.seed,
        data_seed=settings.seed,
        use_cpu=not use_cuda,
        bf16=use_cuda and torch.cuda.is_bf16_supported(),
        ddp_find_unused_parameters=True,  # a layer every token skipped on one rank has no gradient there
        ddp_backend="gloo" if world > 1 and not use_cuda else None,
        fsdp="full_shard auto_wrap" if settings.fsdp else "",
        fsdp_config={"transformer_layer_cls_to_wrap": ["MoDDecoderLayer"]} if settings.fsdp else None,
        remove_unused_columns=False,
        disable_tqdm=not progress,
        dataloader_drop_last=True,
    )
    trainer = RoutingStatsTrainer(
        model=trainable,
        args=args,
        train_dataset=PackedBlocks(train_set),
        eval_dataset=PackedBlocks(eval_set) if eval_set is not None else None,
        router_learning_rate=settings.router_learning_rate,
    )
    if not progress:
        trainer.remove_callback(PrinterCallback)  # it prints every log line when progress bars are off
    result = trainer.train(resume_from_checkpoint=last if resume else None)

    if trainer.is_world_process_zero():
        final = trainable
        with atomic_output_dir(out, overwrite=settings.overwrite) as tmp:
            if settings.recipe == "lora":
                if settings.save_adapter:
                    trainable.save_pretrained(tmp / "adapter")
                final = trainable.merge_and_unload()
            # thresholds measured before training no longer hold; the fit's per-layer plan does (calibrate reuses it)
            fit = (final.config.calibration or {}).get("fit")
            final.config.calibration = {"fit": fit, "stale": True} if fit else None
            save_checkpoint(final, tmp, companions_from=folder)
            record = training_record(settings, trainer, result)
            if resume:
                start = json.loads((Path(last) / "trainer_state.json").read_text())["global_step"]
                record.update(resumed_from=str(last), steps_this_run=result.global_step - start)
            (tmp / "training_log.json").write_text(json.dumps(trainer.state.log_history, indent=1) + "\n")
            update_results(tmp / RESULTS_FILENAME, final.config, str(out), extra={"training": record})
    trainer.accelerator.wait_for_everyone()
    return out


def training_record(settings: TrainSettings, trainer: Trainer, result) -> dict:
    """The `training` section of results.json: what the training did (not where it wrote)."""
    args = trainer.args
    tokens = args.max_steps * args.per_device_train_batch_size * args.gradient_accumulation_steps * \
        args.world_size * settings.seq_len
    record = {**settings.recorded(), "data": data_names(settings.data)}
    record.update(
        initial_checkpoint=settings.model,
        learning_rate=args.learning_rate,
        sequence_length=settings.seq_len,
        tokens=tokens,
        world_size=args.world_size,
        final_train_loss=round(float(result.training_loss), 5) if not math.isnan(result.training_loss) else None,
    )
    return record
