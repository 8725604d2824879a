"""`modification release`: build and publish members of the release manifest, one `modification` command per step.

The manifest (`releases.yaml` beside this file by default) lists the family: for each member its base model, routing
settings, router fit, training recipe and data, calibration target, evaluation data and target repo. A member's
release is the chain

    convert -> fit -> train -> calibrate -> eval -> card -> push

where each step is the command line `modification <step> ...` built from the manifest and run as a subprocess (a fresh
process per step frees GPU memory between them). Each step reads the previous step's output folder under
`<work_dir>/<member>/`; `train`, `calibrate` and `eval` are left out for a member whose section is null, `fit` and
`card` unless the member has a section for them (`fit: {...}`, `card: {}`). `--steps` runs a subset (to resume), with
the same folders. Steps are looked up by name among this version's commands, so a command that does not exist in this
version fails before anything runs, and `--dry-run` prints the whole plan (every command, and the files the push
would upload) without running anything. `push: {dry_run: true}` makes the push step verify and list the upload
without sending it (no token needed).

What the manifest may hold and how it becomes command lines is `manifest.py`'s. Before the steps run, a base named
by a registry name (`base: smollm2-135m-instruct`) is fetched (`modification fetch-base`), and the offline texts a
member names (`texts:<kind>/<split>`) are prepared and linked into its folder.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

from modification.cli.commands import COMMANDS
from modification.cli.options import run_module_argv

from .manifest import DEFAULT_MANIFEST, STEPS, Member, Step, load_manifest, plan_release

__all__ = ["DEFAULT_MANIFEST", "STEPS", "load_manifest", "plan_release", "run_release"]

# The files a push of a finished member uploads, for the plan printed before the checkpoint exists.
EXPECTED_FILES = ("README.md (rendered)", "config.json", "configuration_mod.py", "generation_config.json",
                  "model*.safetensors", "modeling_mod.py", "results.json (written by eval)", "tokenizer files")


# ---------------------------------------------------------------------------------------------------------------
# Running.


def available_commands() -> set[str]:
    """The subcommands this version of `modification` has."""
    return set(COMMANDS)


def describe_push(step: Step) -> list[str]:
    """What the push step would upload: the exact list when the checkpoint exists, else the expected files."""
    folder = step.checkpoint
    if folder is None or not (folder / "config.json").is_file():
        return [f"     uploads (after the steps before it): {', '.join(EXPECTED_FILES)}"]
    from .push import plan_upload

    args = step.argv
    base_model = args[args.index("--base-model") + 1] if "--base-model" in args else None
    license = args[args.index("--license") + 1] if "--license" in args else None
    try:
        plan = plan_upload(folder, args[args.index("--repo-id") + 1], base_model=base_model, license=license)
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


def format_plan(members: list[Member], steps: tuple[str, ...], available: set[str]) -> str:
    lines = []
    for member in members:
        lines.append(f"== {member.name}: {member.base} -> {member.repo_id}")
        for i, step in enumerate(member.steps, 1):
            if step.name not in steps:
                continue
            missing = "" if step.name in available else "   [missing: this version has no `modification " \
                                                          f"{step.name}`]"
            lines.append(f"  {i}. {step.name:<9} {step.command()}{missing}")
            if step.name == "push":
                lines += describe_push(step)
    return "\n".join(lines)


def run_release(
    manifest_path: str | Path,
    names: list[str] | None,
    *,
    steps: tuple[str, ...] = STEPS,
    work_dir: str | None = None,
    dry_run: bool = False,
) -> list[Member]:
    """Print the plan; unless `dry_run`, run each step as `python -m modification.cli ...`, stopping at
    the first failure. Missing commands and a missing Hub token are reported before anything runs."""
    unknown = [s for s in steps if s not in STEPS]
    if unknown:
        raise ValueError(f"unknown step(s) {', '.join(unknown)}; steps are {', '.join(STEPS)}")
    members = plan_release(load_manifest(manifest_path), names, work_dir)
    available = available_commands()
    print(format_plan(members, steps, available))
    if dry_run:
        print("dry run: nothing was run")
        return members
    to_run = [s for m in members for s in m.steps if s.name in steps]
    missing = sorted({s.name for s in to_run if s.name not in available}, key=STEPS.index)
    if missing:
        raise ValueError(
            f"step(s) {', '.join(missing)} cannot run: this version of modification has no "
            f"{', '.join('`modification ' + m + '`' for m in missing)} (it has {', '.join(sorted(available))}); "
            "nothing was run. Use --steps to run the others"
        )
    if any(s.name == "push" and "--dry-run" not in s.argv for s in to_run):
        from .push import require_token

        require_token()  # hours of training should not end in "no token"
    for member in members:
        if any(s.member == member.name for s in to_run):
            prepare_member_inputs(member)
    for step in to_run:
        print(f"==> [{step.member}] {step.command()}", flush=True)
        result = subprocess.run(run_module_argv(step.argv))
        if result.returncode != 0:
            raise ValueError(
                f"member {step.member}: step {step.name} failed (exit code {result.returncode}); later steps were "
                f"not run. Command: {step.command()}"
            )
    return members
