"""Helpers for the publishing tests: a small converted checkpoint with a results JSON, and Hub isolation."""

from __future__ import annotations

import json
import math
import re
import shutil
from pathlib import Path

from helpers import save_base

from modification.conversion.convert import convert_checkpoint
from modification.conversion.results import RESULTS_FILENAME, validate_results
from modification.conversion.settings import ConvertSettings

REPO_ID = "test-org/tiny-mod"
BASE_ID = "test-org/tiny-llama"
THRESHOLD = 0.55


def sample_results(base_id: str = BASE_ID) -> dict:
    """A results JSON with every section the schema defines (values chosen to be distinguishable)."""
    return validate_results({
        "schema_version": 2,
        "model": {"name_or_path": "tiny-mod", "base_model": base_id, "base_model_type": "llama"},
        "routing": {"router_kind": "threshold", "routed_layers": [1, 3], "router_threshold": THRESHOLD,
                    "gate_mode": "exact", "topk_capacity": 0.5, "calibration": None},
        "training": {"recipe": "routers", "data": ["test-org/tiny-text"], "steps": 120, "sequence_length": 256,
                     "learning_rate": 0.001, "tokens": 30720},
        "quality": {
            "perplexity": [
                {"dataset": "tiny-text", "context_length": 256, "tokens": 4096, "mod": 91.2345678, "base": 90.87},
                {"dataset": "tiny-text", "context_length": 64, "tokens": 1024, "mod": 97.5, "base": None},
            ],
            "lookup": [
                {"dataset": "tiny-text", "distance": 192, "passage_tokens": 32, "trials": 3,
                 "mod": {"accuracy": 0.4193, "loss": 3.377}, "base": {"accuracy": 0.7419, "loss": 1.2086}},
                {"dataset": "tiny-text", "distance": 96, "passage_tokens": 16, "trials": 5,
                 "mod": {"accuracy": 0.5867, "loss": 2.5}, "base": None},
            ],
            "passkey": [{"length": 479, "trials": 4, "mod": {"accuracy": 0.25, "loss": 0.99912},
                         "base": {"accuracy": 1.0, "loss": 0.0848}}],
            "tasks": [{"task": "tiny-cloze", "metric": "acc", "mod": 0.61, "base": 0.625, "num_samples": 200}],
        },
        "efficiency": {
            "kv_fraction": 0.7421875, "per_layer_routed_fraction": [1.0, 0.484375, 1.0, 0.5],
            "flop_fraction": {"64": 0.7583, "256": 0.7521, "4096": 0.7004},
            "latency": [{"context_length": 1024, "prefill_latency_ratio": 0.8123, "flop_fraction": 0.7312,
                         "kv_fraction": 0.7421, "peak_memory_ratio": None}],
            "decode": [{"batch_size": 4, "throughput_ratio": 1.07}],
            "hardware": {"device": "Test CPU", "device_type": "cpu", "dtype": "float32", "torch_threads": 2},
        },
        "commands": ["modification eval --model tiny-mod --base tiny-llama --data tiny-text"],
        "created": "2026-11-01",
    })


def make_checkpoint(root: Path, *, results: bool = True, base_license: str | None = "mit") -> Path:
    """Convert a tiny Llama (with a base model card giving its licence) into `root/mod`, with results.json."""
    base = save_base("llama", root / "base")
    if base_license:
        (base / "README.md").write_text(f"---\nlicense: {base_license}\n---\n# tiny base\n")
    out = convert_checkpoint(ConvertSettings(base=str(base), out=str(root / "mod"),
                                             routing={"router_threshold": THRESHOLD}))
    if results:
        (out / RESULTS_FILENAME).write_text(json.dumps(sample_results(), indent=2))
    return out


def copy_checkpoint(folder: Path, dest: Path) -> Path:
    shutil.copytree(folder, dest)
    return dest


def numeric_leaves(value) -> list[float | int]:
    """Every number in a JSON-like structure, numeric keys included."""
    if isinstance(value, bool):
        return []
    if isinstance(value, (int, float)):
        return [value] if not (isinstance(value, float) and math.isnan(value)) else []
    if isinstance(value, dict):  # keys that are numbers too (efficiency.flop_fraction is keyed by context length)
        return [int(k) for k in value if str(k).isdigit()] + [x for v in value.values() for x in numeric_leaves(v)]
    if isinstance(value, list):
        return [x for v in value for x in numeric_leaves(v)]
    return []


NUMBER = re.compile(r"(?<![\w.\-])\d+(?:\.\d+)?(?:e[+-]?\d+)?(?![\w.])")


def numbers_in_text(text: str, ignore: tuple[str, ...] = ()) -> list[str]:
    """Number tokens of a card's prose and tables: code blocks and the given literal strings are left out."""
    text = re.sub(r"```.*?```", " ", text, flags=re.S)
    text = re.sub(r"<!--.*?-->", " ", text, flags=re.S)
    for literal in ignore:
        text = text.replace(literal, " ")
    return NUMBER.findall(text)


def isolate_hub(monkeypatch, tmp_path: Path, endpoint: str | None = None, token: str | None = None) -> None:
    """In-process Hub settings for a test: no stored token, optional endpoint and token, Xet off (LFS path)."""
    from huggingface_hub import constants

    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-token-here"))
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)  # subprocesses (release steps) must reach the stub
    if endpoint:
        monkeypatch.setattr(constants, "ENDPOINT", endpoint)
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    if token:
        monkeypatch.setenv("HF_TOKEN", token)
