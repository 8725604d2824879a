"""`modification chat-data`: the base's own greedy chat answers to prompts made from the offline texts' train parts,
written once as `.jsonl` healing data for `modification train --data` (`modification.conversion.chat_data`)."""

from __future__ import annotations

from modification.conversion.settings import ChatDataSettings

HELP = "write the base's own chat answers as healing data for `train --data` (offline, cached)"
SETTINGS = ChatDataSettings


def run(settings: ChatDataSettings) -> None:
    from modification.conversion.chat_data import chat_data

    print(chat_data(settings))
