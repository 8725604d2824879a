"""`modification demo`: the release member `smollm2-135m-instruct` with the demo's smaller settings (every other
setting is the member's, and every step parses back from its command line), texts that cannot be made are skipped with
a note, and the whole demo runs end to end on a tiny base."""

import json
import shlex
from dataclasses import fields

import pytest
import torch

from modification.cli import demo
from modification.cli.demo import DEMO_CHANGES, DEMO_MEMBER, DemoBase, demo_member, run_demo, summary_rows
from modification.cli.main import build_parser
from modification.cli.options import settings_from_args
from modification.conversion.texts import stage_texts
from modification.push_scripts.manifest import DEFAULT_MANIFEST, load_manifest, plan_member

KINDS = ("shakespeare", "kjv", "gcide")
# The demo at the size of a tiny model (what `run_tiny_demo` runs).
TINY_CHANGES = {
    "fit": {"kv_fraction": 0.8, "seq_len": 64, "blocks_per_source": 4},
    "eval": {"context_lengths": [128], "max_tokens": 600},
    "bench": {"lengths": [64], "decode_batch_sizes": [1], "repetitions": 1},
}


def run_tiny_demo(monkeypatch, tmp_path, skipped: dict[str, str]) -> demo.DemoReport:
    """The demo on the tiny text model of `helpers.text_mod_checkpoint`, its two texts standing in for Shakespeare
    and the Bible, in `tmp_path/demo-out`."""
    from helpers import text_mod_checkpoint

    import modification.conversion.texts as texts

    _, train_txt, held_txt = text_mod_checkpoint(tmp_path / "model")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    kinds = ["shakespeare", "kjv"]
    monkeypatch.setattr(demo, "demo_texts", lambda progress=True: (kinds, skipped))
    monkeypatch.setattr(texts, "prepare_texts", lambda wanted: {k: {"train": train_txt, "held_out": held_txt}
                                                                for k in wanted})
    return run_demo("demo-out", base=str(tmp_path / "model" / "base"), changes=TINY_CHANGES, progress=False,
                    threads=torch.get_num_threads(), chat_prompts=("w1 w2 w3",), chat_max_new_tokens=4)


def test_demo_is_the_release_member_with_smaller_settings(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    base = DemoBase(arg="smollm2-135m-instruct", folder="/cache/bases/smollm2-135m-instruct", license="apache-2.0")
    member = demo_member(base, tmp_path / "modification-demo", list(KINDS), threads=2)
    steps = {s.name: s.settings for s in member.steps}
    assert list(steps) == ["convert", "fit", "eval", "bench", "card", "push"]
    # the member's pipeline, written once: the demo differs from the release member only by its changes
    [release] = [plan_member(DEMO_MEMBER, spec, member.folder) for name, spec in
                 load_manifest(DEFAULT_MANIFEST)["members"].items() if name == DEMO_MEMBER]
    for step in release.steps:
        ours = steps[step.name]
        differ = {f.name for f in fields(ours) if getattr(step.settings, f.name) != getattr(ours, f.name)}
        expected = {"fit": {"out", "blocks_per_source"}, "eval": {"model", "max_tokens"},
                    "card": {"checkpoint", "repo_id"}, "push": {"checkpoint", "repo_id"}}.get(step.name, set())
        assert differ == expected, step.name
        changes = DEMO_CHANGES.get(step.name, {})
        assert {key: getattr(ours, key) for key in changes} == changes

    train = [f"modification-demo-work/texts/{k}-train.txt" for k in KINDS]
    held = [f"modification-demo-work/texts/{k}-held_out.txt" for k in KINDS]
    convert, fit, evaluation, bench, card = (steps[n] for n in ("convert", "fit", "eval", "bench", "card"))
    assert convert.base == "smollm2-135m-instruct" and convert.out == "modification-demo-work/converted"
    assert fit.model == convert.out and fit.out == "modification-demo" and fit.kv_fraction == 0.9
    assert fit.data == train and fit.routed_layers == "auto" and (fit.seq_len, fit.blocks_per_source) == (512, 2)
    assert evaluation.model == "modification-demo" and evaluation.base == "smollm2-135m-instruct"
    assert evaluation.data == held and evaluation.context_lengths == [512] and evaluation.max_tokens == 4096
    assert bench.base == "smollm2-135m-instruct" and bench.lengths == [1024, 2048]
    assert bench.decode_batch_sizes == [1, 4] and bench.threads == 2 and bench.data == [held[0]]
    assert card.checkpoint == "modification-demo" and card.license == "apache-2.0" and card.overwrite
    parser = build_parser()
    for settings in steps.values():  # each step as printed runs with the same settings
        parsed = parser.parse_args(shlex.split(settings.command_line())[1:])
        assert settings_from_args(type(settings), parsed) == settings
    assert all(s.settings.progress for s in member.steps if s.name in ("fit", "eval", "bench"))
    quiet = demo_member(base, tmp_path / "modification-demo", list(KINDS), progress=False)
    assert not any(s.settings.progress for s in quiet.steps if s.name in ("fit", "eval", "bench"))

    # a folder base: no licence claimed for it, and the steps name the folder
    own = DemoBase(arg=str(tmp_path / "my-llama"), folder=str(tmp_path / "my-llama"))
    member = demo_member(own, tmp_path / "out", ["kjv"], {"fit": {"kv_fraction": 0.7}})
    steps = {s.name: s.settings for s in member.steps}
    assert steps["card"].license is None and steps["card"].base_model is None
    assert steps["convert"].base == str(tmp_path / "my-llama") and steps["fit"].kv_fraction == 0.7
    assert steps["bench"].data == ["out-work/texts/kjv-held_out.txt"]


def test_demo_command_line():
    args = build_parser().parse_args(["demo"])
    assert (args.base, args.kv_fraction, args.out, args.threads) == (None, None, "modification-demo", None)
    args = build_parser().parse_args(["demo", "--base", "/models/llama", "--kv-fraction", "0.9",
                                      "--threads", "1"])
    assert (args.base, args.kv_fraction, args.threads) == ("/models/llama", 0.9, 1)
    # no training, one name per option
    for removed in (["--recipe", "lora"], ["--steps", "10"], ["--target", "0.7"], ["--executed-fraction", "0.7"]):
        with pytest.raises(SystemExit):
            build_parser().parse_args(["demo", *removed])


def test_missing_text_packages_are_skipped_with_a_note(tmp_path, monkeypatch):
    import modification.conversion.texts as texts

    monkeypatch.setattr(texts, "missing_reason", lambda kind: (
        "the Debian package dict-gcide is not installed: `apt-get install dict-gcide`" if kind == "gcide" else None))
    kinds, skipped = demo.demo_texts(progress=False)
    assert kinds == ["shakespeare", "kjv"] and list(skipped) == ["gcide"]
    assert "apt-get install dict-gcide" in skipped["gcide"]
    # the texts are linked under the names the results give them; linking again replaces the links
    prepared = {"kjv": {"train": tmp_path / "a.txt", "held_out": tmp_path / "b.txt"}}
    (tmp_path / "b.txt").write_text("kjv held_out\n")
    link = stage_texts(prepared, tmp_path / "work" / "texts")["kjv"]["held_out"]
    assert link.name == "kjv-held_out.txt" and link.read_text() == "kjv held_out\n"
    assert stage_texts(prepared, link.parent)["kjv"]["held_out"] == link


def test_demo_runs_end_to_end_on_a_tiny_base(tmp_path, monkeypatch, capsys):
    report = run_tiny_demo(monkeypatch, tmp_path, {"gcide": "not installed here"})
    out = capsys.readouterr().out
    for command in ("convert", "fit", "eval", "bench", "card"):
        config = f"demo-out-work/{command}.yaml"
        assert f"\n$ modification {command} --config {config}\n  # as flags: modification {command} " in out
    assert "skipping gcide: not installed here" in out and "Hub-ready checkpoint: demo-out" in out
    folder = tmp_path / "demo-out"
    results = json.loads((folder / "results.json").read_text())
    assert report.results == results
    assert [r["dataset"] for r in results["quality"]["perplexity"]] == ["shakespeare-held_out.txt", "kjv-held_out.txt"]
    assert results["efficiency"]["latency"][0]["context_length"] == 64
    assert (folder / "README.md").is_file() and (folder / "model.safetensors").is_file()
    assert not (tmp_path / "demo-out-work" / "converted").exists()
    [chat] = report.chat
    assert set(chat) == {"prompt", "base", "mod", "mod_kv_fraction"} and 0 < chat["mod_kv_fraction"] <= 1
    quality, rows = summary_rows(results)
    assert [q[0] for q in quality] == ["shakespeare @128", "kjv @128"]
    assert any(k.startswith("prefill time @64") for k, _ in rows)
    shown = dict(rows)
    assert shown["budget asked (fit)"] == "kv_fraction 0.8" and shown["planned by fit"].startswith("KV 0.800, FLOPs ")
    assert "attention" in shown["routed layers (chosen by fit)"]
    with pytest.raises(FileExistsError):
        run_demo("demo-out", base=str(tmp_path / "model" / "base"), changes=TINY_CHANGES, progress=False)


def test_eval_and_bench_take_the_registry_name_of_a_fetched_base(tmp_path, monkeypatch, capsys):
    """`--base smollm2-135m-instruct` names the fetched folder, and a checkpoint that records the base's Hub id finds
    that folder without `--base` (the Hub id is not in the Hub cache here)."""
    import shutil

    from helpers import save_base

    from modification.cli.main import main as cli
    from modification.conversion.bases import KNOWN_BASES, BaseNotFetchedError
    from modification.conversion.convert import convert_checkpoint
    from modification.conversion.settings import ConvertSettings
    from modification.evaluation.loading import load_models, local_base_model

    name = "smollm2-135m-instruct"
    hub_id = KNOWN_BASES[name].hub_id
    monkeypatch.setenv("MODIFICATION_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    source = save_base("llama", tmp_path / "source")  # stands in for what `fetch-base` writes
    (source / "PROVENANCE.md").write_text(f"# Provenance\n\n- registry name: `{name}`\n")
    mod = str(convert_checkpoint(ConvertSettings(base=str(source), out=str(tmp_path / "mod"))))
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
