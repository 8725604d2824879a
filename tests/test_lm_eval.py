"""Downstream tasks through lm-evaluation-harness: a local multiple-choice task (YAML + jsonl written here) runs
offline on a tiny MoD checkpoint loaded by lm-eval's `hf` model through AutoModel with trust_remote_code, and its
accuracy is the one our own scoring gives."""

import json
import os
import subprocess
import sys

import pytest
import torch
from helpers import routed_model, save_base, tiny_base, tiny_tokenizer
from test_evaluation import _routed_checkpoint

from modification.conversion.results import load_results


def _write_task(folder, docs: int = 16, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    words = lambda n: " ".join(f"w{int(i)}" for i in torch.randint(3, 90, (n,), generator=gen))  # noqa: E731
    rows = [{"query": words(6), "choices": [words(2) for _ in range(4)],
             "gold": int(torch.randint(0, 4, (1,), generator=gen))} for _ in range(docs)]
    folder.mkdir()
    data = folder / "tiny_mc.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / "tiny_mc.yaml").write_text(f"""task: tiny_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{query}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: gold
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
""")
    return rows


@torch.no_grad()
def _expected_accuracy(model, rows) -> float:
    """lm-eval's `acc` for multiple choice, computed here: argmax over choices of log p(" " + choice | query)."""
    tok = tiny_tokenizer()
    correct = 0
    for row in rows:
        context = tok(row["query"])["input_ids"]
        scores = []
        for choice in row["choices"]:
            cont = tok(choice)["input_ids"]
            ids = torch.tensor([context + cont])
            logprobs = torch.log_softmax(model(ids).logits[0, :-1].float(), -1)
            scores.append(sum(logprobs[len(context) - 1 + j, t].item() for j, t in enumerate(cont)))
        correct += int(max(range(len(scores)), key=scores.__getitem__) == row["gold"])
    return correct / len(rows)


def test_lm_eval_local_task_runs_offline_on_mod_and_base(tmp_path):
    base_dir = save_base("llama", tmp_path / "base")
    ck = _routed_checkpoint(tmp_path / "mod")
    rows = _write_task(tmp_path / "tasks")
    expected_mod, expected_base = _expected_accuracy(routed_model("llama"), rows), _expected_accuracy(
        tiny_base("llama"), rows)
    assert expected_mod != expected_base  # so the check below tells which model lm-eval ran
    out = tmp_path / "out"
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", HF_EVALUATE_OFFLINE="1",
               HF_HOME=str(tmp_path / "hf"))
    env.pop("HF_MODULES_CACHE", None)
    command = [sys.executable, "-m", "modification.cli", "eval", "--model", str(ck), "--base",
               str(base_dir), "--tasks", "tiny_mc", "--tasks-path", str(tmp_path / "tasks"), "--tasks-batch-size",
               "2", "--out", str(out), "--no-progress"]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-4000:]
    tasks = load_results(out)["quality"]["tasks"]
    assert [(r["task"], r["metric"]) for r in tasks] == [("tiny_mc", "acc")]
    row = tasks[0]
    assert row["mod"] == pytest.approx(expected_mod) and row["base"] == pytest.approx(expected_base)
    assert row["num_samples"] == len(rows) and row["mod_stderr"] > 0
    assert "task tiny_mc acc" in result.stdout
