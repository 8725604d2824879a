"""`modification push`: verify a MoD checkpoint (files, custom code, offline load, card and numbers) and upload it to
the Hub in one commit (`modification.push_scripts.push.push_checkpoint`)."""

from __future__ import annotations

from modification.model_cards.settings import PushSettings

HELP = "verify a MoD checkpoint and upload it to the Hub in one commit"
SETTINGS = PushSettings


def run(settings: PushSettings) -> None:
    from modification.push_scripts.push import format_plan, push_checkpoint

    plan, info = push_checkpoint(settings)
    if settings.dry_run:
        print(format_plan(plan, revision=settings.revision, create_pr=settings.create_pr,
                          delete_missing=settings.delete_missing))
        print("verified: modeling files, auto_map, offline load with trust_remote_code, card metadata and numbers"
              + ("" if settings.allow_local_paths else ", no paths of this machine"))
        print("dry run: nothing was uploaded")
        return
    print(f"pushed {len(plan.files)} files to {settings.repo_id}")
    print(f"commit: {info.commit_url}")
    if info.pr_url:
        print(f"pull request: {info.pr_url}")
