"""`modification release`: build and publish members of the release manifest, each step in a fresh process.

The manifest (`releases.yaml` beside this file by default) lists the family: for each member its base model, routing
settings, router fit, training recipe and data, calibration target, evaluation data and target repo. A member's
release is the chain

    convert -> fit -> train -> calibrate -> eval -> bench -> card -> push

where each step's settings come from the member's section of it (`manifest.py`), are written to
`<work_dir>/<member>/<step>.yaml`, and run as `modification <step> --config <that file>` in a fresh process (which
frees GPU memory between steps). Each step reads the previous step's output folder under `<work_dir>/<member>/`;
`train`, `calibrate` and `eval` are left out for a member whose section is null, `fit`, `bench` and `card` unless the
member has a section for them (`fit: {...}`, `card: {}`). `--steps` runs a subset (to resume), with the same folders.
Every member's settings are built and checked before anything runs, and `--dry-run` prints the whole plan (each step
as the equivalent `modification` command line, and the files the push would upload) without running anything.
`push: {dry_run: true}` makes the push step verify and list the upload without sending it (no token needed).

Before a member's steps run, a base named by a registry name (`base: smollm2-135m-instruct`) is fetched (`modification
fetch-base`), and the offline texts the member names (`texts:<kind>/<split>`) are prepared and linked into its folder.
The demo (`modification demo`) runs the member `smollm2-135m-instruct` so, with smaller settings.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

from .manifest import DEFAULT_MANIFEST, STEPS, Member, Step, load_manifest, plan_release

__all__ = ["DEFAULT_MANIFEST", "STEPS", "load_manifest", "plan_release", "run_release", "run_steps"]

# The files a push of a finished member uploads, for the plan printed before the checkpoint exists.
EXPECTED_FILES = ("README.md (rendered)", "config.json", "configuration_mod.py", "generation_config.json",
                  "model*.safetensors", "modeling_mod.py", "results.json (written by eval)", "tokenizer files")


def describe_push(step: Step) -> list[str]:
    """What the push step would upload: the exact list when the checkpoint exists, else the expected files."""
    settings = step.settings
    folder = Path(settings.checkpoint)
    if not (folder / "config.json").is_file():
        return [f"     uploads (after the steps before it): {', '.join(EXPECTED_FILES)}"]
    from .push import plan_upload

    try:
        plan = plan_upload(folder, settings.repo_id, base_model=settings.base_model, license=settings.license)
    except (ValueError, OSError) as err:
        return [f"     uploads: cannot be listed yet: {err}"]
    lines = [f"     uploads {len(plan.files)} files (verified when the step runs):"]
    lines += [f"       {name}  {plan.size(name):,} bytes" for name in plan.files]
    if plan.skipped:
        lines.append(f"     not uploaded: {', '.join(plan.skipped)}")
    return lines


def prepare_member_inputs(member: Member) -> None:
    """Fetch a base named by its registry name and link the member's symbolic texts into its work folder."""
    from modification.conversion.bases import KNOWN_BASES, fetch_base

    if member.base in KNOWN_BASES and not Path(member.base).exists():
        fetch_base(member.base)  # at once when it is cached
    if member.texts:
        from modification.conversion.texts import prepare_texts, stage_texts

        prepared = prepare_texts(sorted(member.texts))  # a missing Debian package: an error naming its install
        for kind, splits in member.texts.items():
            for split, link in splits.items():  # links named as the plan names them
                stage_texts({kind: {split: prepared[kind][split]}}, link.parent)


def format_plan(members: list[Member], steps: tuple[str, ...]) -> str:
    lines = []
    for member in members:
        lines.append(f"== {member.name}: {member.base} -> {member.repo_id}")
        for i, step in enumerate(member.steps, 1):
            if step.name in steps:
                lines.append(f"  {i}. {step.name:<9} {step.command()}")
                if step.name == "push":
                    lines += describe_push(step)
    return "\n".join(lines)


def run_steps(steps: list[Step], folder: Path, env: dict[str, str] | None = None) -> dict[str, float]:
    """Run each step in a fresh process from its settings file `<folder>/<step>.yaml`, printing the command (and the
    same settings as flags) and its time; stops at the first failure. Returns the seconds of each step."""
    seconds = {}
    for step in steps:
        config = step.settings.write_yaml(folder / f"{step.name}.yaml")
        print(f"\n$ modification {step.name} --config {config}\n  # as flags: {step.command()}", flush=True)
        start = time.perf_counter()
        code = subprocess.run([sys.executable, "-m", "modification.cli", step.name, "--config", str(config)],
                              env=env).returncode
        if code:
            raise ValueError(f"member {step.member}: step {step.name} failed (exit code {code}); later steps were not "
                             f"run. Command: modification {step.name} --config {config}")
        seconds[step.name] = time.perf_counter() - start
        print(f"   ({seconds[step.name]:.0f} s)", flush=True)
    return seconds


def run_release(
    manifest_path: str | Path,
    names: list[str] | None,
    *,
    steps: tuple[str, ...] = STEPS,
    work_dir: str | None = None,
    dry_run: bool = False,
) -> list[Member]:
    """Print the plan; unless `dry_run`, run each member's steps (`run_steps`), stopping at the first failure. A
    missing Hub token is reported before anything runs."""
    unknown = [s for s in steps if s not in STEPS]
    if unknown:
        raise ValueError(f"unknown step(s) {', '.join(unknown)}; steps are {', '.join(STEPS)}")
    members = plan_release(load_manifest(manifest_path), names, work_dir)
    print(format_plan(members, steps))
    if dry_run:
        print("dry run: nothing was run")
        return members
    to_run = {member.name: [s for s in member.steps if s.name in steps] for member in members}
    if any(s.name == "push" and not s.settings.dry_run for chosen in to_run.values() for s in chosen):
        from .push import require_token

        require_token()  # hours of training should not end in "no token"
    for member in members:
        if to_run[member.name]:
            print(f"\n== {member.name}", flush=True)
            prepare_member_inputs(member)
            run_steps(to_run[member.name], member.folder)
    return members
