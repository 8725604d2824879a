"""The publishing subcommands of `modification`: `card`, `push` and `release`.

`add_publish_commands` is called from `modification.conversion.cli.build_parser`; the heavy imports (torch,
transformers, huggingface_hub) happen only when a command runs.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _cmd_card(args: argparse.Namespace) -> None:
    from modification.conversion.checkpoint import resolve_checkpoint
    from modification.model_cards.card import CARD_FILENAME, render_card

    if args.out is None and not Path(args.checkpoint).is_dir():
        raise ValueError("--out is needed when --checkpoint is a Hub id: the Hub cache is not a place to write cards")
    folder = resolve_checkpoint(args.checkpoint)
    card = render_card(folder, args.repo_id, base_model=args.base_model, license=args.license)
    if args.out == "-":
        sys.stdout.write(str(card))
        return
    out = Path(args.out) if args.out else folder / CARD_FILENAME
    if out.exists() and not args.overwrite:
        raise FileExistsError(f"{out} already exists; pass --overwrite to replace it")
    card.save(out)
    print(f"wrote the model card to {out}")


def _cmd_push(args: argparse.Namespace) -> None:
    from .push import format_plan, push_checkpoint

    plan, info = push_checkpoint(
        args.checkpoint, args.repo_id, private=args.private, revision=args.revision, create_pr=args.create_pr,
        dry_run=args.dry_run, delete_missing=args.delete_missing, commit_message=args.commit_message,
        base_model=args.base_model, license=args.license, new_card=args.new_card,
        allow_local_paths=args.allow_local_paths,
    )
    if args.dry_run:
        print(format_plan(plan, revision=args.revision, create_pr=args.create_pr, delete_missing=args.delete_missing))
        print("verified: modeling files, auto_map, offline load with trust_remote_code, card metadata and numbers"
              + ("" if args.allow_local_paths else ", no paths of this machine"))
        print("dry run: nothing was uploaded")
        return
    print(f"pushed {len(plan.files)} files to {args.repo_id}")
    print(f"commit: {info.commit_url}")
    if info.pr_url:
        print(f"pull request: {info.pr_url}")


def _cmd_release(args: argparse.Namespace) -> None:
    from .release import DEFAULT_MANIFEST, STEPS, run_release

    if not args.all and not args.members:
        raise ValueError("name the members to release with --members a,b (or --all)")
    names = None if args.all else [n.strip() for n in args.members.split(",") if n.strip()]
    steps = tuple(s.strip() for s in args.steps.split(",") if s.strip()) if args.steps else STEPS
    run_release(args.manifest or DEFAULT_MANIFEST, names, steps=steps, work_dir=args.work_dir, dry_run=args.dry_run)


def _card_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--base-model", default=None,
                   help="the base model's Hub id for the card (default: from results.json or config.json)")
    p.add_argument("--license", default=None,
                   help="licence id for the card (default: the base model's card; 'other (unknown)' with a warning)")


def add_publish_commands(sub: argparse._SubParsersAction) -> None:
    """Add `card`, `push` and `release` to the `modification` subcommands."""
    p = sub.add_parser("card", help="render the model card (README.md) of a MoD checkpoint")
    p.add_argument("--checkpoint", required=True, help="checkpoint folder or Hub id")
    p.add_argument("--repo-id", required=True, help="the Hub repo the card is for (org/name)")
    p.add_argument("--out", default=None,
                   help="where to write it (default: README.md in the checkpoint folder; - for stdout)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing card")
    _card_arguments(p)
    p.set_defaults(func=_cmd_card)

    p = sub.add_parser("push", help="verify a MoD checkpoint and upload it to the Hub in one commit")
    p.add_argument("--checkpoint", required=True, help="checkpoint folder or Hub id")
    p.add_argument("--repo-id", required=True, help="target repo (org/name); created if missing")
    p.add_argument("--private", action="store_true",
                   help="create the repo private (an existing repo keeps its visibility)")
    p.add_argument("--revision", default=None, help="branch to commit to (created if missing; default main)")
    p.add_argument("--create-pr", action="store_true", help="open a pull request instead of committing to the branch")
    p.add_argument("--dry-run", action="store_true",
                   help="verify and print exactly what would be uploaded; send nothing")
    p.add_argument("--delete-missing", action="store_true",
                   help="also delete remote files that the checkpoint does not have (default: never delete)")
    p.add_argument("--new-card", action="store_true",
                   help="render a fresh card instead of using the checkpoint's README.md")
    p.add_argument("--commit-message", default=None)
    p.add_argument("--allow-local-paths", action="store_true",
                   help="publish files that name paths of this machine (refused by default)")
    _card_arguments(p)
    p.set_defaults(func=_cmd_push)

    p = sub.add_parser("release", help="convert, train, calibrate, eval and push members of the release manifest")
    p.add_argument("--manifest", default=None, help="release manifest (default: push_scripts/releases.yaml)")
    p.add_argument("--members", default=None, help="comma-separated member names")
    p.add_argument("--all", action="store_true", help="every member of the manifest")
    p.add_argument("--steps", default=None, help="comma-separated subset of convert,train,calibrate,eval,push")
    p.add_argument("--work-dir", default=None, help="where member folders go (default: the manifest's work_dir)")
    p.add_argument("--dry-run", action="store_true", help="print every command and the files to upload; run nothing")
    p.set_defaults(func=_cmd_release)
