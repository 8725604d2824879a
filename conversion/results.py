"""The results JSON: what `modification eval` / `bench` measure and what the model card shows.

One file per checkpoint (`results.json` in the checkpoint folder by default). Every number a model card prints comes
from here. Sections are optional where a measurement was not made, but what is present must have the right shape;
`validate_results` raises a `ValueError` naming the first bad field.

Schema (version 2):

    {
      "schema_version": 2,
      "model": {"name_or_path": str, "base_model": str | null, "base_model_type": str | null},
      "routing": {<every MoDConfig routing field (ROUTING_FIELDS)>: its value, "calibration": dict | null},
      "training": null | {"recipe": str, "data": [str], "steps": int, "sequence_length": int,
                          "learning_rate": float, "tokens": int, ...},
      "quality": {
        "perplexity": [{"dataset": str, "context_length": int, "tokens": int, "mod": float, "base": float | null,
                        # optional (written by `modification eval`): the windows, the fewest tokens of context a
                        # scored token had, and what the MoD model saved on them
                        "stride": int, "windows": int, "min_context": int, "kv_fraction": float,
                        "flop_fraction": float}],
        "lookup": [{"dataset": str, "distance": int, "passage_tokens": int, "trials": int,
                    "mod": {"accuracy": float, "loss": float}, "base": {"accuracy": float, "loss": float} | null}],
        "passkey": [{"length": int, "trials": int, "mod": {"accuracy": float, "loss": float},
                     "base": {"accuracy": float, "loss": float} | null}],
        "tasks": [{"task": str, "metric": str, "mod": float, "base": float | null, "num_samples": int | null,
                   # optional (lm-eval's standard errors and shots):
                   "mod_stderr": float | null, "base_stderr": float | null, "num_fewshot": int | null}]
      },
      "efficiency": {
        "kv_fraction": float,                    # K/V bytes the MoD cache holds over a dense cache's
        "per_layer_routed_fraction": [float],    # per layer, the share of tokens that ran it (its attention)
        "flop_fraction": {str(T): float},        # executed over dense FLOPs of a prefill of T tokens
        # optional: the text the numbers above were counted on
        "measured_on": {"data": [str], "context_lengths": [int], "tokens": int},
        "latency": [{"context_length": int, "prefill_latency_ratio": float, "flop_fraction": float,
                     "kv_fraction": float | null, "peak_memory_ratio": float | null,
                     # optional (written by `modification bench`):
                     "prefill_latency_ratio_iqr": float, "mod_prefill_seconds": float,
                     "base_prefill_seconds": float}],
        "decode": [{"batch_size": int, "throughput_ratio": float,
                    # optional (written by `modification bench`): flop_fraction is that of the decoded tokens
                    "flop_fraction": float, "mod_tokens_per_second": float, "base_tokens_per_second": float,
                    "prompt_length": int, "new_tokens": int, "kv_fraction": float | null,
                    "peak_memory_ratio": float | null}],
        "hardware": {"device": str, "device_type": str, "dtype": str, ...}
      },
      "commands": [str],      # the commands that produced the numbers
      "created": str,         # ISO date
      "updated": str          # optional: ISO date of the last merge
    }

Ratios and fractions are MoD / base (or MoD / dense, the same model with every token running every layer). The
budgets are those of `RoutingPlan` (`modeling/configuration_mod.py`): `kv_fraction` is memory, `flop_fraction` at a
context length is compute (`MoDConfig.prefill_flops`, counted with the measured share of each routed layer); the time
measured stands next to them. `peak_memory_ratio` is null where peak memory was not measured (CPU). The file is
published with the checkpoint, so it names no path of this machine: `update_results` writes public names
(`local_paths`). Version 1 (before the budgets were named by what they save) is not read: `update_results` starts a
file of another version afresh, keeping only its `training`.
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

SCHEMA_VERSION = 2
RESULTS_FILENAME = "results.json"

_NUMBER = (int, float)
# What makes a quality row the same measurement as an earlier one (`update_results` replaces it).
QUALITY_ROW_KEYS = {"perplexity": ("dataset", "context_length"), "lookup": ("dataset", "distance", "passage_tokens"),
                    "passkey": ("length",), "tasks": ("task", "metric")}


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


def _check_fraction(value: Any, field: str) -> None:
    _check(isinstance(value, _NUMBER) and not isinstance(value, bool) and 0.0 <= value <= 1.0, field,
           "a number in [0, 1]")


def _check_scores(value: Any, field: str, nullable: bool) -> None:
    """`{"accuracy": float, "loss": float}` of one model on the look-up check (or null for a base not measured)."""
    if value is None and nullable:
        return
    _check(isinstance(value, dict) and set(value) >= {"accuracy", "loss"}, field,
           "an object with accuracy and loss" + (" (or null)" if nullable else ""))
    _check_fraction(value["accuracy"], f"{field}.accuracy")
    _check(isinstance(value["loss"], _NUMBER), f"{field}.loss", "a number")


def validate_results(results: dict) -> dict:
    """Check the shape of a results dict (see the module docstring); returns it unchanged."""
    _check(isinstance(results, dict), "<root>", "an object")
    if results.get("schema_version") != SCHEMA_VERSION:
        raise ValueError(f"results field 'schema_version' must be {SCHEMA_VERSION}, got "
                         f"{results.get('schema_version')!r}: the file was written by another version of this package; "
                         "run `modification eval` (and `bench`) on the checkpoint again")
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
                    {"tokens": (int,), "stride": (int,), "windows": (int,), "min_context": (int,),
                     "kv_fraction": _NUMBER, "flop_fraction": _NUMBER})
    if "lookup" in quality:
        _check_rows(quality["lookup"], "quality.lookup", {"dataset": (str,), "distance": (int,),
                                                          "passage_tokens": (int,), "trials": (int,)})
    if "passkey" in quality:
        _check_rows(quality["passkey"], "quality.passkey", {"length": (int,), "trials": (int,)})
    for key in ("lookup", "passkey"):
        for i, row in enumerate(quality.get(key, [])):
            _check_scores(row.get("mod"), f"quality.{key}[{i}].mod", nullable=False)
            _check_scores(row.get("base"), f"quality.{key}[{i}].base", nullable=True)
    if "tasks" in quality:
        _check_rows(quality["tasks"], "quality.tasks",
                    {"task": (str,), "metric": (str,), "mod": _NUMBER, "base": (*_NUMBER, type(None))},
                    {"num_samples": (int, type(None)), "mod_stderr": _OPTIONAL_NUMBER,
                     "base_stderr": _OPTIONAL_NUMBER, "num_fewshot": _OPTIONAL_NUMBER})
    efficiency = results.get("efficiency", {})
    _check(isinstance(efficiency, dict), "efficiency", "an object")
    if "kv_fraction" in efficiency:
        _check_fraction(efficiency["kv_fraction"], "efficiency.kv_fraction")
    if "per_layer_routed_fraction" in efficiency:
        values = efficiency["per_layer_routed_fraction"]
        _check(isinstance(values, list) and all(isinstance(v, _NUMBER) and 0.0 <= v <= 1.0 for v in values),
               "efficiency.per_layer_routed_fraction", "a list of numbers in [0, 1]")
    if "flop_fraction" in efficiency:
        values = efficiency["flop_fraction"]
        _check(isinstance(values, dict) and all(k.isdigit() for k in values), "efficiency.flop_fraction",
               "an object from context lengths (\"4096\") to FLOP fractions")
        for key, value in values.items():
            _check_fraction(value, f"efficiency.flop_fraction.{key}")
    if "measured_on" in efficiency:
        measured = efficiency["measured_on"]
        _check(isinstance(measured, dict) and isinstance(measured.get("data"), list)
               and isinstance(measured.get("tokens"), int), "efficiency.measured_on",
               "an object with data (a list) and tokens (an int)")
    if "latency" in efficiency:
        _check_rows(efficiency["latency"], "efficiency.latency",
                    {"context_length": (int,), "prefill_latency_ratio": _NUMBER, "flop_fraction": _NUMBER},
                    {"kv_fraction": _OPTIONAL_NUMBER, "peak_memory_ratio": _OPTIONAL_NUMBER,
                     "prefill_latency_ratio_iqr": _NUMBER, "mod_prefill_seconds": _NUMBER,
                     "base_prefill_seconds": _NUMBER})
        _check(isinstance(efficiency.get("hardware"), dict), "efficiency.hardware",
               "an object naming the device the latencies came from")
    if "decode" in efficiency:
        _check_rows(efficiency["decode"], "efficiency.decode", {"batch_size": (int,), "throughput_ratio": _NUMBER},
                    {"flop_fraction": _NUMBER, "mod_tokens_per_second": _NUMBER, "base_tokens_per_second": _NUMBER,
                     "prompt_length": (int,), "new_tokens": (int,), "kv_fraction": _OPTIONAL_NUMBER,
                     "peak_memory_ratio": _OPTIONAL_NUMBER})
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
    for key in ("perplexity", "lookup"):
        for row in (results.get("quality") or {}).get(key, []):
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

    A quality row replaces an earlier one that measured the same thing (`QUALITY_ROW_KEYS`: perplexity rows of the
    same dataset and context length, look-up rows of the same dataset, distance and passage, passkey rows of the same
    length, task rows of the same task and metric); efficiency keys and `extra` top-level keys (e.g. `training`) are
    overwritten. If the checkpoint's routing changed since the file was written, its old numbers describe another
    model: they are dropped (the `training` section is kept), as are those of a file of another schema version. Paths
    of this machine (names, data, commands; new and earlier ones) are written as their public names
    (`public_results`).
    """
    now = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    routing = routing_section(config)
    results = None
    if path.is_file():
        try:
            results = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"{path} is not valid JSON ({err}); move it away or fix it") from err
        if isinstance(results, dict) and results.get("schema_version") != SCHEMA_VERSION:
            logger.warning("%s has schema version %r, not %d: starting fresh results (its training is kept)", path,
                           results.get("schema_version"), SCHEMA_VERSION)
            training = results.get("training")
            results = {"training": training if isinstance(training, dict) else None,
                       "created": now, "routing": routing}
        else:
            validate_results(results)
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
        keys = QUALITY_ROW_KEYS[key]
        if "dataset" in keys:  # public names before merging: rows are matched by their dataset name
            rows = [{**row, "dataset": public_name(row["dataset"])} for row in rows]
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
