"""`modification release`: build and publish members of the release manifest, each step run from its settings in a
fresh process (`modification.push_scripts.release.run_release`; the manifest is `push_scripts/releases.yaml`)."""

from __future__ import annotations

import argparse

HELP = "convert, fit, train, calibrate, eval, bench, card and push members of the release manifest"


def _names(text: str) -> list[str]:
    return [name.strip() for name in text.split(",") if name.strip()]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--manifest", default=None, help="release manifest (default: push_scripts/releases.yaml)")
    p.add_argument("--members", type=_names, default=None, help="comma-separated member names")
    p.add_argument("--all", action="store_true", help="every member of the manifest")
    p.add_argument("--steps", type=_names, default=None,
                   help="comma-separated subset of convert,fit,train,calibrate,eval,bench,card,push")
    p.add_argument("--work-dir", default=None, help="where member folders go (default: the manifest's work_dir)")
    p.add_argument("--dry-run", action="store_true", help="print every command and the files to upload; run nothing")


def run(args: argparse.Namespace) -> None:
    from modification.push_scripts.release import DEFAULT_MANIFEST, STEPS, run_release

    if not args.all and not args.members:
        raise ValueError("name the members to release with --members a,b (or --all)")
    run_release(args.manifest or DEFAULT_MANIFEST, None if args.all else args.members,
                steps=tuple(args.steps) if args.steps else STEPS, work_dir=args.work_dir, dry_run=args.dry_run)
