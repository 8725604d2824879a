"""`modification show-routing`: where the tokens of a text go, as a token x layer map (PNG), a hover page (HTML) and
per-layer bars (`modification.evaluation.plots.show_routing`)."""

from __future__ import annotations

from pathlib import Path

from modification.evaluation.settings import RoutingMapSettings

HELP = "token x layer routing map of a text (PNG + HTML) and per-layer bars"
SETTINGS = RoutingMapSettings


def run(settings: RoutingMapSettings) -> dict[str, Path]:
    from modification.evaluation.plots import show_routing

    text = settings.text
    if settings.text_file is not None:
        if not Path(settings.text_file).is_file():
            raise FileNotFoundError(f"no text file at {settings.text_file}")
        text = Path(settings.text_file).read_text(encoding="utf-8", errors="replace")
        if not text.strip():
            raise ValueError(f"the text is empty: {settings.text_file} has no words")
    files = show_routing(settings.model, text, settings.out, max_tokens=settings.max_tokens, device=settings.device,
                         dtype=settings.dtype)
    for path in files.values():
        print(f"wrote {path}")
    return files
