"""Text data for training, calibration and evaluation: read, tokenise, pack into fixed-length blocks, mix sources.

A data source is one of
- a `.txt` file (one document), a `.jsonl`/`.json` file (one document per record, field `text_field`), or a folder
  holding such files (read recursively, in sorted order);
- a folder written by `datasets.Dataset.save_to_disk`;
- a `datasets.load_dataset` name (works where the Hub is reachable or the dataset is in the local cache).
Documents are tokenised without special tokens, joined with the EOS token, and cut into blocks of `seq_len` tokens.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
from torch.utils.data import Dataset
from tqdm.auto import tqdm

TEXT_SUFFIXES = (".txt", ".md")
RECORD_SUFFIXES = (".jsonl", ".json")


class DataError(ValueError):
    """Data that cannot be used: missing, empty, unreadable, or too short for one block."""


def _looks_like_path(source: str) -> bool:
    # Hub dataset names are `name` or `org/name`; anything else that does not exist is a missing file or folder.
    return (source.startswith((".", "/", "~")) or source.count("/") > 1
            or Path(source).suffix in TEXT_SUFFIXES + RECORD_SUFFIXES + (".parquet", ".csv"))


def _read_records(path: Path, text_field: str) -> Iterator[str]:
    if path.suffix == ".jsonl":
        with path.open(encoding="utf-8") as f:
            for line_no, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as err:
                    raise DataError(f"{path}:{line_no} is not valid JSON: {err}") from err
                if text_field not in record:
                    raise DataError(f"{path}:{line_no} has no field {text_field!r} (set --text-field)")
                yield str(record[text_field])
        return
    try:
        records = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise DataError(f"{path} is not valid JSON: {err}") from err
    if not isinstance(records, list):
        raise DataError(f"{path} must hold a list of records with a {text_field!r} field")
    for record in records:
        if text_field not in record:
            raise DataError(f"a record in {path} has no field {text_field!r} (set --text-field)")
        yield str(record[text_field])


def read_documents(
    source: str, text_field: str = "text", split: str = "train", dataset_config: str | None = None
) -> Iterator[str]:
    """Yield the documents of one data source (see the module docstring)."""
    path = Path(source).expanduser()
    if path.is_file():
        if path.suffix in RECORD_SUFFIXES:
            yield from _read_records(path, text_field)
        else:
            yield path.read_text(encoding="utf-8", errors="replace")
        return
    if path.is_dir():
        if any((path / name).exists() for name in ("dataset_info.json", "state.json", "dataset_dict.json")):
            from datasets import load_from_disk

            dataset = load_from_disk(str(path))
            if hasattr(dataset, "keys"):  # a DatasetDict
                if split not in dataset:
                    raise DataError(f"{path} has splits {list(dataset)}, not {split!r} (use --split)")
                dataset = dataset[split]
            if text_field not in dataset.column_names:
                raise DataError(f"{path} has columns {dataset.column_names}, no {text_field!r} (use --text-field)")
            for record in dataset:
                yield str(record[text_field])
            return
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in TEXT_SUFFIXES + RECORD_SUFFIXES)
        if not files:
            raise DataError(f"folder {path} holds no .txt, .md, .jsonl or .json files")
        for file in files:
            yield from read_documents(str(file), text_field=text_field)
        return
    if _looks_like_path(source):
        raise DataError(f"data source {source} does not exist (no such file or folder)")
    from datasets import load_dataset

    try:
        # Streamed: a large Hub corpus is read only as far as the tokens asked for (`max_tokens`), not downloaded.
        dataset = load_dataset(source, dataset_config, split=split, streaming=True)
        records = iter(dataset)
        first = next(records, None)
    except Exception as err:  # datasets raises many types for unknown names / no network
        raise DataError(
            f"data source {source!r} is neither a local file/folder nor a loadable dataset "
            f"(datasets.load_dataset failed: {type(err).__name__}: {err})"
        ) from err
    if first is None:
        return
    if text_field not in first:
        raise DataError(f"dataset {source!r} has no column {text_field!r}; columns: {sorted(first)}")
    yield str(first[text_field])
    for record in records:
        yield str(record[text_field])


def load_texts(
    source: str, text_field: str = "text", split: str = "train", dataset_config: str | None = None
) -> list[str]:
    """The non-empty documents of one source, as a list; a source without text is an error."""
    texts = [t for t in read_documents(source, text_field, split, dataset_config) if t.strip()]
    if not texts:
        raise DataError(f"data source {source} holds no text")
    return texts


def tokenize_stream(
    documents: Iterator[str] | Sequence[str],
    tokenizer,
    max_tokens: int | None = None,
    desc: str = "tokenizing",
    progress: bool = True,
) -> torch.Tensor:
    """One 1-D token stream: each document's tokens (no special tokens) followed by EOS, cut at `max_tokens`."""
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    for doc in tqdm(documents, desc=desc, unit="doc", disable=not progress, leave=False):
        if not doc.strip():
            continue
        ids.extend(tokenizer(doc, add_special_tokens=False)["input_ids"])
        if eos is not None:
            ids.append(eos)
        if max_tokens is not None and len(ids) >= max_tokens:
            break
    return torch.tensor(ids[:max_tokens] if max_tokens is not None else ids, dtype=torch.long)


def tokenize_and_pack(
    documents: Iterator[str] | Sequence[str],
    tokenizer,
    seq_len: int,
    max_tokens: int | None = None,
    desc: str = "tokenizing",
    progress: bool = True,
) -> torch.Tensor:
    """Tokenise documents into one stream and cut it into `[n_blocks, seq_len]` (remainder dropped)."""
    if seq_len < 2:
        raise DataError(f"seq_len must be at least 2, got {seq_len}")
    ids = tokenize_stream(documents, tokenizer, max_tokens, desc, progress)
    n_blocks = ids.numel() // seq_len
    return ids[: n_blocks * seq_len].view(n_blocks, seq_len)


def load_blocks(
    sources: Sequence[str],
    tokenizer,
    seq_len: int,
    text_field: str = "text",
    split: str = "train",
    dataset_config: str | None = None,
    max_tokens_per_source: int | None = None,
    progress: bool = True,
) -> list[torch.Tensor]:
    """One `[n_blocks, seq_len]` tensor per source; a source too short for one block is an error."""
    if not sources:
        raise DataError("no data source given")
    blocks = []
    for source in sources:
        docs = read_documents(source, text_field=text_field, split=split, dataset_config=dataset_config)
        packed = tokenize_and_pack(docs, tokenizer, seq_len, max_tokens_per_source, desc=str(source), progress=progress)
        if packed.shape[0] == 0:
            raise DataError(f"data source {source} holds fewer than seq_len={seq_len} tokens: nothing to train on")
        blocks.append(packed)
    return blocks


def split_blocks(blocks: list[torch.Tensor], eval_fraction: float) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Hold out the last `eval_fraction` of each source's blocks (at least one block when the fraction is > 0)."""
    train, held_out = [], []
    for b in blocks:
        n_eval = 0 if eval_fraction <= 0 else max(1, int(round(b.shape[0] * eval_fraction)))
        if n_eval >= b.shape[0]:
            raise DataError(f"a source has only {b.shape[0]} blocks: too few to hold out {eval_fraction:.0%}")
        train.append(b[: b.shape[0] - n_eval])
        held_out.append(b[b.shape[0] - n_eval :])
    return train, held_out


def mix_blocks(
    blocks: list[torch.Tensor], weights: Sequence[float] | None = None, num_blocks: int | None = None, seed: int = 0
) -> torch.Tensor:
    """Mix sources by weight into `num_blocks` blocks (default: all blocks once when weights are equal).

    Each source contributes `round(w_i / sum(w) * num_blocks)` blocks, taken from a shuffled order and repeated
    when a small source must supply more blocks than it has.
    """
    weights = list(weights) if weights is not None else [float(b.shape[0]) for b in blocks]
    if len(weights) != len(blocks):
        raise DataError(f"{len(weights)} data weights given for {len(blocks)} data sources")
    if any(w < 0 for w in weights) or sum(weights) <= 0:
        raise DataError(f"data weights must be non-negative and not all zero, got {weights}")
    total = num_blocks if num_blocks is not None else sum(b.shape[0] for b in blocks)
    rng = random.Random(seed)
    chosen = []
    for b, w in zip(blocks, weights):
        n = int(round(w / sum(weights) * total))
        order = list(range(b.shape[0]))
        rng.shuffle(order)
        picks = [order[i % len(order)] for i in range(n)]
        chosen.append(b[picks])
    mixed = torch.cat(chosen)
    return mixed[torch.randperm(mixed.shape[0], generator=torch.Generator().manual_seed(seed))]


def repeat_passages(blocks: torch.Tensor, share: float, passage_tokens: int, seed: int = 0) -> torch.Tensor:
    """A copy of `blocks` in which `share` of them (chosen at random) end with a verbatim repeat of an earlier passage
    of the same block: the last `passage_tokens` tokens are replaced by the `passage_tokens` tokens at a random
    position before them, so that the passage is repeated from anywhere between `passage_tokens` and
    `seq_len - passage_tokens` tokens back.

    Natural text rarely asks a model to copy from far back, and healing on it leaves look-up where removal put it
    (issue 20's first measurements); a teacher predicts the repeat from context, and a student that matches it there
    must learn to look back too. Other blocks, and everything before the repeat, are left as they are."""
    n, seq_len = blocks.shape
    if not 0.0 <= share <= 1.0:
        raise DataError(f"repeat_share must lie in [0, 1], got {share}")
    if share > 0 and not 1 <= passage_tokens <= seq_len // 2:
        raise DataError(f"repeat_tokens must lie in [1, seq_len // 2 = {seq_len // 2}] so that a passage fits twice "
                        f"in a block, got {passage_tokens}")
    if share == 0:
        return blocks
    out = blocks.clone()
    generator = torch.Generator().manual_seed(seed)
    chosen = torch.randperm(n, generator=generator)[: int(round(share * n))]
    end = seq_len - passage_tokens  # the repeat fills [end, seq_len); its source starts in [0, end - passage_tokens]
    starts = torch.randint(0, end - passage_tokens + 1, (chosen.numel(),), generator=generator)
    for i, start in zip(chosen.tolist(), starts.tolist()):
        out[i, end:] = blocks[i, start : start + passage_tokens]
    return out


class PackedBlocks(Dataset):
    """Blocks of token ids as a causal-LM dataset (`labels` = `input_ids`; the model shifts them)."""

    def __init__(self, blocks: torch.Tensor):
        self.blocks = blocks

    def __len__(self) -> int:
        return self.blocks.shape[0]

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.blocks[i], "labels": self.blocks[i]}


def add_data_arguments(parser, required: bool = True, default_split: str = "train") -> None:
    """The data flags every command shares: `--data SOURCE [SOURCE ...]` (repeatable), field, split, config."""
    group = parser.add_argument_group("data")
    group.add_argument("--data", nargs="+", action="extend", required=required, default=None, metavar="SOURCE",
                       help=".txt/.jsonl/.json files or folders, save_to_disk folders, or datasets.load_dataset names")
    group.add_argument("--text-field", default="text", help="field holding the text in jsonl/json/datasets records")
    group.add_argument("--split", default=default_split, help=f"split of a datasets source (default {default_split})")
    group.add_argument("--data-config", default=None, help="config of a datasets source (e.g. wikitext-2-raw-v1)")
