"""Generations of a MoD checkpoint next to its base: the same chat prompts, greedy, side by side."""

from __future__ import annotations

from pathlib import Path

import torch


def _chat_inputs(tokenizer, prompt: str) -> torch.Tensor:
    if getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                            return_tensors="pt", return_dict=True)["input_ids"]
    else:  # a base without a chat template continues the prompt as text
        ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    return ids


@torch.no_grad()
def chat_side_by_side(base_folder: str, mod_folder: str | Path, prompts: tuple[str, ...] | list[str],
                      max_new_tokens: int = 48, on_row=None) -> list[dict]:
    """Greedy answers of the base and of the MoD checkpoint (loaded as users load it, with `trust_remote_code`) to
    each prompt, and the share of token-layer work the MoD model ran on each answer; `on_row` is called with each
    row as soon as it is there."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(mod_folder), trust_remote_code=True)  # as from the Hub
    base = AutoModelForCausalLM.from_pretrained(base_folder, dtype=torch.float32).eval()
    mod = AutoModelForCausalLM.from_pretrained(str(mod_folder), dtype=torch.float32, trust_remote_code=True).eval()
    greedy = dict(max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id
                  if tokenizer.pad_token_id is not None else tokenizer.eos_token_id)
    rows = []
    for prompt in prompts:
        ids = _chat_inputs(tokenizer, prompt)
        row = {"prompt": prompt}
        for name, model in (("base", base), ("mod", mod)):
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **greedy)
            row[name] = tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()
            if name == "mod":  # what the routers ran on prompt + answer, in one causal pass (routing is causal)
                routed = mod(input_ids=out, use_cache=False, output_router_decisions=True).router_decisions
                row["mod_kv_fraction"] = float(torch.stack([d.float().mean() for d in routed]).mean())
        rows.append(row)
        if on_row is not None:
            on_row(row)
    return rows
