"""`modification push`: verify a MoD checkpoint (files, custom code, offline load, card and numbers) and upload it to
the Hub in one commit (`modification.push_scripts.push.push_checkpoint`)."""

from __future__ import annotations

import argparse

from .card import add_card_arguments


def register(sub) -> None:
    p = sub.add_parser("push", help="verify a MoD checkpoint and upload it to the Hub in one commit",
                       description=__doc__)
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
    add_card_arguments(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> None:
    from modification.push_scripts.push import format_plan, push_checkpoint

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
