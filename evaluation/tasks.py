"""Downstream tasks through lm-evaluation-harness (model `hf`, `trust_remote_code=True`): task lookup (local YAML
tasks run offline), one run per model, and the results-schema rows of MoD next to base."""

from __future__ import annotations

import difflib
import json
from pathlib import Path
from typing import Any

import torch


def task_manager(tasks: list[str], tasks_path: list[str] | None):
    """lm-eval's TaskManager for `tasks`, after checking that each is a known task/group/tag name, a glob matching
    one, or a task YAML file (a clear error otherwise).

    When every task is found among the local tasks of `tasks_path` alone, only those are indexed (indexing lm-eval's
    thousands of built-in task files takes seconds); otherwise the built-in tasks are indexed too.
    """
    from lm_eval.tasks import TaskManager

    for p in tasks_path or []:
        if not Path(p).exists():
            raise FileNotFoundError(f"no task folder or file at {p}")
    if tasks_path:
        local = TaskManager(include_path=list(tasks_path), include_defaults=False)
        if all(Path(name).is_file() or local.match_tasks([name]) for name in tasks):
            return local
    manager = TaskManager(include_path=list(tasks_path) if tasks_path else None)
    for name in tasks:
        if Path(name).is_file() or manager.match_tasks([name]):
            continue
        close = difflib.get_close_matches(name, manager.all_tasks, n=5)
        hint = f"; did you mean {', '.join(close)}?" if close else "; local tasks need --tasks-path"
        raise ValueError(f"unknown lm-eval task {name!r}{hint}")
    return manager


def run_lm_eval(
    pretrained: str,
    tasks: list[str],
    manager,
    device: torch.device,
    dtype: torch.dtype,
    batch_size: int | str = 1,
    limit: float | None = None,
    num_fewshot: int | None = None,
    trust_remote_code: bool = True,
) -> dict:
    """lm-eval's `simple_evaluate` with model `hf` on `pretrained`: returns its results (JSON-safe parts)."""
    from lm_eval import simple_evaluate

    out = simple_evaluate(
        model="hf",
        model_args={"pretrained": pretrained, "trust_remote_code": trust_remote_code,
                    "dtype": str(dtype).replace("torch.", "")},
        tasks=tasks, task_manager=manager, device=str(device), batch_size=batch_size, limit=limit,
        num_fewshot=num_fewshot, log_samples=False,
    )
    keep = {k: out[k] for k in ("results", "n-samples", "n-shot", "versions", "config") if k in out}
    return json.loads(json.dumps(keep, default=str))


def task_rows(mod_out: dict, base_out: dict | None) -> list[dict]:
    """Results-schema rows (`task`, `metric`, `mod`, `base`, `num_samples`, stderr) from lm-eval outputs."""
    rows = []
    for task, metrics in mod_out["results"].items():
        for key, value in metrics.items():
            if not isinstance(value, (int, float)) or isinstance(value, bool) or "_stderr" in key or "," not in key:
                continue
            metric, filt = key.split(",", 1)
            name = metric if filt == "none" else f"{metric} ({filt})"
            base_value = (base_out or {}).get("results", {}).get(task, {}).get(key)
            samples = mod_out.get("n-samples", {}).get(task, {})
            stderr_key = f"{metric}_stderr,{filt}"
            rows.append({
                "task": task,
                "metric": name,
                "mod": float(value),
                "base": float(base_value) if isinstance(base_value, (int, float)) else None,
                "num_samples": samples.get("effective") if isinstance(samples, dict) else None,
                "mod_stderr": _number_or_none(metrics.get(stderr_key)),
                "base_stderr": _number_or_none((base_out or {}).get("results", {}).get(task, {}).get(stderr_key)),
                "num_fewshot": _number_or_none(mod_out.get("n-shot", {}).get(task)),
            })
    return rows


def _number_or_none(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


