"""Healing data from the base's own chat answers (sequence-level self-distillation), made offline, once, and cached.

`train` heals a converted model by distilling its base's next-token distributions on some text. On plain prose an
instruct model is off its usual ground; on its own conversations it is on it. `chat_data` asks the base (greedy, in
its chat template) a few hundred questions and writes each whole conversation, rendered by the chat template, as one
`.jsonl` record, so that `modification train --data chat.jsonl` heals on text the base itself would write (as
sequence-level knowledge distillation does, Kim & Rush, arXiv 1606.07947).

The questions (`healing_prompts`) are made only from the train parts of the offline texts (`texts.prepare_texts`:
Shakespeare always once `fetch-corpus` ran, the KJV and GCIDE where their Debian packages are installed), never from
their held-out parts, so that evaluation on those stays unseen: passages of 60-150 words from evenly spread places,
put in templates (summarise, continue, explain a line, define a word, and look-up questions whose answer copies from
the passage, which exercises the attention that routing thins), plus one in eight from `GENERAL_PROMPTS`, written here.

The output goes to `cache_dir()/healing/<base>/chat-<n>-<hash>.jsonl`, the hash of what makes it (the base's
identity, the prompts, `max_new_tokens`, the chat template): a second run with the same settings reuses the file
without loading the model. Beside it `<file>.info` (JSON; not `.json`, which a `--data` folder would read as records)
records the base, the counts, the seconds and the tokens. Both are written atomically. An answer cut at
`max_new_tokens` is kept (`finished: false`): the chat template closes its turn all the same.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import re
import sys
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from .atomic import atomic_write_text
from .corpus import cache_dir

if TYPE_CHECKING:
    from .settings import ChatDataSettings

logger = logging.getLogger(__name__)

# Bumped whenever prompts, generation or the records change: older cached files are then not reused.
CHAT_DATA_VERSION = 1

PASSAGE_WORDS = (60, 150)
# Share of the prompts taken from GENERAL_PROMPTS (the rest are made from passages).
GENERAL_SHARE = 1 / 8

# Templates filled from one passage: {passage}, one of its lines ({line}) or one of its words ({word}). The look-up
# ones ask for what stands in the passage, so the answer copies from the prompt.
PASSAGE_TEMPLATES = {
    "summarise": "Summarise this passage in two sentences:\n\n{passage}",
    "line": 'What does this line mean? "{line}"',
    "continue": "Continue this text for a few sentences:\n\n{passage}",
    "define": 'Define the word "{word}" and use it in a sentence.',
    "first-mentioned": "Answer from the passage: who or what is mentioned first?\n\n{passage}",
    "quote-first": "Quote the first sentence of this passage exactly, then say what it is about.\n\n{passage}",
    "names": "List every name of a person or place that appears in this passage.\n\n{passage}",
    "rewrite": "Rewrite this passage in plain modern English:\n\n{passage}",
}

GENERAL_PROMPTS = (
    "What is the capital of France?",
    "Explain why the sky is blue in simple terms.",
    "Give me three tips for sleeping better.",
    "Write a short poem about the sea.",
    "What is the difference between weather and climate?",
    "How do plants make their food?",
    "Write a polite email asking a colleague to move a meeting to Friday.",
    "What are the three states of matter? Give an example of each.",
    "Explain what a prime number is and list the first five.",
    "Translate 'good morning, how are you?' into French and Spanish.",
    "What causes the seasons on Earth?",
    "Write a Python function that returns the largest number in a list.",
    "Summarise the story of Romeo and Juliet in three sentences.",
    "What is 17 multiplied by 23? Show your working.",
    "Give a short definition of photosynthesis.",
    "List five fruits that are rich in vitamin C.",
    "How does a bicycle stay upright when it moves?",
    "Explain the water cycle step by step.",
    "What is the boiling point of water at sea level, in Celsius and Fahrenheit?",
    "Suggest a name for a small bakery and explain your choice.",
    "Why do we have leap years?",
    "Write two sentences describing a rainy afternoon in a city.",
    "What is the difference between a virus and a bacterium?",
    "Explain what gravity is to a ten-year-old.",
    "Give three reasons why reading books is useful.",
    "Who wrote 'Pride and Prejudice', and what is it about?",
    "How many continents are there? Name them.",
    "Sort these words alphabetically: pear, apple, mango, banana, cherry.",
    "What does a thermometer measure, and how does it work?",
    "Write a short recipe for a simple vegetable soup.",
    "If a train travels 60 kilometres in 45 minutes, what is its average speed in km/h?",
    "Explain the meaning of the proverb 'a stitch in time saves nine'.",
)

# Places in a text that are not prose of the work (licence and transcription notes) and make poor prompts.
_BOILERPLATE = re.compile(r"gutenberg|\be-?text|copyright|electronic version|http|www\.|\*\*\*", re.IGNORECASE)
_SENTENCE_END = re.compile(r"[.!?;:]['\"]?$")
_WORD = re.compile(r"[A-Za-z]{7,}")


# --------------------------------------------------------------------------------------------------------------------
# The prompts
# --------------------------------------------------------------------------------------------------------------------


def _passage(lines: list[str], start: int) -> str | None:
    """60-150 words of whole lines from the first paragraph start at or after line `start` (a longer line is cut
    after a sentence, or at 150 words); None where that place is boilerplate or too short."""
    low, high = PASSAGE_WORDS
    # start where a paragraph (a speech, a chapter) starts, where one does within a few lines
    after_blank = next((i + 1 for i in range(start, min(start + 40, len(lines) - 1)) if not lines[i].strip()
                        and lines[i + 1].strip()), start)
    kept: list[str] = []
    words = 0
    for line in lines[after_blank:]:
        line = line.strip()
        if not line:
            if kept and kept[-1] != "":
                kept.append("")  # keep paragraph breaks
            continue
        tokens = line.split()
        if words + len(tokens) > high:
            tokens = tokens[:high - words]
            # end at the last sentence end that still leaves `low` words, where there is one
            ends = [i for i, t in enumerate(tokens, 1) if _SENTENCE_END.search(t) and words + i >= low]
            tokens = tokens[:ends[-1]] if ends else tokens
            kept.append(" ".join(tokens))
            words += len(tokens)
            break
        kept.append(line)
        words += len(tokens)
        if words >= low and _SENTENCE_END.search(line):
            break
    text = "\n".join(kept).strip()
    if words < low or _BOILERPLATE.search(text):
        return None
    return text


def _a_line(passage: str, rng: random.Random) -> str:
    """A line of the passage of 6-25 words (a sentence of one where its lines are long), else its first 15 words."""
    lines = [line for line in passage.splitlines() if 6 <= len(line.split()) <= 25]
    if not lines:
        lines = [s for s in re.split(r"(?<=[.!?;:])\s+", " ".join(passage.split())) if 6 <= len(s.split()) <= 25]
    return rng.choice(lines) if lines else " ".join(passage.split()[:15])


def _a_word(passage: str, rng: random.Random, kind: str) -> str:
    """A word worth defining: a GCIDE entry's headword, else a lower-case word of 7+ letters (not a name)."""
    if kind == "gcide":
        return passage.split(",", 1)[0].split("\n")[0].strip()
    words = sorted({w for w in _WORD.findall(passage) if w.islower()})
    return rng.choice(words) if words else max(re.findall(r"[A-Za-z]+", passage), key=len)


def _text_prompts(kind: str, lines: list[str], count: int, rng: random.Random, first_template: int) -> list[str]:
    """`count` prompts from passages at evenly spread places of one text (a place that gives no passage moves on)."""
    names = list(PASSAGE_TEMPLATES)
    prompts = []
    stride = len(lines) / count
    for i in range(count):
        start = int((i + rng.random() * 0.5) * stride)
        passage = None
        for tries in range(50):
            passage = _passage(lines, min(start + tries * 7, len(lines) - 1))
            if passage is not None:
                break
        if passage is None:
            raise ValueError(f"the {kind} train text has no passage of {PASSAGE_WORDS[0]}-{PASSAGE_WORDS[1]} words "
                             f"near line {start}")
        name = names[(first_template + i) % len(names)]
        template = PASSAGE_TEMPLATES[name]
        prompts.append((f"{kind}/{name}", template.format(passage=passage, line=_a_line(passage, rng),
                                                           word=_a_word(passage, rng, kind))))
    return prompts


def healing_prompt_sources(n: int, seed: int = 0, kinds: Iterable[str] | None = None) -> list[tuple[str, str]]:
    """`healing_prompts` with where each came from: (`<kind>/<template>` or `general`, prompt)."""
    from .texts import available_text_kinds, prepare_texts

    if n < 1:
        raise ValueError(f"n must be at least 1, got {n}")
    kinds = available_text_kinds() if kinds is None else list(kinds)
    if not kinds:
        kinds = ["shakespeare"]  # nothing is available: prepare_texts says how to fetch the corpus
    paths = prepare_texts(kinds)  # a missing source raises its clear error (fetch-corpus, apt-get install ...)
    rng = random.Random(seed)
    n_general = min(len(GENERAL_PROMPTS), int(n * GENERAL_SHARE))
    n_text = n - n_general
    prompts = [("general", p) for p in rng.sample(GENERAL_PROMPTS, n_general)]
    for k, kind in enumerate(kinds):
        count = n_text // len(kinds) + (k < n_text % len(kinds))
        if count == 0:
            continue
        lines = paths[kind]["train"].read_text(encoding="utf-8").splitlines()  # the train part only, never held-out
        prompts += _text_prompts(kind, lines, count, rng, first_template=k * 3)
    rng.shuffle(prompts)  # kinds and templates mixed through the file
    return prompts


def healing_prompts(n: int, seed: int = 0, kinds: Iterable[str] | None = None) -> list[str]:
    """`n` user prompts, the same for the same arguments: made from passages of the train parts of the offline texts
    `kinds` (default: every kind available here; Shakespeare alone is enough), plus about one in eight of
    `GENERAL_PROMPTS`. Held-out parts are never read."""
    return [prompt for _, prompt in healing_prompt_sources(n, seed, kinds)]


# --------------------------------------------------------------------------------------------------------------------
# The answers
# --------------------------------------------------------------------------------------------------------------------


def load_chat_tokenizer(folder: str):
    """The base's tokenizer, padding on the left (generation appends on the right); ValueError without a chat
    template."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(f"the tokenizer of {folder} has no chat template: chat-data needs a chat (instruct) base "
                         "whose conversations it can render")
    tokenizer.padding_side = "left"
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(folder: str):
    """The base in float32, on the GPU where there is one, in eval mode."""
    import torch
    from transformers import AutoModelForCausalLM

    device = "cuda" if torch.cuda.is_available() else "cpu"
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).to(device).eval()


def generate_chat_answers(folder: str, prompts: Sequence[str], max_new_tokens: int = 256, batch_size: int = 8,
                          progress: bool = True, tokenizer=None) -> list[dict]:
    """The base's greedy answer to each prompt in its chat template, in the prompts' order: records with `prompt`,
    `answer`, `text` (the whole conversation, user and assistant turn, as the chat template renders it: what `train`
    reads), `answer_tokens` and `finished` (the answer ended before `max_new_tokens`)."""
    import torch
    from tqdm.auto import tqdm

    from .progress import library_progress_bars

    tokenizer = tokenizer or load_chat_tokenizer(folder)
    with library_progress_bars(progress):
        model = load_model(folder)
    device = next(model.parameters()).device
    eos = model.generation_config.eos_token_id
    stops = {*(eos if isinstance(eos, list) else [eos]), tokenizer.eos_token_id} - {None}  # where an answer ends
    rendered = [tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                              tokenize=False) for p in prompts]
    # Batches of similar length waste less on padding; the records come back in the prompts' order.
    order = sorted(range(len(prompts)), key=lambda i: len(rendered[i]))
    records: list[dict | None] = [None] * len(prompts)
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    for batch in tqdm(batches, desc="answering", unit="batch", disable=not progress):
        inputs = tokenizer([rendered[i] for i in batch], add_special_tokens=False, padding=True,
                           return_tensors="pt").to(device)
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id)
        for row, i in enumerate(batch):
            new = out[row, inputs["input_ids"].shape[1]:].tolist()
            ends = [j for j, t in enumerate(new) if t in stops]
            kept = new[:ends[0]] if ends else new
            answer = tokenizer.decode(kept, skip_special_tokens=True).strip()
            text = tokenizer.apply_chat_template([{"role": "user", "content": prompts[i]},
                                                  {"role": "assistant", "content": answer}], tokenize=False)
            records[i] = {"prompt": prompts[i], "answer": answer, "text": text, "answer_tokens": len(kept),
                          "finished": bool(ends)}
    return records


# --------------------------------------------------------------------------------------------------------------------
# The step
# --------------------------------------------------------------------------------------------------------------------


def _base_identity(folder: str) -> str:
    """What the cache key knows of the base: a fetched base's provenance (its file hashes), else the weight files'
    names, sizes and times and the config, else (a Hub id) the id."""
    path = Path(folder)
    if (path / "PROVENANCE.md").is_file():
        return (path / "PROVENANCE.md").read_text(encoding="utf-8")
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix in (".safetensors", ".bin") or p.name == "config.json")
        return "\n".join(f"{p.name} {p.stat().st_size} {p.stat().st_mtime_ns}" for p in files)
    return folder


def chat_data_key(folder: str, prompts: Sequence[str], max_new_tokens: int, chat_template: str) -> str:
    """A short hash of everything the answers depend on."""
    digest = hashlib.sha256()
    for part in (str(CHAT_DATA_VERSION), _base_identity(folder), str(max_new_tokens), chat_template, *prompts):
        digest.update(part.encode("utf-8") + b"\0")
    return digest.hexdigest()[:12]


def _info_path(out: Path) -> Path:
    return out.with_name(out.name + ".info")


def _cached(out: Path, key: str) -> bool:
    """Whether `out` holds the answers keyed `key` (its `.info`, written last, says so)."""
    try:
        return out.is_file() and json.loads(_info_path(out).read_text(encoding="utf-8")).get("key") == key
    except (OSError, json.JSONDecodeError):
        return False


def chat_data(settings: ChatDataSettings) -> Path:
    """Write (or reuse) the base's answers to `settings.prompts` healing prompts as `.jsonl`; returns its path."""
    from .bases import KNOWN_BASES, base_hub_id, base_path
    from .local_paths import public_name

    folder = base_path(settings.base)  # a known base not fetched yet: the error names `fetch-base`
    tokenizer = load_chat_tokenizer(folder)  # no chat template: a clear error before any prompt is made
    sources = healing_prompt_sources(settings.prompts, settings.seed, settings.texts or None)
    prompts = [p for _, p in sources]
    key = chat_data_key(folder, prompts, settings.max_new_tokens, tokenizer.chat_template)
    # the cache folder is named by the base: a fetched base by its name, a folder by its own, a Hub id by its last part
    name = settings.base if settings.base in KNOWN_BASES else Path(folder).resolve().name
    default = cache_dir() / "healing" / name / f"chat-{settings.prompts}-{key}.jsonl"
    out = Path(settings.out) if settings.out else default
    if _cached(out, key) and not settings.overwrite:
        message = f"reusing {out} (made with these settings before; --overwrite answers again)"
        logger.info(message)
        if settings.progress:
            print(message, file=sys.stderr, flush=True)
        return out
    if out.exists() and not settings.overwrite:
        raise FileExistsError(f"{out} exists and was not made with these settings; pass --overwrite to replace it")
    start = time.monotonic()
    records = generate_chat_answers(folder, prompts, settings.max_new_tokens, settings.batch_size,
                                    progress=settings.progress, tokenizer=tokenizer)
    seconds = time.monotonic() - start
    text_tokens = sum(len(tokenizer(r["text"], add_special_tokens=False)["input_ids"]) for r in records)
    atomic_write_text(out, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    info = {
        "key": key,
        "base": base_hub_id(folder) or public_name(folder),
        "prompts": len(records),
        "max_new_tokens": settings.max_new_tokens,
        "batch_size": settings.batch_size,
        "seed": settings.seed,
        "seconds": round(seconds, 1),
        "answer_tokens": sum(r["answer_tokens"] for r in records),
        "text_tokens": text_tokens,
        "unfinished_answers": sum(not r["finished"] for r in records),
        "prompt_kinds": dict(sorted(Counter(source.split("/")[0] for source, _ in sources).items())),
        "prompt_templates": dict(sorted(Counter(source for source, _ in sources).items())),
        "version": CHAT_DATA_VERSION,
    }
    atomic_write_text(_info_path(out), json.dumps(info, indent=1) + "\n")  # last: marks the answers complete
    return out
