"""Look-up from far back in the context: can the model still copy what it read thousands of tokens ago?

Perplexity on natural text at 512 tokens hides a model that can no longer look anything up in its context (on
SmolLM2-135M-Instruct, deleting the single layer whose removal costs the least perplexity drops copying to zero). This
check fails such a model:

- **Repeated passage**: a passage of `passage_tokens` random tokens (drawn from the tokens of a real text, so that
  they are ordinary tokens), then `distance` tokens of that text, then the same passage again. A model that reads its
  context predicts the second copy (after its first token) almost perfectly; one that cannot, at chance. Reported:
  top-1 accuracy and mean loss (nats) on the second copy, per distance (tokens from the first copy's start to the
  second copy's start), averaged over `trials` passages with different tokens and filler.

Both work on any causal LM with `logits_to_keep` (transformers' models and MoD), so base and MoD are measured alike.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F


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
