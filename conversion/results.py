"""The results JSON: what `modification eval` / `bench` measure and what the model card shows.

One file per checkpoint (`results.json` in the checkpoint folder by default). Every number a model card prints comes
from here. Sections are optional where a measurement was not made, but what is present must have the right shape;
`validate_results` raises a `ValueError` naming the first bad field.

Schema (version 1):

    {
      "schema_version": 1,
      "model": {"name_or_path": str, "base_model": str | null, "base_model_type": str | null},
      "routing": {<every MoDConfig routing field (ROUTING_FIELDS)>: its value, "calibration": dict | null},
      "training": null | {"recipe": str, "data": [str], "steps": int, "sequence_length": int,
                          "learning_rate": float, "tokens": int, ...},
      "quality": {
        "perplexity": [{"dataset": str, "context_length": int, "tokens": int, "mod": float, "base": float | null,
                        # optional (written by `modification eval`):
                        "stride": int, "windows": int, "executed_fraction": float}],
        "tasks": [{"task": str, "metric": str, "mod": float, "base": float | null, "num_samples": int | null,
                   # optional (lm-eval's standard errors and shots):
                   "mod_stderr": float | null, "base_stderr": float | null, "num_fewshot": int | null}]
      },
      "efficiency": {
        "executed_fraction": float, "per_layer_routed_fraction": [float], "kv_ratio": float | null,
        # optional: the text the three numbers above were counted on
        "measured_on": {"data": [str], "context_lengths": [int], "tokens": int},
        "latency": [{"context_length": int, "prefill_latency_ratio": float, "ideal_latency_ratio": float,
                     "kv_ratio": float | null, "peak_memory_ratio": float | null,
                     # optional (written by `modification bench`):
                     "prefill_latency_ratio_iqr": float, "executed_fraction": float,
                     "mod_prefill_seconds": float, "base_prefill_seconds": float}],
        "decode": [{"batch_size": int, "throughput_ratio": float,
                    # optional (written by `modification bench`):
                    "ideal_throughput_ratio": float | null, "mod_tokens_per_second": float,
                    "base_tokens_per_second": float, "prompt_length": int, "new_tokens": int,
                    "kv_ratio": float | null, "peak_memory_ratio": float | null}],
        "hardware": {"device": str, "device_type": str, "dtype": str, ...}
      },
      "commands": [str],      # the commands that produced the numbers
      "created": str,         # ISO date
      "updated": str          # optional: ISO date of the last merge
    }

Ratios are MoD / base. `peak_memory_ratio` is null where peak memory was not measured (CPU). The file is published
with the checkpoint, so it names no path of this machine: `update_results` writes public names (`local_paths`).
"""

from __future__ import annotations

import datetime
import json
import logging
import os
from pathlib import Path
from typing import Any

from .local_paths import public_command, public_name, public_strings


logger = logging.getLogger(__name__)

SCHEMA_VERSION = 1
RESULTS_FILENAME = "results.json"

_NUMBER = (int, float)


def _check(cond: bool, field: str, expected: str) -> None:
    if not cond:
        raise ValueError(f"results field {field!r} must be {expected}")


_OPTIONAL_NUMBER = (*_NUMBER, type(None))


def _check_rows(rows: Any, field: str, required: dict[str, tuple], optional: dict[str, tuple] | None = None) -> None:
    _check(isinstance(rows, list), field, "a list")
    for i, row in enumerate(rows):
        _check(isinstance(row, dict), f"{field}[{i}]", "an object")
        for key, types in required.items():
            _check(key in row and isinstance(row[key], types), f"{field}[{i}].{key}", f"of type {types}")
        for key, types in (optional or {}).items():
            _check(key not in row or isinstance(row[key], types), f"{field}[{i}].{key}", f"of type {types}")


def validate_results(results: dict) -> dict:
    """Check the shape of a results dict (see the module docstring); returns it unchanged."""
    _check(isinstance(results, dict), "<root>", "an object")
    _check(results.get("schema_version") == SCHEMA_VERSION, "schema_version", f"{SCHEMA_VERSION}")
    model = results.get("model")
    _check(isinstance(model, dict) and isinstance(model.get("name_or_path"), str), "model.name_or_path", "a string")
    routing = results.get("routing")
    _check(isinstance(routing, dict), "routing", "an object")
    for key in ("router_kind", "gate_mode"):
        _check(isinstance(routing.get(key), str), f"routing.{key}", "a string")
    _check(isinstance(routing.get("routed_layers"), list), "routing.routed_layers", "a list of layer indices")
    _check(isinstance(routing.get("router_threshold"), (*_NUMBER, list)), "routing.router_threshold",
           "a number or a list")
    training = results.get("training")
    _check(training is None or isinstance(training, dict), "training", "null or an object")
    quality = results.get("quality", {})
    _check(isinstance(quality, dict), "quality", "an object")
    if "perplexity" in quality:
        _check_rows(quality["perplexity"], "quality.perplexity",
                    {"dataset": (str,), "context_length": (int,), "mod": _NUMBER, "base": (*_NUMBER, type(None))},
                    {"tokens": (int,), "stride": (int,), "windows": (int,), "executed_fraction": _NUMBER})
    if "tasks" in quality:
        _check_rows(quality["tasks"], "quality.tasks",
                    {"task": (str,), "metric": (str,), "mod": _NUMBER, "base": (*_NUMBER, type(None))},
                    {"num_samples": (int, type(None)), "mod_stderr": _OPTIONAL_NUMBER,
                     "base_stderr": _OPTIONAL_NUMBER, "num_fewshot": _OPTIONAL_NUMBER})
    efficiency = results.get("efficiency", {})
    _check(isinstance(efficiency, dict), "efficiency", "an object")
    if "executed_fraction" in efficiency:
        value = efficiency["executed_fraction"]
        _check(isinstance(value, _NUMBER) and 0.0 <= value <= 1.0, "efficiency.executed_fraction", "in [0, 1]")
    if "per_layer_routed_fraction" in efficiency:
        values = efficiency["per_layer_routed_fraction"]
        _check(isinstance(values, list) and all(isinstance(v, _NUMBER) and 0.0 <= v <= 1.0 for v in values),
               "efficiency.per_layer_routed_fraction", "a list of numbers in [0, 1]")
    if "kv_ratio" in efficiency:
        _check(isinstance(efficiency["kv_ratio"], _OPTIONAL_NUMBER), "efficiency.kv_ratio", "a number or null")
    if "measured_on" in efficiency:
        measured = efficiency["measured_on"]
        _check(isinstance(measured, dict) and isinstance(measured.get("data"), list)
               and isinstance(measured.get("tokens"), int), "efficiency.measured_on",
               "an object with data (a list) and tokens (an int)")
    if "latency" in efficiency:
        _check_rows(efficiency["latency"], "efficiency.latency",
                    {"context_length": (int,), "prefill_latency_ratio": _NUMBER, "ideal_latency_ratio": _NUMBER},
                    {"kv_ratio": _OPTIONAL_NUMBER, "peak_memory_ratio": _OPTIONAL_NUMBER,
                     "prefill_latency_ratio_iqr": _NUMBER, "executed_fraction": _NUMBER,
                     "mod_prefill_seconds": _NUMBER, "base_prefill_seconds": _NUMBER})
        _check(isinstance(efficiency.get("hardware"), dict), "efficiency.hardware",
               "an object naming the device the latencies came from")
    if "decode" in efficiency:
        _check_rows(efficiency["decode"], "efficiency.decode", {"batch_size": (int,), "throughput_ratio": _NUMBER},
                    {"ideal_throughput_ratio": _OPTIONAL_NUMBER, "mod_tokens_per_second": _NUMBER,
                     "base_tokens_per_second": _NUMBER, "prompt_length": (int,), "new_tokens": (int,),
                     "kv_ratio": _OPTIONAL_NUMBER, "peak_memory_ratio": _OPTIONAL_NUMBER})
    if "updated" in results:
        _check(isinstance(results["updated"], str), "updated", "an ISO date string")
    return results


def load_results(path: str | os.PathLike) -> dict:
    """Read and validate a results JSON file."""
    path = Path(path)
    if path.is_dir():
        path = path / RESULTS_FILENAME
    try:
        results = json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"no results file at {path}; run `modification eval` first") from None
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON: {err}") from err
    return validate_results(results)


def routing_section(config) -> dict:
    """The `routing` section of the results: every routing field of the MoDConfig (`ROUTING_FIELDS`), and what
    calibration and fitting measured (no local path)."""
    from modification.modeling.configuration_mod import ROUTING_FIELDS

    return {**{name: getattr(config, name) for name in ROUTING_FIELDS},
            "calibration": public_strings(config.calibration)}


def public_results(results: dict) -> dict:
    """Replace, in place, every path of this machine in the fields that hold paths (model names, training, the data
    the numbers were measured on, commands) by its public name; returns `results`."""
    model = results.get("model") or {}
    for key in ("name_or_path", "base_model"):
        if isinstance(model.get(key), str):
            model[key] = public_name(model[key])
    if isinstance(results.get("routing"), dict):
        results["routing"]["calibration"] = public_strings(results["routing"].get("calibration"))
    if results.get("training"):
        results["training"] = public_strings(results["training"])
    for row in (results.get("quality") or {}).get("perplexity", []):
        row["dataset"] = public_name(row["dataset"])
    measured = (results.get("efficiency") or {}).get("measured_on")
    if isinstance(measured, dict):
        measured["data"] = [public_name(d) for d in measured.get("data", [])]
    results["commands"] = [public_command(c) for c in results.get("commands", [])]
    return results


def update_results(
    path: Path,
    config,
    model_name: str,
    base_name: str | None = None,
    command: str | None = None,
    quality: dict | None = None,
    efficiency: dict | None = None,
    extra: dict | None = None,
) -> dict:
    """Merge new measurements into the results JSON at `path` (created if missing) and write it back.

    Perplexity rows replace earlier rows for the same (dataset, context_length), task rows those for the same
    (task, metric); efficiency keys and `extra` top-level keys (e.g. `training`) are overwritten. If the checkpoint's routing changed since the file was written,
    its old numbers describe another model: they are dropped (the `training` section is kept). Paths of this machine
    (names, data, commands; new and earlier ones) are written as their public names (`public_results`).
    """
    now = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    routing = routing_section(config)
    results = None
    if path.is_file():
        try:
            results = validate_results(json.loads(path.read_text()))
        except json.JSONDecodeError as err:
            raise ValueError(f"{path} is not valid JSON ({err}); move it away or fix it") from err
        public_results(results)  # a file written before paths were made public compares like a new one
        if json.loads(json.dumps(results["routing"])) != json.loads(json.dumps(routing)):
            logger.warning("the routing in %s differs from the checkpoint's: starting fresh results", path)
            results = {"training": results.get("training"), "created": now}
    if results is None or "schema_version" not in results:
        results = {"schema_version": SCHEMA_VERSION, "training": None, "created": now,
                   **({} if results is None else results)}
    results["schema_version"] = SCHEMA_VERSION
    results["model"] = {
        "name_or_path": model_name,
        "base_model": config.base_model_name_or_path or base_name,  # the Hub id where known, not a local copy
        "base_model_type": config.base_model_type,
    }
    results["routing"] = routing
    results.setdefault("quality", {})
    results.setdefault("efficiency", {})
    results.setdefault("commands", [])
    results["updated"] = now
    for key, rows in (quality or {}).items():
        if key == "perplexity":  # public names before merging: rows are matched by their dataset name
            rows = [{**row, "dataset": public_name(row["dataset"])} for row in rows]
        keys = ("dataset", "context_length") if key == "perplexity" else ("task", "metric")
        new = {tuple(r[k] for k in keys) for r in rows}
        kept = [r for r in results["quality"].get(key, []) if tuple(r.get(k) for k in keys) not in new]
        results["quality"][key] = kept + list(rows)
    results["efficiency"].update(efficiency or {})
    results.update(extra or {})
    if command is not None:
        results["commands"].append(command)
    public_results(results)
    validate_results(results)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(results, indent=2) + "\n")
    tmp.replace(path)
    return results
