"""`modification release`: build and publish members of the release manifest, one `modification` command per step
(`modification.push_scripts.release.run_release`; the manifest is `push_scripts/releases.yaml`)."""

from __future__ import annotations

import argparse

from .options import comma_list


def register(sub) -> None:
    p = sub.add_parser("release", help="convert, fit, train, calibrate, eval, card and push members of the release "
                                       "manifest", description=__doc__)
    p.add_argument("--manifest", default=None, help="release manifest (default: push_scripts/releases.yaml)")
    p.add_argument("--members", type=lambda text: comma_list(text, str), default=None,
                   help="comma-separated member names")
    p.add_argument("--all", action="store_true", help="every member of the manifest")
    p.add_argument("--steps", type=lambda text: comma_list(text, str), default=None,
                   help="comma-separated subset of convert,fit,train,calibrate,eval,card,push")
    p.add_argument("--work-dir", default=None, help="where member folders go (default: the manifest's work_dir)")
    p.add_argument("--dry-run", action="store_true", help="print every command and the files to upload; run nothing")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> None:
    from modification.push_scripts.release import DEFAULT_MANIFEST, STEPS, run_release

    if not args.all and not args.members:
        raise ValueError("name the members to release with --members a,b (or --all)")
    run_release(args.manifest or DEFAULT_MANIFEST, None if args.all else args.members,
                steps=tuple(args.steps) if args.steps else STEPS, work_dir=args.work_dir, dry_run=args.dry_run)
