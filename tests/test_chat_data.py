"""Healing data from the base's own chat answers (`conversion/chat_data.py`, `modification chat-data`): prompts made
only from the texts' train parts, deterministic; greedy answers rendered by the chat template, readable by `--data`;
written once and reused without loading the model; clear errors."""

import json
import random

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from modification.cli.main import main
from modification.conversion import chat_data as chat_data_module
from modification.conversion import texts
from modification.conversion.chat_data import (
    GENERAL_PROMPTS,
    PASSAGE_TEMPLATES,
    chat_data,
    generate_chat_answers,
    healing_prompt_sources,
    healing_prompts,
)
from modification.conversion.data import load_texts
from modification.conversion.settings import ChatDataSettings
from modification.conversion.steps import SettingsError
from modification.conversion.texts import TEXTS_VERSION

HELD_OUT_MARK = "zyxheldout"
# A ChatML-like template with the tokenizer's own special tokens.
CHAT_TEMPLATE = ("{% for m in messages %}<|begin_of_text|>{{ m['role'] }}\n{{ m['content'] }}<|end_of_text|>\n"
                 "{% endfor %}{% if add_generation_prompt %}<|begin_of_text|>assistant\n{% endif %}")


def _train_text(lines: int = 1500) -> str:
    """Verse-like English: lines of 6-12 words, sentences ending in full stops, some names and long words."""
    rng = random.Random(1)
    words = ("the and of to a in that is my with for his your this not but be have me what so him her by all as "
             "thee thou lord king night heaven remember honourable gentlemen messenger kingdom fortune").split()
    names = ["Orlando", "Rosalind", "Celia", "Oliver", "Verona"]
    out = []
    for i in range(lines):
        line = [rng.choice(words) for _ in range(rng.randint(6, 12))]
        if i % 3 == 0:
            line[rng.randrange(len(line))] = rng.choice(names)
        out.append(" ".join(line).capitalize() + ("." if i % 2 else ","))
        if i % 20 == 19:
            out.append("")
    return "\n".join(out) + "\n"


@pytest.fixture
def texts_cache(monkeypatch, tmp_path):
    """A cache holding a prepared `shakespeare` text (train and held-out) and nothing else."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("MODIFICATION_CACHE", str(cache))
    folder = cache / "texts" / "shakespeare"
    folder.mkdir(parents=True)
    (folder / "train.txt").write_text(_train_text())
    (folder / "held_out.txt").write_text("\n".join(f"{HELD_OUT_MARK} line {i} of the held-out part."
                                                   for i in range(500)))
    (folder / "SOURCE").write_text(f"version: {TEXTS_VERSION}\nkind: shakespeare\n")
    return cache


@pytest.fixture(scope="module")
def chat_base(tmp_path_factory):
    """A tiny random Llama with a BPE tokenizer and a chat template."""
    from modification.conversion.corpus import train_tokenizer

    folder = tmp_path_factory.mktemp("chatbase")
    tokenizer = train_tokenizer([_train_text()], vocab_size=300)
    tokenizer.chat_template = CHAT_TEMPLATE
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=True)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_prompts_are_deterministic_varied_and_from_the_train_part_only(texts_cache, monkeypatch):
    prompts = healing_prompts(40, seed=0, kinds=["shakespeare"])
    assert len(prompts) == 40 and prompts == healing_prompts(40, seed=0, kinds=["shakespeare"])
    assert prompts != healing_prompts(40, seed=1, kinds=["shakespeare"])
    assert not [p for p in prompts if HELD_OUT_MARK in p]
    sources = [source for source, _ in healing_prompt_sources(40, seed=0, kinds=["shakespeare"])]
    assert sources.count("general") == 5 and sum(p in GENERAL_PROMPTS for p in prompts) == 5
    assert {f"shakespeare/{name}" for name in PASSAGE_TEMPLATES} <= set(sources)  # every template is used
    train = (texts_cache / "texts" / "shakespeare" / "train.txt").read_text()
    for prompt in prompts:
        if "\n\n" in prompt:  # a passage: whole lines of the train text, 60-150 words
            passage = prompt.split("\n\n", 1)[1]
            assert 60 <= len(passage.split()) <= 150
            assert all(line in train for line in passage.splitlines())
    # the default kinds are those available here; with none, Shakespeare (here prepared; else the fetch-corpus error)
    monkeypatch.setattr(texts, "available_text_kinds", lambda: [])
    assert healing_prompts(40) == prompts
    monkeypatch.setenv("MODIFICATION_CACHE", str(texts_cache.parent / "empty"))
    with pytest.raises(FileNotFoundError, match="fetch-corpus"):
        healing_prompts(4)


def test_answers_are_whole_conversations_that_train_reads(texts_cache, chat_base, tmp_path):
    prompts = healing_prompts(5, kinds=["shakespeare"])
    records = generate_chat_answers(str(chat_base), prompts, max_new_tokens=6, batch_size=2, progress=False)
    assert [r["prompt"] for r in records] == prompts  # the prompts' order, whatever the batches
    for r in records:
        assert r["prompt"] in r["text"] and r["answer"] in r["text"]
        assert r["text"].startswith("<|begin_of_text|>user\n") and "assistant\n" in r["text"]
        assert 0 < r["answer_tokens"] <= 6 or r["finished"]
    # the same greedy answers one at a time (left padding changes nothing)
    alone = generate_chat_answers(str(chat_base), prompts[:2], max_new_tokens=6, batch_size=1, progress=False)
    assert [r["answer"] for r in alone] == [r["answer"] for r in records[:2]]
    path = tmp_path / "chat.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    assert load_texts(str(path)) == [r["text"] for r in records]


def test_the_step_writes_once_and_reuses_without_loading_the_model(texts_cache, chat_base, monkeypatch, capsys):
    settings = ChatDataSettings(base=str(chat_base), prompts=6, max_new_tokens=4, batch_size=4, texts=["shakespeare"],
                                progress=False)
    out = chat_data(settings)
    assert out.parent == texts_cache / "healing" / chat_base.name and out.name.startswith("chat-6-")
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(records) == 6 and load_texts(str(out)) == [r["text"] for r in records]
    info = json.loads(out.with_name(out.name + ".info").read_text())
    assert info["prompts"] == 6 and info["max_new_tokens"] == 4 and info["seconds"] >= 0
    assert info["answer_tokens"] == sum(r["answer_tokens"] for r in records) and info["text_tokens"] > 0
    assert info["prompt_kinds"] == {"shakespeare": 6}  # 6 // 8 = 0 general prompts
    assert str(texts_cache) not in json.dumps(info)  # no local path

    def no_model(folder):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(chat_data_module, "load_model", no_model)
    stamp = out.stat().st_mtime_ns
    assert chat_data(settings) == out and out.stat().st_mtime_ns == stamp
    # other settings make another file; an explicit --out holding other answers is not replaced silently
    other = chat_data_module.chat_data_key(str(chat_base), healing_prompts(6, seed=1, kinds=["shakespeare"]), 4, "t")
    assert other not in out.name
    with pytest.raises(FileExistsError, match="--overwrite"):
        chat_data(ChatDataSettings(base=str(chat_base), prompts=6, max_new_tokens=5, out=str(out),
                                   texts=["shakespeare"], progress=False))
    # the command prints the path it wrote (here: reused)
    assert main(["chat-data", "--base", str(chat_base), "--prompts", "6", "--max-new-tokens", "4",
                 "--batch-size", "4", "--texts", "shakespeare", "--no-progress"]) == 0
    assert capsys.readouterr().out.strip() == str(out)


def test_clear_errors(texts_cache, chat_base, tmp_path):
    from transformers import AutoTokenizer

    plain = tmp_path / "plain-base"
    LlamaForCausalLM.from_pretrained(chat_base).save_pretrained(plain)
    tokenizer = AutoTokenizer.from_pretrained(chat_base)
    tokenizer.chat_template = None
    tokenizer.save_pretrained(plain)
    (plain / "chat_template.jinja").unlink(missing_ok=True)
    with pytest.raises(ValueError, match="plain-base has no chat template"):
        chat_data(ChatDataSettings(base=str(plain), prompts=2, progress=False))
    with pytest.raises(ValueError, match="plain-base has no chat template"):
        generate_chat_answers(str(plain), ["hi"], progress=False)
    for bad, match in (({"prompts": 0}, "prompts must be at least 1"), ({"batch_size": 0}, "batch_size"),
                       ({"max_new_tokens": 0}, "max_new_tokens"), ({"texts": ["wikipedia"]}, "unknown kind"),
                       ({"prompts": "many"}, "must be an integer")):
        with pytest.raises(SettingsError, match=match):
            ChatDataSettings(**bad)
    with pytest.raises(FileNotFoundError, match="fetch-base smollm2-135m-instruct"):
        chat_data(ChatDataSettings(prompts=2, progress=False))  # the default base, not fetched in this cache
