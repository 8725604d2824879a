"""A last-word (LAMBADA-style) task from the held-out offline texts (`conversion/texts.py`).

Passages of 60-119 words from held-out text, cut right before a word of at least 4 letters (not a common function
word) that already appeared earlier in the passage, as LAMBADA's passages are chosen so that the
word can be inferred from the context. `write_last_word_task` writes lm-eval YAML tasks and their `jsonl` data (fields
`text`, the context, and `target`, the word), scored like `lambada_openai`: `output_type: loglikelihood`, the context
then " word" as continuation, metric `acc` = lm-eval's `is_greedy` (every token of the word is the model's argmax).
Task `modification_last_word` holds the examples of every kind (200 per kind by default); one task per kind,
`modification_last_word_<kind>`, holds that kind's alone, and the tag `modification_last_word_kinds` names them all:

    modification eval --model CKPT --tasks modification_last_word_kinds --tasks-path FOLDER

`last_word_accuracy` computes the same number in plain PyTorch, without lm-eval (nor its start-up and dataset cache).
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch

from modification.conversion.texts import (
    TextSourceMissingError,
    _check_kinds,
    atomic_write_text,
    available_text_kinds,
    prepare_texts,
)

LAST_WORD_TASK = "modification_last_word"
LAST_WORD_TAG = "modification_last_word_kinds"
MIN_CONTEXT_WORDS, MAX_CONTEXT_WORDS = 60, 120
MIN_TARGET_LETTERS = 4


# --------------------------------------------------------------------------------------------------------------------
# The last-word task
# --------------------------------------------------------------------------------------------------------------------

# Common words of 4+ letters that a model guesses from grammar alone; LAMBADA's targets are content words.
STOPWORDS = frozenset("""
about above after again against also among been before being below between both came come could does doing done
down during each even every from have having here hers herself himself into itself just like made make many more
most much must myself never only other ought ours ourselves over said same shall should some such than that their
theirs them themselves then there these they this those thou thee thine thus thy through till unto upon very were
what when where which while whom whose will with would your yours yourself yourselves hath doth shalt wilt unto
whereof thereof therefore because until within without hast dost didst canst wouldst shouldst
""".split())
_TARGET = re.compile(r"^([A-Za-z]+)[.,;:!?\")\]]*$")
_SENTENCE_END = re.compile(r"[.!?][\"')\]]*$")


def last_word_examples(text: str, n_examples: int | None = 200, seed: int = 0,
                       min_words: int = MIN_CONTEXT_WORDS, max_words: int = MAX_CONTEXT_WORDS) -> list[dict]:
    """LAMBADA-style examples from `text`: {"text": context, "target": word}, non-overlapping, `n_examples` of them
    drawn at random (seeded) from all the text offers (all of them when None or when the text offers fewer).

    The text is read as whitespace-separated words and walked once: a passage starts at the first sentence start
    among its first 30 words and ends right before a target chosen at random among the words `min_words` to
    `max_words` - 1 after its start that (a) are made of at least 4 letters, with nothing but closing punctuation
    after them, (b) are not a common function word (`STOPWORDS`) and (c) already appeared (case-insensitively) in the
    passage. The context is the passage's words joined by single spaces; the next passage starts after the target.
    """
    rng = random.Random(seed)
    words = text.split()
    examples = []
    start = 0
    while start + min_words < len(words):
        for j in range(start, min(start + 30, len(words))):
            if _SENTENCE_END.search(words[j]):
                start = j + 1
                break
        seen: set[str] = set()
        for w in words[start:start + min_words]:
            seen.update(re.findall(r"[a-z]+", w.lower()))
        candidates = []
        for i in range(start + min_words, min(start + max_words, len(words))):
            match = _TARGET.match(words[i])
            if match and len(match.group(1)) >= MIN_TARGET_LETTERS:
                word = match.group(1)
                if word.lower() not in STOPWORDS and word.lower() in seen:
                    candidates.append((i, word))
            seen.update(re.findall(r"[a-z]+", words[i].lower()))
        if not candidates:
            start += max_words
            continue
        i, word = rng.choice(candidates)
        examples.append({"text": " ".join(words[start:i]), "target": word})
        start = i + 1
    if n_examples is not None and len(examples) > n_examples:
        examples = [examples[i] for i in sorted(rng.sample(range(len(examples)), n_examples))]
    return examples


def _clean_boundary(tokenizer, example: dict) -> bool:
    context = tokenizer.encode(example["text"])
    return tokenizer.encode(example["text"] + " " + example["target"])[:len(context)] == context


def clean_boundary_examples(text: str, tokenizer, n_examples: int = 200, seed: int = 0) -> list[dict]:
    """`n_examples` last-word examples of `text` (drawn at random, seeded) among those whose context tokens are a
    prefix of the tokens of context + " " + word: both scorers split the word off there, and a merge across that
    boundary would score part of the context."""
    examples = [e for e in last_word_examples(text, None, seed=seed) if _clean_boundary(tokenizer, e)]
    if len(examples) > n_examples:
        rng = random.Random(seed)
        examples = [examples[i] for i in sorted(rng.sample(range(len(examples)), n_examples))]
    return examples


def _task_yaml(task: str, data: Path, tag: str | None = None) -> str:
    tag_line = f"tag:\n  - {tag}\n" if tag else ""
    return f"""{tag_line}task: {task}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {json.dumps(str(data.resolve()))}
test_split: test
output_type: loglikelihood
doc_to_text: "{{{{text}}}}"
doc_to_target: "{{{{' ' + target}}}}"
metric_list:
  - metric: perplexity
    aggregation: perplexity
    higher_is_better: false
  - metric: acc
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""


def write_last_word_task(folder: Path, tokenizer_free: bool = True, kinds: Iterable[str] | None = None,
                         n_examples: int = 200, seed: int = 0, tokenizer=None,
                         texts: dict[str, str] | None = None) -> Path:
    """Write the last-word tasks for lm-eval into `folder`; returns the path of the main YAML.

    - `modification_last_word.yaml`: task `modification_last_word` over all examples of all kinds
      (`last_word.jsonl`, each row also naming its `kind`);
    - `modification_last_word_<kind>.yaml`: one task per kind (`last_word_<kind>.jsonl`), all tagged
      `modification_last_word_kinds`, so `--tasks modification_last_word_kinds` runs them one by one.

    `n_examples` examples per kind (`last_word_examples` on the kind's held-out text; `seed` picks them). `kinds`
    defaults to the kinds available on this machine; `texts` (name -> held-out text) replaces the prepared texts.
    `tokenizer_free=True`: examples are chosen from words alone, so one task serves every model. With False, pass
    `tokenizer`: examples whose word does not split off at a token boundary are dropped (`clean_boundary_examples`).
    """
    if not tokenizer_free and tokenizer is None:
        raise ValueError("tokenizer_free=False needs the tokenizer whose boundaries the examples are checked against")
    if texts is None:
        kinds = available_text_kinds() if kinds is None else _check_kinds(kinds)
        if not kinds:
            raise TextSourceMissingError("no evaluation text is available: fetch the corpus (`modification "
                                         "fetch-corpus`) or `apt-get install bible-kjv bible-kjv-text dict-gcide`")
        paths = prepare_texts(kinds)
        texts = {kind: paths[kind]["held_out"].read_text(encoding="utf-8") for kind in kinds}
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    every = []
    for kind, text in texts.items():
        if not re.fullmatch(r"[A-Za-z0-9_]+", kind):
            raise ValueError(f"text kind names become task names: {kind!r} must be letters, digits and _")
        examples = (last_word_examples(text, n_examples, seed=seed) if tokenizer_free
                    else clean_boundary_examples(text, tokenizer, n_examples, seed=seed))
        if not examples:
            raise ValueError(f"the held-out text of {kind!r} offers no last-word example")
        data = folder / f"last_word_{kind}.jsonl"
        atomic_write_text(data, "".join(json.dumps({**e, "kind": kind}) + "\n" for e in examples))
        atomic_write_text(folder / f"{LAST_WORD_TASK}_{kind}.yaml", _task_yaml(f"{LAST_WORD_TASK}_{kind}", data,
                                                                                LAST_WORD_TAG))
        every.extend({**e, "kind": kind} for e in examples)
    data = folder / "last_word.jsonl"
    atomic_write_text(data, "".join(json.dumps(e) + "\n" for e in every))
    return atomic_write_text(folder / f"{LAST_WORD_TASK}.yaml", _task_yaml(LAST_WORD_TASK, data))


def read_examples(path: Path) -> list[dict]:
    """The examples of a `jsonl` file written by `write_last_word_task`."""
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


# --------------------------------------------------------------------------------------------------------------------
# Scoring without lm-eval
# --------------------------------------------------------------------------------------------------------------------


def encode_example(tokenizer, example: dict) -> tuple[list[int], list[int]]:
    """(context tokens, word tokens) as lm-eval's `hf` model splits them: the tokens of context + " " + word, cut
    after as many tokens as the context alone has (the tokenizer's default special tokens, like lm-eval)."""
    context = example["text"].rstrip()
    continuation = example["text"][len(context):] + " " + example["target"]
    whole = tokenizer.encode(context + continuation)
    n_context = len(tokenizer.encode(context))
    return whole[:n_context], whole[n_context:]


@torch.no_grad()
def last_word_scores(model, tokenizer, examples: Sequence[dict], batch_size: int = 8) -> list[tuple[float, bool]]:
    """(log-likelihood of " word" given the context, whether every token of it is the model's argmax) per example.

    Batches of similar length, left-padded with an attention mask and matching position ids; only the logits that
    predict the word's tokens are computed (`logits_to_keep`). A sequence longer than the model's
    `max_position_embeddings` keeps its last tokens, as lm-eval does.
    """
    device = next(model.parameters()).device
    pairs = [encode_example(tokenizer, e) for e in examples]
    if any(not cont for _, cont in pairs):
        raise ValueError("an example's word has no tokens of its own")
    max_len = getattr(model.config, "max_position_embeddings", None)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    order = sorted(range(len(pairs)), key=lambda i: -(len(pairs[i][0]) + len(pairs[i][1])))
    results: list[tuple[float, bool] | None] = [None] * len(pairs)
    for begin in range(0, len(order), batch_size):
        batch = order[begin:begin + batch_size]
        rows = []
        for i in batch:
            full = pairs[i][0] + pairs[i][1]
            if max_len:
                full = full[-(max_len + 1):]
            rows.append(full[:-1])
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), pad, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for r, row in enumerate(rows):
            ids[r, width - len(row):] = torch.tensor(row)
            mask[r, width - len(row):] = 1
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        keep = max(len(pairs[i][1]) for i in batch)
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device), position_ids=positions.to(device),
                       logits_to_keep=keep, use_cache=False).logits
        logprobs = torch.log_softmax(logits.float(), dim=-1)
        for r, i in enumerate(batch):
            target = torch.tensor(pairs[i][1], device=device)
            scores = logprobs[r, keep - len(target):]
            results[i] = (float(scores.gather(-1, target[:, None]).sum()), bool((scores.argmax(-1) == target).all()))
    return results  # type: ignore[return-value]


def last_word_accuracy(model, tokenizer, examples: Sequence[dict] | Path | str, batch_size: int = 8) -> float:
    """Share of examples whose word the model predicts greedily, every token of it: lm-eval's `acc` on the task
    (examples: dicts with `text` and `target`, or the path of a task's `jsonl` file)."""
    if isinstance(examples, (str, Path)):
        examples = read_examples(Path(examples))
    if not examples:
        raise ValueError("no examples to score")
    scores = last_word_scores(model, tokenizer, examples, batch_size=batch_size)
    return sum(greedy for _, greedy in scores) / len(scores)
