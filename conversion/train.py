"""Router training with the transformers Trainer and peft: `routers`, `lora` (default) and `full` recipes, healing a
converted model by self-distillation from its base.

The loss (`Objective`) is, by default, the KL divergence from the teacher's next-token distribution at temperature 2
(times T^2), plus the model's routing objective (layer-load objective for threshold routing, BCE for top-k); the LM
loss on the text and a hidden-state error at chosen layers can be mixed in (`lm_weight`, `hidden_mse_weight`). The
teacher is the base the model was made from: the same weights with every router's `override="run"` and LoRA
adapters disabled (`running_dense`), run under `no_grad` in the same step, so that memory holds one copy of the
weights (the `full` recipe, which moves those weights, and a `teacher` setting load a frozen one). Distillation is the
default because healing should bring back the base's behaviour rather than fit the healing text (Minitron, arXiv
2407.14679; SwiftKV, arXiv 2410.03960; README, "Training defaults").

Per-layer routed fractions and mean gates are logged from the first step, because the layer-load objective is
bistable (too weak and the model stays dense, too strong and every gate shuts); holding each routed layer at its share
of a `RoutingPlan` (the checkpoint's, a fit's, or it brought to `kv_fraction` / `flop_fraction`) turns it into a
controller that settles at the budget (see `MoDConfig.load_loss_target`).

A run lasts `steps`, `max_tokens` or `max_minutes`, whichever comes first; `CleanStop` ends it at the end of a step,
with a checkpoint and the output, at `max_minutes` or on Ctrl-C / SIGTERM; `resume` continues from the last complete
checkpoint; held-out evaluation logs each term and the perplexity (`plot_held_out` draws them against tokens). Healing
data that exercises look-up: `repeat_share` of the blocks end by repeating an earlier passage (`data.repeat_passages`).
The same code runs under `accelerate launch` (DDP, FSDP, DeepSpeed; configs in `accelerate_configs/`)."""
from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch
from transformers import AutoTokenizer, PrinterCallback, Trainer, TrainerCallback, TrainingArguments, set_seed
from transformers.trainer import TRAINER_STATE_NAME
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint

from modification.modeling import MoDConfig, MoDForCausalLM

from .atomic import atomic_output_dir
from .budget import checkpoint_plan
from .calibrate import recalibrate_after_training
from .checkpoint import (
    fastest_attn_implementation,
    load_mod_model,
    read_mod_config,
    resolve_checkpoint,
    save_checkpoint,
)
from .data import PackedBlocks, load_blocks, mix_blocks, repeat_passages, split_blocks
from .distill import Objective, distillation_kl, hidden_state_error, load_teacher, running_dense, teacher_folder
from .local_paths import data_names
from .long_runs import CleanStop, last_complete_checkpoint, plot_held_out
from .results import RESULTS_FILENAME, update_results
from .settings import DEFAULT_LEARNING_RATE, TrainSettings
from .steps import SettingsError

logger = logging.getLogger(__name__)

# `max_steps` of a run that only `max_minutes` bounds (the Trainer needs a number).
UNBOUNDED_STEPS = 10**9

LORA_TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


class RoutingStatsTrainer(Trainer):
    """The Trainer of `modification train`: its loss is the `Objective` plus the model's routing objective, with the
    teacher's pass (`running_dense` on the trained model itself, or a separate `teacher`) under `no_grad`; it logs
    each term, the KV fraction and per-layer routed fractions and mean gates, in training and on the held-out blocks
    (with the perplexity there), and gives routers their own learning rate."""

    def __init__(self, *args, objective: Objective, teacher: torch.nn.Module | None = None,
                 router_learning_rate: float = 1e-4, **kwargs):
        super().__init__(*args, **kwargs)
        self.objective, self.teacher = objective, teacher
        self.router_learning_rate = router_learning_rate
        self._stats: dict[str, float] = {}
        self._stats_count = 0
        self._eval_sums: dict[str, float] = {}

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

    @torch.no_grad()
    def teacher_outputs(self, model: torch.nn.Module, inputs: dict):
        """The teacher's logits (and the hidden states the objective compares) for `inputs`: the trained model's own
        weights run dense (`running_dense`), or the separate teacher's."""
        teacher = self.teacher if self.teacher is not None else model
        inputs = {k: v for k, v in inputs.items() if k in ("input_ids", "attention_mask")}
        with running_dense(teacher):
            return teacher(**inputs, use_cache=False, output_hidden_states=self.objective.hidden_states)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        objective = self.objective
        scored = inputs["labels"][..., 1:] != -100  # positions whose next token is scored, as by the LM loss
        n_scored = scored.sum()
        teacher = self.teacher_outputs(model, inputs) if objective.uses_teacher else None
        if self.model_accepts_loss_kwargs and num_items_in_batch is not None:
            inputs = {**inputs, "num_items_in_batch": num_items_in_batch}
        else:
            num_items_in_batch = None
        outputs = model(**inputs, output_router_decisions=True, output_hidden_states=objective.hidden_states)
        # the LM loss comes normalised by `denominator`; every term here is too (sum over this batch / denominator)
        denominator = num_items_in_batch if num_items_in_batch is not None else n_scored.clamp(min=1)
        sums = {"lm_loss": outputs.lm_loss.detach() * denominator}
        # the model's loss is the LM loss plus the routing objective, already weighted for accumulation
        loss = objective.lm_weight * outputs.lm_loss + (outputs.loss - outputs.lm_loss)
        if objective.distill_weight > 0:
            kl = distillation_kl(outputs.logits[:, :-1][scored], teacher.logits[:, :-1][scored],
                                 objective.distill_temperature)
            loss = loss + objective.distill_weight * kl / denominator
            sums["kl_loss"] = kl.detach()
        if objective.hidden_mse_weight > 0:
            error = sum(hidden_state_error(outputs.hidden_states[i][:, :-1][scored],
                                           teacher.hidden_states[i][:, :-1][scored])
                        for i in objective.hidden_mse_layers) / len(objective.hidden_mse_layers)
            loss = loss + objective.hidden_mse_weight * error / denominator
            sums["hidden_mse"] = error.detach()
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            # as Trainer.compute_loss: the denominator counts every process's tokens, and DDP averages gradients
            loss = loss * (self.accelerator.num_processes // self.get_tp_size() if self.args.n_gpu <= 1
                           else self.args.n_gpu)
        if model.training:
            self._record(outputs, {name: float(value / n_scored.clamp(min=1)) for name, value in sums.items()})
        else:
            self._record_eval(outputs, sums, n_scored)
        return (loss, outputs) if return_outputs else loss

    @torch.no_grad()
    def _record(self, outputs, terms: dict[str, float]) -> None:
        stats = {"kv_fraction": float(outputs.routed_fraction.mean()), **terms}  # K/V written over the dense model's
        config = self.model.config
        if outputs.aux_loss is not None:  # raw, as Mixtral's: log the term the loss adds
            stats["routing_loss"] = float(config.router_aux_loss_coef * outputs.aux_loss)
        for i, logits in zip(config.routed_layers, outputs.router_logits):  # one per routed layer
            stats[f"routed/layer_{i}"] = float(outputs.routed_fraction[i])
            stats[f"gate/layer_{i}"] = float(torch.sigmoid(logits).mean())
        for key, value in stats.items():
            self._stats[key] = self._stats.get(key, 0.0) + value
        self._stats_count += 1

    @torch.no_grad()
    def _record_eval(self, outputs, sums: dict[str, torch.Tensor], n_scored: torch.Tensor) -> None:
        for name, value in sums.items():
            self._eval_sums[name] += float(value)
        self._eval_sums["tokens"] += float(n_scored)
        self._eval_sums["kv_fraction"] += float(outputs.routed_fraction.mean())
        self._eval_sums["batches"] += 1.0

    def evaluation_loop(self, dataloader, description, prediction_loss_only=None, ignore_keys=None,
                        metric_key_prefix="eval"):
        """The Trainer's loop, plus each term of the objective on the held-out blocks (per token, over every
        process), the perplexity (of the LM loss) and the KV fraction."""
        names = ["lm_loss", "tokens", "kv_fraction", "batches"]
        names += ["kl_loss"] * (self.objective.distill_weight > 0)
        names += ["hidden_mse"] * (self.objective.hidden_mse_weight > 0)
        self._eval_sums = dict.fromkeys(names, 0.0)  # the same keys on every process, batches or not
        output = super().evaluation_loop(dataloader, description, prediction_loss_only, ignore_keys, metric_key_prefix)
        totals = torch.tensor([self._eval_sums[n] for n in names], dtype=torch.float64, device=self.args.device)
        totals = dict(zip(names, self.accelerator.reduce(totals, reduction="sum").tolist()))
        if totals["tokens"]:
            for name in names[4:] + ["lm_loss"]:
                output.metrics[f"{metric_key_prefix}_{name}"] = totals[name] / totals["tokens"]
            output.metrics[f"{metric_key_prefix}_perplexity"] = math.exp(totals["lm_loss"] / totals["tokens"])
            output.metrics[f"{metric_key_prefix}_kv_fraction"] = totals["kv_fraction"] / totals["batches"]
        return output

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs and self._stats_count:
            logs.update({k: round(v / self._stats_count, 5) for k, v in self._stats.items()})
            self._stats, self._stats_count = {}, 0
        super().log(logs, start_time)


def configure_objective(config: MoDConfig, settings: TrainSettings) -> None:
    """The routing objective of the run in the model's `config`: `load_loss_coef`, and with a budget or a fit's plan,
    the share of the plan each routed layer is held at (`load_loss_target`)."""
    if settings.load_loss_coef is not None:
        config.load_loss_coef = settings.load_loss_coef
    budget = settings.budget()
    if budget is not None or config.routing_plan is not None:
        # hold each routed layer at its share of the plan: the checkpoint's (a fit's), brought to the budget if given
        plan = checkpoint_plan(config)
        plan = budget.scale(plan, config) if budget is not None else plan
        config.routing_plan = plan.to_dict()
        config.load_loss_target = list(plan.routed_share)
    config.validate()


def gathered_model(trainer: Trainer, settings: TrainSettings):
    """The trained model whole, for the final checkpoint. Where FSDP or DeepSpeed shard the weights, every process
    takes part in gathering them (`Accelerator.get_state_dict`) and the main process loads them into a fresh,
    unsharded copy of the run's model; elsewhere, the trained model itself."""
    if not (trainer.is_fsdp_enabled or trainer.is_deepspeed_enabled):
        return trainer.model
    state = trainer.accelerator.get_state_dict(trainer.model_wrapped)
    if not trainer.is_world_process_zero():
        return None
    model, _ = load_mod_model(settings.model, dtype=torch.float32)
    configure_objective(model.config, settings)
    model = _prepare_model(model, settings)
    model.load_state_dict(state)
    return model


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


def train(settings: TrainSettings, callbacks: Sequence[TrainerCallback] = ()) -> Path:
    """Train the routers (and LoRA or all weights) of the MoD checkpoint `settings.model`; write a standalone
    checkpoint to `settings.out`, its thresholds calibrated again to the budget (`recalibrate`).

    The run lasts `steps`, `max_tokens` or `max_minutes`, whichever it reaches first. Checkpoints go to
    `settings.checkpoint_dir` every `save_steps`; `resume` continues from the last complete one. The `lora` adapter
    is merged into the output (`save_adapter`: also in `out/adapter`, for `PeftModel.from_pretrained` on the input).
    `held_out.png` plots the held-out loss against tokens (`eval_steps`). `callbacks` join the Trainer's.
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
    states = config.num_hidden_layers + 1  # the embeddings and every layer's output
    bad = [i for i in settings.hidden_mse_layers if not -states <= i < states]
    if settings.hidden_mse_weight > 0 and bad:
        raise SettingsError("train", f"{bad} name no hidden state of a {config.num_hidden_layers}-layer model (0 to "
                                     f"{states - 1}, or negative from the end)", "hidden_mse_layers")
    teacher_dir = teacher_folder(settings, config)
    checkpoint_dir = Path(settings.checkpoint_dir or default_checkpoint_dir(out))
    any_checkpoint = get_last_checkpoint(str(checkpoint_dir)) if checkpoint_dir.is_dir() else None
    last = last_complete_checkpoint(checkpoint_dir) if checkpoint_dir.is_dir() else None
    if resume and last is None:
        raise FileNotFoundError(f"--resume: no checkpoint in {checkpoint_dir} to resume from (a checkpoint-* folder "
                                f"holding {TRAINER_STATE_NAME}, which the Trainer writes last)")
    if not resume and any_checkpoint is not None:
        raise FileExistsError(f"{checkpoint_dir} already holds checkpoints; pass --resume to continue from "
                              f"{last or any_checkpoint}")
    start_step = json.loads((Path(last) / TRAINER_STATE_NAME).read_text())["global_step"] if resume else 0
    if resume and any_checkpoint != last and int(os.environ.get("RANK", "0")) == 0:
        # a killed run's half-written checkpoints: removed, so that the Trainer's rotation counts only real ones
        for partial in checkpoint_dir.glob(f"{PREFIX_CHECKPOINT_DIR}-*"):
            if not (partial / TRAINER_STATE_NAME).is_file():
                logger.warning("removing %s, left half-written (no %s); resuming from %s", partial,
                               TRAINER_STATE_NAME, last)
                shutil.rmtree(partial)

    tokenizer = AutoTokenizer.from_pretrained(folder, config=config)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    tokens_per_step = settings.batch_size * settings.grad_accum * world * settings.seq_len
    max_steps = settings.max_steps(tokens_per_step)  # None: only max_minutes bounds the run
    blocks = load_blocks(settings.data, tokenizer, settings.seq_len, settings.text_field, settings.split,
                         settings.data_config, settings.max_tokens_per_source, progress=progress)
    train_blocks, eval_blocks = split_blocks(blocks, settings.eval_fraction)
    needed = max_steps * settings.batch_size * settings.grad_accum * world if max_steps and settings.data_weights \
        else None  # without a step count, one pass over the mixed sources, repeated as the Trainer needs
    train_set = mix_blocks(train_blocks, settings.data_weights, needed, seed=settings.seed)
    train_set = repeat_passages(train_set, settings.repeat_share, settings.repeat_tokens, seed=settings.seed)
    eval_set = torch.cat(eval_blocks) if settings.eval_fraction > 0 else None

    model, _ = load_mod_model(str(folder), dtype=torch.float32)
    teacher = load_teacher(teacher_dir) if teacher_dir is not None else None
    if torch.cuda.is_available():  # the Trainer moves the model there
        for module in (model, teacher):
            if isinstance(module, MoDForCausalLM):
                module.set_attn_implementation(fastest_attn_implementation(torch.device("cuda")))
    configure_objective(model.config, settings)
    if settings.gradient_checkpointing:
        enable_checkpointing(model)
    # peft still asks transformers for the deprecated `is_gradient_checkpointing`; the warning is not the user's to fix.
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
    set_seed(settings.seed)  # LoRA's initial A matrices: the same run starts from the same adapters
    trainable = _prepare_model(model, settings)

    use_cuda = torch.cuda.is_available()
    evaluating = bool(settings.eval_steps) and eval_set is not None
    args = TrainingArguments(
        output_dir=str(checkpoint_dir),
        max_steps=max_steps or UNBOUNDED_STEPS,
        per_device_train_batch_size=settings.batch_size,
        per_device_eval_batch_size=settings.batch_size,
        gradient_accumulation_steps=settings.grad_accum,
        learning_rate=settings.learning_rate or DEFAULT_LEARNING_RATE[settings.recipe],
        weight_decay=settings.weight_decay,
        warmup_steps=settings.warmup_steps,
        # a cosine schedule needs the run's length; a run bounded by time alone keeps its learning rate
        lr_scheduler_type="cosine" if max_steps else "constant_with_warmup",
        logging_steps=settings.logging_steps,
        logging_first_step=True,
        save_steps=settings.save_steps,
        save_total_limit=2,
        eval_strategy="steps" if evaluating else "no",
        eval_steps=settings.eval_steps,
        eval_on_start=evaluating and not resume,  # the curve's first point: the model before training
        include_num_input_tokens_seen="all",  # every log line says how many tokens training has seen
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
    if teacher is not None:
        teacher.to(args.device)
    trainer = RoutingStatsTrainer(
        model=trainable,
        args=args,
        train_dataset=PackedBlocks(train_set),
        eval_dataset=PackedBlocks(eval_set) if eval_set is not None else None,
        objective=Objective.from_settings(settings),
        teacher=teacher,
        router_learning_rate=settings.router_learning_rate,
    )
    if not progress:
        trainer.remove_callback(PrinterCallback)  # it prints every log line when progress bars are off
    stop = CleanStop(settings.max_minutes)
    trainer.add_callback(stop)
    for callback in callbacks:
        trainer.add_callback(callback)
    started = time.monotonic()
    with stop.catching_signals():
        result = trainer.train(resume_from_checkpoint=last if resume else None)
    minutes = (time.monotonic() - started) / 60

    trained = gathered_model(trainer, settings)
    if trainer.is_world_process_zero():
        final = trained
        with atomic_output_dir(out, overwrite=settings.overwrite) as tmp:
            if settings.recipe == "lora":
                if settings.save_adapter:
                    trained.save_pretrained(tmp / "adapter")
                final = trained.merge_and_unload()
            # thresholds measured before training no longer hold: calibrated again (or marked stale); the fit's
            # per-layer plan still does (calibrate reuses it)
            fit = (final.config.calibration or {}).get("fit")
            calibration = recalibrate_after_training(final, train_blocks, settings.budget()) \
                if settings.recalibrate else None
            if calibration is None:
                final.config.calibration = {"fit": fit, "stale": True} if fit else None
            elif fit:
                final.config.calibration = {**calibration, "fit": fit}
            save_checkpoint(final, tmp, companions_from=folder)
            record = training_record(settings, trainer, result)
            record.update(stopped_by=stop.stopped_by or "steps", minutes=round(minutes, 2))
            if calibration is not None:
                record["recalibrated"] = calibration["measured"]
            if settings.teacher is not None:
                record["teacher"] = settings.teacher  # made public (a local folder by its name) with the record
            if resume:
                record.update(resumed_from=str(last), steps_this_run=result.global_step - start_step)
            (tmp / "training_log.json").write_text(json.dumps(trainer.state.log_history, indent=1) + "\n")
            plot_held_out(trainer.state.log_history, tmp / "held_out.png")
            update_results(tmp / RESULTS_FILENAME, final.config, str(out), extra={"training": record})
    trainer.accelerator.wait_for_everyone()
    return out


def training_record(settings: TrainSettings, trainer: Trainer, result) -> dict:
    """The `training` section of results.json: what the training did (not where it wrote)."""
    args = trainer.args
    record = {**settings.recorded(), "data": data_names(settings.data)}
    record.update(
        initial_checkpoint=settings.model,
        learning_rate=args.learning_rate,
        sequence_length=settings.seq_len,
        completed_steps=trainer.state.global_step,
        tokens=trainer.state.num_input_tokens_seen,
        world_size=args.world_size,
        final_train_loss=round(float(result.training_loss), 5) if not math.isnan(result.training_loss) else None,
    )
    return record
