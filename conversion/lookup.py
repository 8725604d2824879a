"""Look-up from far back in the context: can the model still copy what it read thousands of tokens ago?

Perplexity on natural text at 512 tokens hides a model that can no longer look anything up in its context (on
SmolLM2-135M-Instruct, deleting the single layer whose removal costs the least perplexity drops copying to zero). This
check fails such a model:

- **Repeated passage**: a passage of `passage_tokens` random tokens (drawn from the tokens of a real text, so that
  they are ordinary tokens), then `distance` tokens of that text, then the same passage again. A model that reads its
  context predicts the second copy (after its first token) almost perfectly; one that cannot, at chance. Reported:
  top-1 accuracy and mean loss (nats) on the second copy, per distance (tokens from the first copy's start to the
  second copy's start), averaged over `trials` passages with different tokens and filler.
- **Passkey retrieval** (Mohtashami and Jaggi, 2023): a five-digit pass key stated once in a prompt of repeated filler
  sentences, at a depth that varies over the trials, and asked for at the end. Reported: the share of trials whose
  every answer token is the model's top-1 prediction (what greedy decoding would answer), and the mean loss on the
  answer tokens. SmolLM2-135M-Instruct answers every trial at 512, 2k and 7.5k tokens, so a MoD model of it that
  cannot has lost its look-back.

Both work on any causal LM with `logits_to_keep` (transformers' models and MoD), so base and MoD are measured alike,
each scored with one forward pass per sequence.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

import torch
import torch.nn.functional as F

PASSKEY_INTRO = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. I will "
                 "quiz you about the important information there.\n")
PASSKEY_FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
PASSKEY_NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key. "
PASSKEY_QUESTION = "What is the pass key? The pass key is"


def repeated_passage_batch(filler: torch.Tensor, distance: int, passage_tokens: int, trials: int,
                           seed: int = 0) -> torch.Tensor:
    """`[trials, distance + passage_tokens]` ids: passage, filler, the same passage (it starts `distance` tokens after
    the first copy's start). Passages are drawn (seeded) from the distinct tokens of `filler`; each trial takes its
    filler from another place in the stream."""
    if passage_tokens < 2:
        raise ValueError(f"passage_tokens must be at least 2, got {passage_tokens}")
    if distance < passage_tokens:
        raise ValueError(f"distance {distance} must be at least passage_tokens ({passage_tokens}): the copies would "
                         "overlap")
    gap = distance - passage_tokens
    if filler.numel() < gap + 1:
        raise ValueError(f"the filler text has {filler.numel()} tokens; a distance of {distance} needs at least "
                         f"{gap + 1}")
    gen = torch.Generator().manual_seed(seed)
    vocabulary = filler.unique()
    rows = []
    for _ in range(trials):
        passage = vocabulary[torch.randint(len(vocabulary), (passage_tokens,), generator=gen)]
        start = int(torch.randint(filler.numel() - gap, (1,), generator=gen))
        rows.append(torch.cat([passage, filler[start:start + gap], passage]))
    return torch.stack(rows)


@torch.no_grad()
def repeated_passage_scores(model: torch.nn.Module, batch: torch.Tensor, passage_tokens: int,
                            batch_size: int = 1, inputs_embeds: torch.Tensor | None = None) -> dict:
    """Top-1 accuracy and mean loss of `model` on the second copy of each row of `batch` (from
    `repeated_passage_batch`), its first token left out (nothing in the context predicts it). `inputs_embeds`: what
    the model takes for each row instead of its ids (`[rows, length, hidden]`; the ids still give the targets)."""
    device = next(model.parameters()).device
    correct, loss, count = 0, 0.0, 0
    for start in range(0, len(batch), batch_size):
        rows = batch[start:start + batch_size].to(device)
        feed = {"input_ids": rows} if inputs_embeds is None else {
            "inputs_embeds": inputs_embeds[start:start + batch_size].to(device)}
        # logits at the last `passage_tokens` positions: the first predicts the copy's second token, the last nothing
        logits = model(**feed, logits_to_keep=passage_tokens, use_cache=False).logits[:, :-1].float()
        targets = rows[:, -(passage_tokens - 1):]
        correct += int((logits.argmax(-1) == targets).sum())
        loss += float(F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="sum"))
        count += targets.numel()
    return {"accuracy": correct / count, "loss": loss / count, "tokens": count}


def lookup_rows(models: dict[str, torch.nn.Module], filler: torch.Tensor, distances: Sequence[int],
                passage_tokens: int = 128, trials: int = 4, seed: int = 0, dataset: str = "text",
                batch_size: int = 1) -> list[dict]:
    """One row per distance: `{dataset, distance, passage_tokens, trials, <name>: {accuracy, loss}}` for each model of
    `models` (e.g. {"mod": ..., "base": ...}), all scored on the same sequences."""
    rows = []
    for distance in distances:
        batch = repeated_passage_batch(filler, distance, passage_tokens, trials, seed)
        row = {"dataset": dataset, "distance": distance, "passage_tokens": passage_tokens, "trials": trials}
        for name, model in models.items():
            scores = repeated_passage_scores(model, batch, passage_tokens, batch_size)
            row[name] = {"accuracy": scores["accuracy"], "loss": scores["loss"]}
        rows.append(row)
    return rows


def passkey_prompts(tokenizer, length: int, trials: int, seed: int = 0) -> list[tuple[torch.Tensor, int]]:
    """`trials` passkey sequences of about `length` tokens (never more): `(ids, answer_tokens)`, the ids of the prompt
    followed by those of the answer (" " and the key), and how many of them answer. The key is a random five-digit
    number per trial; its sentence sits at depths spread evenly over the filler (trial i of n after (i + 1/2) / n
    of it)."""
    rng = random.Random(seed)
    encode = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    sentence = len(encode(PASSKEY_FILLER))
    fixed = len(encode(PASSKEY_INTRO + PASSKEY_NEEDLE.format(key="00000") + PASSKEY_QUESTION + " 00000"))
    repeats = (length - fixed - 2) // sentence  # room for special tokens and for merges across sentence boundaries
    if repeats < 1:
        raise ValueError(f"a passkey prompt of {length} tokens leaves no room for filler: it needs more than {fixed}")
    out = []
    for trial in range(trials):
        key = str(rng.randint(10000, 99999))
        depth = int(repeats * (trial + 0.5) / trials)  # the middle of the trial's share of the filler
        text = (PASSKEY_INTRO + PASSKEY_FILLER * depth + PASSKEY_NEEDLE.format(key=key)
                + PASSKEY_FILLER * (repeats - depth) + PASSKEY_QUESTION)
        prompt, answer = tokenizer(text)["input_ids"], encode(" " + key)
        out.append((torch.tensor(prompt + answer), len(answer)))
    return out


@torch.no_grad()
def passkey_scores(model: torch.nn.Module, prompts: list[tuple[torch.Tensor, int]]) -> dict:
    """The share of `prompts` (from `passkey_prompts`) whose every answer token is the model's top-1 prediction, and
    the mean loss on the answer tokens."""
    device = next(model.parameters()).device
    correct, loss, count = 0, 0.0, 0
    for ids, answer in prompts:
        ids = ids.to(device).unsqueeze(0)
        logits = model(input_ids=ids, logits_to_keep=answer + 1, use_cache=False).logits[0, :-1].float()
        targets = ids[0, -answer:]
        correct += bool((logits.argmax(-1) == targets).all())
        loss += float(F.cross_entropy(logits, targets, reduction="sum"))
        count += answer
    return {"accuracy": correct / len(prompts), "loss": loss / count}


def passkey_rows(models: dict[str, torch.nn.Module], tokenizer, lengths: Sequence[int], trials: int = 4,
                 seed: int = 0) -> list[dict]:
    """One row per prompt length: `{length, trials, <name>: {accuracy, loss}}` for each model of `models`, all on
    the same prompts (`length`: the longest prompt's tokens, answer included)."""
    rows = []
    for length in lengths:
        prompts = passkey_prompts(tokenizer, length, trials, seed)
        row = {"length": max(len(ids) for ids, _ in prompts), "trials": trials}
        for name, model in models.items():
            row[name] = passkey_scores(model, prompts)
        rows.append(row)
    return rows
