"""The healing objective of `modification train`: self-distillation from the base the model was made from.

`Objective` weighs the KL divergence from the teacher's next-token distribution at a temperature (`distillation_kl`,
its gradient written out so that it is exactly zero while the model still is its base), the LM loss and a relative
hidden-state error (`hidden_state_error`). The teacher is the trained model itself run as its base (`running_dense`:
routers overridden to run every token, LoRA adapters disabled, no copy of the weights), or a separate checkpoint
(`teacher_folder` checks it against the trained model, `load_teacher` loads it frozen).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

from modification.modeling import MoDConfig
from modification.modeling.modeling_mod import MoDRouter

from .bases import base_path
from .checkpoint import load_mod_model, resolve_checkpoint
from .settings import TrainSettings
from .steps import SettingsError


@dataclass(frozen=True)
class Objective:
    """What `modification train` minimises, besides the model's routing objective (which it always adds): the
    weighted sum of the LM loss, the KL divergence from the teacher's next-token distribution at `distill_temperature`
    (times T^2, so that its gradients keep their scale across temperatures) and the hidden-state error at
    `hidden_mse_layers`. Each term is a sum over the scored tokens (those whose next token is a label) divided by the
    tokens of the whole accumulated, distributed batch, as the Trainer normalises the LM loss."""

    lm_weight: float
    distill_weight: float
    distill_temperature: float
    hidden_mse_weight: float
    hidden_mse_layers: tuple[int, ...]

    @classmethod
    def from_settings(cls, settings: TrainSettings) -> Objective:
        return cls(settings.lm_weight, settings.distill_weight, settings.distill_temperature,
                   settings.hidden_mse_weight, tuple(settings.hidden_mse_layers))

    @property
    def uses_teacher(self) -> bool:
        return self.distill_weight > 0 or self.hidden_mse_weight > 0

    @property
    def hidden_states(self) -> list[int] | None:
        """The hidden states to return (transformers' `output_hidden_states` indices), or None."""
        return list(self.hidden_mse_layers) if self.hidden_mse_weight > 0 else None


class DistillationKL(torch.autograd.Function):
    """`T^2 * KL(teacher_T || student_T)` summed over the rows (tokens) of `[tokens, vocab]` logits, in float32, with
    its gradient written out: `T * (p_student - p_teacher)` on the student's logits. That is exactly zero where the
    two distributions are equal, as they are while the model still is its base; autograd's path through
    `log_softmax` leaves a residue of order 1e-9 there, which Adam, dividing by the gradient's own scale, would turn
    into steady steps of a tenth of the learning rate. The rows go `rows_per_chunk` at a time, and backward keeps one
    `[tokens, vocab]` tensor (the gradient, in the logits' dtype), not the two distributions."""

    @staticmethod
    def forward(ctx, student_logits, teacher_logits, temperature: float, rows_per_chunk: int):
        gradient = torch.empty_like(student_logits)
        kl = student_logits.new_zeros((), dtype=torch.float32)
        for start in range(0, student_logits.shape[0], rows_per_chunk):
            rows = slice(start, start + rows_per_chunk)
            student = F.log_softmax(student_logits[rows].float() / temperature, dim=-1)
            teacher = F.log_softmax(teacher_logits[rows].float() / temperature, dim=-1)
            kl += F.kl_div(student, teacher, log_target=True, reduction="sum")
            gradient[rows] = (temperature * (student.exp_() - teacher.exp_())).to(gradient.dtype)
        ctx.save_for_backward(gradient)
        return temperature**2 * kl

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (gradient,) = ctx.saved_tensors
        return grad.to(gradient.dtype) * gradient, None, None, None


# Rows (tokens) of logits the KL term takes at once: bounds its float32 temporaries to a few of
# [KL_ROWS_PER_CHUNK, vocab] (1 GiB each at 128k tokens of vocabulary).
KL_ROWS_PER_CHUNK = 2048


def distillation_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float,
                    rows_per_chunk: int = KL_ROWS_PER_CHUNK) -> torch.Tensor:
    """`T^2 * KL(teacher_T || student_T)` summed over the rows (tokens) of `[tokens, vocab]` logits (the teacher's
    carry no gradient); see `DistillationKL`."""
    return DistillationKL.apply(student_logits, teacher_logits.detach(), temperature, rows_per_chunk)


def hidden_state_error(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """`||s - t||^2 / ||t||^2` summed over the rows (tokens) of `[tokens, hidden]` states: the squared error relative
    to the teacher's norm, so that its weight means the same at every layer (Llama's residual stream grows with depth,
    and its first tokens carry outsized activations)."""
    student, teacher = student.float(), teacher.float()
    return ((student - teacher).pow(2).sum(-1) / teacher.pow(2).sum(-1).clamp(min=1e-6)).sum()


@contextmanager
def running_dense(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """`model` as the teacher: the base it was made from. A MoD model, its peft wrapper, or either wrapped for
    distributed training (the wrapper's forward is the one to call) runs with every router's `override="run"` (every
    token runs every layer, ungated: the dense base), its LoRA adapters disabled (peft's `disable_adapter`) and in
    eval mode (no dropout, no activation checkpointing). The weights are the model's own: nothing is copied. A plain
    base model only switches to eval mode."""
    from peft import PeftModel

    routers = [m for m in model.modules() if isinstance(m, MoDRouter)]
    adapters = next((m for m in model.modules() if isinstance(m, PeftModel)), None)
    overrides, training = [router.override for router in routers], model.training
    with adapters.disable_adapter() if adapters is not None else nullcontext():
        try:
            for router in routers:
                router.override = "run"
            model.eval()
            yield model
        finally:
            for router, override in zip(routers, overrides):
                router.override = override
            model.train(training)


def teacher_folder(settings: TrainSettings, config: MoDConfig) -> Path | None:
    """The folder of the separate teacher (`settings.teacher`, or for the `full` recipe, whose training moves the
    weights the teacher would run, the starting checkpoint), checked against the trained model `config`: the same
    vocabulary, and for the hidden-state error the same hidden size and layer count. None: the model teaches itself."""
    name = settings.teacher or (settings.model if settings.recipe == "full" and settings.uses_teacher() else None)
    if name is None:
        return None
    try:
        folder = resolve_checkpoint(base_path(name))
        raw = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError) as err:
        raise SettingsError("train", f"cannot read the teacher {name!r}: {err}", "teacher") from None
    if raw.get("vocab_size") != config.vocab_size:
        raise SettingsError("train", f"{name!r} has a vocabulary of {raw.get('vocab_size')} tokens and the trained "
                                     f"model {config.vocab_size}: the KL term compares distributions over the same "
                                     f"tokens", "teacher")
    if settings.hidden_mse_weight > 0:
        for key in ("hidden_size", "num_hidden_layers"):
            if raw.get(key) != getattr(config, key):
                raise SettingsError("train", f"{name!r} has {key}={raw.get(key)} and the trained model "
                                             f"{getattr(config, key)}: the hidden-state error compares states of the "
                                             f"same shape", "teacher")
    return folder


def load_teacher(folder: Path) -> torch.nn.Module:
    """A frozen teacher: a MoD checkpoint (run dense, `running_dense`) or a base model, in float32 as the student."""
    if json.loads((folder / "config.json").read_text()).get("model_type") == MoDConfig.model_type:
        teacher, _ = load_mod_model(str(folder), dtype=torch.float32)
    else:
        teacher = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    return teacher.requires_grad_(False).eval()
