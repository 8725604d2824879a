"""`modification demo`: the planned command sequence on the real base (every command parses with this version's
parser), texts that cannot be made are skipped with a note, and the whole demo runs end to end on a tiny base."""

import json
from pathlib import Path

import pytest
import torch

from modification.cli import demo
from modification.cli.main import build_parser
from modification.cli.demo import DemoBase, DemoSettings, demo_steps, run_demo, summary_rows
from modification.conversion.texts import stage_texts


KINDS = ("shakespeare", "kjv", "gcide")


def _texts(folder: Path, kinds=KINDS) -> dict:
    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for kind in kinds:
        for split in ("train", "held_out"):
            (folder / f"{kind}-{split}.txt").write_text(f"{kind} {split}\n")
            out.setdefault(kind, {})[split] = folder / f"{kind}-{split}.txt"
    return out


def test_demo_plans_the_real_path_and_every_command_parses(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    base = DemoBase(arg="smollm2-135m-instruct", folder="/cache/bases/smollm2-135m-instruct", license="apache-2.0")
    work = tmp_path / "modification-demo-work"
    texts = _texts(work / "texts")
    steps = demo_steps(base, tmp_path / "modification-demo", work, texts, DemoSettings(bench_threads=2))
    assert [s.name for s in steps] == ["convert", "fit", "eval", "bench", "chat", "card"]
    parser = build_parser()
    parsed = {s.name: parser.parse_args(s.argv) for s in steps if s.argv is not None}
    assert {name: args.command for name, args in parsed.items()} == {s: s for s in parsed}

    train = [f"modification-demo-work/texts/{k}-train.txt" for k in KINDS]
    held = [f"modification-demo-work/texts/{k}-held_out.txt" for k in KINDS]
    convert, fit, evaluation, bench, card = (parsed[n] for n in ("convert", "fit", "eval", "bench", "card"))
    assert convert.base == "smollm2-135m-instruct" and convert.out == "modification-demo-work/converted"
    assert fit.model == convert.out and fit.out == "modification-demo" and fit.executed_fraction == 0.8
    assert fit.data == train and not hasattr(fit, "routed_layers") and (fit.seq_len, fit.blocks_per_source) == (512, 2)
    assert evaluation.model == "modification-demo" and evaluation.base == "smollm2-135m-instruct"
    assert evaluation.data == held and evaluation.context_lengths == [512] and evaluation.max_tokens == 4096
    assert bench.base == "smollm2-135m-instruct" and bench.lengths == [1024, 2048]
    assert bench.decode_batch_sizes == [1, 4] and bench.threads == 2 and bench.data == [held[0]]
    assert card.checkpoint == "modification-demo" and card.license == "apache-2.0" and card.overwrite
    assert not any(s.argv and "--no-progress" in s.argv for s in steps)
    quiet = demo_steps(base, tmp_path / "modification-demo", work, texts, DemoSettings(), progress=False)
    assert all("--no-progress" in s.argv for s in quiet if s.name in ("fit", "eval", "bench"))

    # a folder base: no licence claimed for it, and the commands name the folder
    own = DemoBase(arg=str(tmp_path / "my-llama"), folder=str(tmp_path / "my-llama"))
    steps = demo_steps(own, tmp_path / "out", work, {"kjv": texts["kjv"]}, DemoSettings(executed_fraction=0.7))
    card = parser.parse_args(steps[-1].argv)
    assert card.license is None and parser.parse_args(steps[0].argv).base == str(tmp_path / "my-llama")
    assert parser.parse_args(steps[1].argv).executed_fraction == 0.7


def test_demo_command_line():
    args = build_parser().parse_args(["demo"])
    assert (args.base, args.executed_fraction, args.out, args.threads) == (
        "smollm2-135m-instruct", 0.8, "modification-demo", None)
    args = build_parser().parse_args(["demo", "--base", "/models/llama", "--executed-fraction", "0.9", "--threads", "1"])
    assert (args.base, args.executed_fraction, args.threads) == ("/models/llama", 0.9, 1)
    with pytest.warns(FutureWarning, match="--target is deprecated .* use --executed-fraction"):
        assert build_parser().parse_args(["demo", "--target", "0.7"]).executed_fraction == 0.7
    for removed in (["--recipe", "lora"], ["--steps", "10"]):  # the demo no longer trains
        with pytest.raises(SystemExit):
            build_parser().parse_args(["demo", *removed])


def test_missing_text_packages_are_skipped_with_a_note(tmp_path, monkeypatch):
    import modification.conversion.texts as texts

    prepared = _texts(tmp_path / "cache")
    monkeypatch.setattr(texts, "missing_reason", lambda kind: (
        "the Debian package dict-gcide is not installed: `apt-get install dict-gcide`" if kind == "gcide" else None))
    monkeypatch.setattr(texts, "prepare_texts", lambda kinds: {k: prepared[k] for k in kinds})
    staged, skipped = demo.demo_texts(tmp_path / "work" / "texts", progress=False)
    assert list(staged) == ["shakespeare", "kjv"] and list(skipped) == ["gcide"]
    assert "apt-get install dict-gcide" in skipped["gcide"]
    link = staged["kjv"]["held_out"]
    assert link.name == "kjv-held_out.txt" and link.read_text() == "kjv held_out\n"
    # staging again replaces the links
    assert stage_texts({"kjv": prepared["kjv"]}, link.parent)["kjv"]["held_out"] == link


def test_demo_runs_end_to_end_on_a_tiny_base(tmp_path, monkeypatch, capsys):
    from helpers import text_mod_checkpoint

    _, train_txt, held_txt = text_mod_checkpoint(tmp_path / "model")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(demo, "demo_texts", lambda folder, progress=True: (stage_texts(
        {k: {"train": train_txt, "held_out": held_txt} for k in ("shakespeare", "kjv")}, folder),
        {"gcide": "not installed here"}))
    settings = DemoSettings(
        executed_fraction=0.8, fit_seq_len=64, fit_blocks_per_source=4, eval_context_length=128, eval_max_tokens=600,
        bench_lengths=(64,), bench_decode_batch_sizes=(1,), bench_repetitions=1, bench_threads=torch.get_num_threads(),
        chat_prompts=("w1 w2 w3",), chat_max_new_tokens=4,
    )
    report = run_demo("demo-out", base=str(tmp_path / "model" / "base"), settings=settings, progress=False)
    out = capsys.readouterr().out
    for command in ("convert", "fit", "eval", "bench", "card"):
        assert f"\n$ modification {command} " in out
    assert "skipping gcide: not installed here" in out and "Hub-ready checkpoint: demo-out" in out
    folder = tmp_path / "demo-out"
    results = json.loads((folder / "results.json").read_text())
    assert report.results == results
    assert [r["dataset"] for r in results["quality"]["perplexity"]] == ["shakespeare-held_out.txt", "kjv-held_out.txt"]
    assert results["efficiency"]["latency"][0]["context_length"] == 64
    assert (folder / "README.md").is_file() and (folder / "model.safetensors").is_file()
    assert not (tmp_path / "demo-out-work" / "converted").exists()
    [chat] = report.chat
    assert set(chat) == {"prompt", "base", "mod", "mod_executed_fraction"} and 0 < chat["mod_executed_fraction"] <= 1
    quality, rows = summary_rows(results)
    assert [q[0] for q in quality] == ["shakespeare @128", "kjv @128"]
    assert any(k.startswith("prefill time @64") for k, _ in rows)
    with pytest.raises(FileExistsError):
        run_demo("demo-out", base=str(tmp_path / "model" / "base"), settings=settings, progress=False)


def test_eval_and_bench_take_the_registry_name_of_a_fetched_base(tmp_path, monkeypatch, capsys):
    """`--base smollm2-135m-instruct` names the fetched folder, and a checkpoint that records the base's Hub id finds
    that folder without `--base` (the Hub id is not in the Hub cache here)."""
    import shutil

    from helpers import save_base

    from modification.conversion.bases import KNOWN_BASES, BaseNotFetchedError
    from modification.cli.main import main as cli
    from modification.conversion.convert import convert_checkpoint
    from modification.evaluation.loading import load_models, local_base_model

    name = "smollm2-135m-instruct"
    hub_id = KNOWN_BASES[name].hub_id
    monkeypatch.setenv("MODIFICATION_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    source = save_base("llama", tmp_path / "source")  # stands in for what `fetch-base` writes
    (source / "PROVENANCE.md").write_text(f"# Provenance\n\n- registry name: `{name}`\n")
    mod = str(convert_checkpoint(str(source), tmp_path / "mod"))
    cpu = torch.device("cpu")

    assert local_base_model(hub_id) is None  # not fetched into this cache
    with pytest.raises(BaseNotFetchedError, match=f"modification fetch-base {name}"):
        load_models(mod, name, cpu, torch.float32)
    assert load_models(mod, None, cpu, torch.float32)[2] is None  # no base found: MoD alone
    assert cli(["bench", "--model", mod, "--base", name, "--lengths", "8"]) == 2
    assert f"modification fetch-base {name}" in capsys.readouterr().err

    fetched = tmp_path / "cache" / "bases" / name
    shutil.copytree(source, fetched)
    assert local_base_model(hub_id) == str(fetched) and local_base_model(name) == str(fetched)
    for base in (name, None):
        model, _, base_model, base_name = load_models(mod, base, cpu, torch.float32)
        assert model.config.base_model_name_or_path == hub_id
        assert base_name == str(fetched) and base_model is not None
