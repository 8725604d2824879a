"""Benchmark reports: a benchmark's JSON as markdown tables between markers of a document written by people, and a
plot (what `benchmarks/*_report.py` share)."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path

from modification.conversion.atomic import atomic_replace_section


def markdown_table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(cells) + " |" for cells in [header, ["---"] * len(header), *rows]]


def write_report(result: dict, md_path: Path, section: str, numbers_tables: Callable[[dict], str],
                 png_path: Path, plot: Callable[[dict, Path], None]) -> str:
    """`numbers_tables(result)` between the `section` markers of `md_path` (the text around them is people's), and
    `plot(result, png_path)`."""
    tables = numbers_tables(result)
    atomic_replace_section(md_path, section, tables)
    plot(result, png_path)
    return tables


def report_main(argv: list[str] | None, doc: str, section: str, results: Path, md: Path, png: Path,
                numbers_tables: Callable[[dict], str], plot: Callable[[dict, Path], None]) -> None:
    """A report script's command line: `--results`, `--md` and `--png` (defaults given), then `write_report`."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", default=str(results))
    parser.add_argument("--md", default=str(md))
    parser.add_argument("--png", default=str(png))
    args = parser.parse_args(argv)
    result = json.loads(Path(args.results).read_text())
    print(write_report(result, Path(args.md), section, numbers_tables, Path(args.png), plot))
