"""`modification eval` / `show-routing`: perplexity against the real base, executed fraction from router decisions,
the results JSON, plots and bad input. Tiny models built here; no network."""

import contextlib
import json
import math
from pathlib import Path

import pytest
import torch
from helpers import VOCAB, reference_forward, routed_model, save_base, tiny_base, tiny_tokenizer

from modification.cli.main import main as cli
from modification.conversion.checkpoint import save_checkpoint
from modification.conversion.results import load_results, update_results
from modification.evaluation.quality import load_metric, sliding_windows, tokenize_texts
from modification.modeling.configuration_mod import RoutingPlan


def _write_text(path: Path, words: int, seed: int = 0) -> Path:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, VOCAB, (words,), generator=gen).tolist()
    lines = [" ".join(f"w{i - 4}" for i in ids[j:j + 12]) for j in range(0, words, 12)]
    path.write_text("\n".join(lines) + "\n")
    return path


def _routed_checkpoint(folder: Path, base_dir: Path | None = None, **routing) -> Path:
    model = routed_model("llama", **routing)
    if base_dir is not None:
        model.config.base_model_name_or_path = str(base_dir)
    save_checkpoint(model, folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder


def _png_ok(path: Path) -> None:
    import matplotlib.image

    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", path
    assert path.stat().st_size > 5000, path
    pixels = matplotlib.image.imread(path)
    assert pixels.shape[0] > 100 and pixels.shape[1] > 100
    assert pixels[..., :3].std() > 0.05, f"{path} is blank"


def _reference_perplexity(base, stream: torch.Tensor, context: int, stride: int, full_context: bool) -> tuple:
    """Sliding-window perplexity through the model's own loss (labels -100 on tokens already scored), windows ending
    at context, context + stride, ... and at the end of the text, each with up to `context` tokens; with
    `full_context` the first window scores only its last `stride` tokens. Returns (perplexity, tokens scored)."""
    nll, count = 0.0, 0
    prev_end = min(context, stream.numel()) - stride if full_context else 0
    ends = list(range(min(context, stream.numel()), stream.numel(), stride)) + [stream.numel()]
    for end in sorted(set(ends)):
        ids = stream[max(0, end - context):end].unsqueeze(0)
        labels = ids.clone()
        labels[:, : ids.shape[1] - (end - prev_end)] = -100
        with torch.no_grad():
            loss = base(input_ids=ids, labels=labels).loss
        n = int((labels[:, 1:] != -100).sum())
        nll += loss.item() * n
        count += n
        prev_end = end
    return math.exp(nll / count), count


def test_sliding_windows_score_every_token_once():
    for n, context, stride in [(10, 4, 2), (10, 4, 4), (9, 4, 3), (3, 8, 4), (100, 16, 5), (100, 16, 16)]:
        windows = sliding_windows(n, context, stride, full_context=False)
        scored = [t for begin, end, k in windows for t in range(end - k, end)]
        assert sorted(scored) == list(range(n)), (n, context, stride)
        assert all(end - begin <= context and 0 < k <= end - begin for begin, end, k in windows)
        # every scored token after the first window sees at least context - stride earlier tokens
        for begin, end, k in windows[1:]:
            assert end - k - begin >= min(context - stride, end - k)


def test_full_context_windows_score_only_tokens_with_the_long_context_behind_them():
    for n, context, stride in [(10, 4, 2), (10, 4, 4), (9, 4, 3), (100, 16, 5), (100, 16, 1), (4096, 512, 256)]:
        windows = sliding_windows(n, context, stride, full_context=True)
        scored = [t for begin, end, k in windows for t in range(end - k, end)]
        # each token once, from the first one with context - stride tokens before it to the end of the text
        assert scored == list(range(context - stride, n)), (n, context, stride)
        for begin, end, k in windows:
            assert end - begin <= context
            assert all(t - begin >= context - stride for t in range(end - k, end)), (begin, end, k)
    assert sliding_windows(12, 8, 4, full_context=True)[0] == (0, 8, 4)  # the first window: its last stride tokens


@pytest.mark.parametrize("full_context", [True, False])
def test_converted_dense_model_has_the_base_perplexity(tmp_path, capsys, caplog, full_context):
    base_dir = save_base("llama", tmp_path / "base")
    assert cli(["convert", "--base", str(base_dir), "--out", str(tmp_path / "mod")]) == 0
    text = _write_text(tmp_path / "text.txt", 300)
    out = tmp_path / "out"
    capsys.readouterr()
    assert cli(["eval", "--model", str(tmp_path / "mod"), "--base", str(base_dir), "--data", str(text),
                "--context-lengths", "64,512", "--stride", "32", "--out", str(out), "--no-progress",
                *([] if full_context else ["--no-full-context"])]) == 0
    results = load_results(out)
    rows = {r["context_length"]: r for r in results["quality"]["perplexity"]}
    stream = tokenize_texts(tiny_tokenizer(), [text.read_text()])
    assert set(rows) == {64, stream.numel()}  # the text is shorter than 512: one window of all of it
    base = tiny_base("llama")
    for context, row in rows.items():
        stride = min(32, context)
        expected, count = _reference_perplexity(base, stream, context, stride, full_context)
        assert row["base"] == pytest.approx(expected, rel=1e-5)
        assert row["mod"] == pytest.approx(row["base"], rel=1e-5)
        assert row["tokens"] == count == (stream.numel() - (context - stride) if full_context else stream.numel() - 1)
        assert row["min_context"] == (context - stride if full_context else 1)
        assert 1.0 < row["mod"] < 2 * VOCAB  # a random model: near-uniform, not degenerate
        assert row["kv_fraction"] == row["flop_fraction"] == 1.0
    efficiency = results["efficiency"]
    assert efficiency["kv_fraction"] == 1.0 and "executed_fraction" not in efficiency and "kv_ratio" not in efficiency
    assert efficiency["flop_fraction"] == {str(t): 1.0 for t in sorted({64, stream.numel(), 4096})}
    captured = capsys.readouterr()
    assert "perplexity text.txt @64" in captured.out
    assert "Loading weights" not in captured.err  # --no-progress silences transformers' bars too
    # the default look-up distances (512, 2048) do not fit this model's 512 positions
    assert "look-up at distance 512 left out: 640 tokens exceed the model's 512 positions" in caplog.text


@pytest.mark.parametrize("granularity", ["block", "attention"])
def test_kv_and_flop_fractions_match_router_decisions(tmp_path, monkeypatch, granularity):
    monkeypatch.chdir(tmp_path)  # the checkpoint names its base folder by its path relative to the working directory
    base_dir = save_base("llama", tmp_path / "base")
    ck = _routed_checkpoint(tmp_path / "mod", base_dir, routing_granularity=granularity)
    text = _write_text(tmp_path / "text.txt", 150, seed=1)
    out = tmp_path / "out"
    # No --base: the checkpoint's base_model_name_or_path is a local folder (found from here), so it is used.
    assert cli(["eval", "--model", str(ck), "--data", str(text), "--context-lengths", "256", "--out", str(out),
                "--no-progress"]) == 0
    results = load_results(out)
    assert results["model"]["base_model"] == "./base"
    assert results["quality"]["perplexity"][0]["base"] is not None

    # Count from the slow reference implementation's routing masks on the same (single-window) stream.
    model = routed_model("llama", routing_granularity=granularity)
    stream = tokenize_texts(tiny_tokenizer(), [text.read_text()]).unsqueeze(0)
    _, masks = reference_forward(model, stream)
    per_layer = [m.sum().item() / stream.numel() for m in masks]
    with torch.no_grad():
        decisions = model(stream, output_router_decisions=True).router_decisions
    assert per_layer == [d.sum().item() / stream.numel() for d in decisions]
    efficiency = results["efficiency"]
    assert efficiency["per_layer_routed_fraction"] == pytest.approx(per_layer, abs=1e-12)
    # K/V are written only by tokens that ran a layer's attention, and every layer has the same K/V size.
    assert efficiency["kv_fraction"] == pytest.approx(sum(per_layer) / len(per_layer), abs=1e-12)
    assert 0.5 < efficiency["kv_fraction"] < 1.0  # the routers really skip tokens
    # The FLOP fraction is the RoutingPlan's with the measured share of each routed layer, at every evaluated length
    # and at 4096.
    config = model.config
    plan = RoutingPlan.from_config(config, [per_layer[j] for j in config.routed_layers])
    assert plan.granularity == (granularity,) * len(config.routed_layers)
    assert list(efficiency["flop_fraction"]) == [str(stream.numel()), "4096"]
    for length, value in efficiency["flop_fraction"].items():
        assert value == pytest.approx(plan.flop_fraction(config, int(length)), rel=1e-9)
        assert value < 1.0
    [row] = results["quality"]["perplexity"]
    assert row["flop_fraction"] == pytest.approx(efficiency["flop_fraction"][str(stream.numel())], rel=1e-9)
    assert row["kv_fraction"] == pytest.approx(efficiency["kv_fraction"], abs=1e-12)
    # a skipped token that still runs the MLP costs more FLOPs than one that skips the whole block
    block = RoutingPlan(plan.num_layers, plan.routed_layers, plan.routed_share, ["block"] * len(plan.routed_layers))
    assert (value > block.flop_fraction(config, 4096)) == (granularity == "attention")
    _png_ok(out / "routed_fraction.png")
    records = list((out / "eval_records").glob("result-*.json"))
    assert len(records) == 1 and "_git_commit_hash" in json.loads(records[0].read_text())


def test_routed_fraction_over_sliding_windows_counts_every_window(tmp_path):
    ck = _routed_checkpoint(tmp_path / "mod")
    text = _write_text(tmp_path / "text.txt", 100, seed=2)
    out = tmp_path / "out"
    assert cli(["eval", "--model", str(ck), "--no-base", "--data", str(text), "--context-lengths", "32",
                "--stride", "12", "--out", str(out), "--no-progress"]) == 0
    efficiency = load_results(out)["efficiency"]
    model = routed_model("llama")
    stream = tokenize_texts(tiny_tokenizer(), [text.read_text()])
    counts, tokens = torch.zeros(model.config.num_hidden_layers, dtype=torch.float64), 0
    for begin, end, _ in sliding_windows(stream.numel(), 32, 12, full_context=True):
        with torch.no_grad():
            out_ = model(stream[begin:end].unsqueeze(0), output_router_decisions=True)
        counts += torch.tensor([float(d.sum()) for d in out_.router_decisions])
        tokens += end - begin
    assert efficiency["per_layer_routed_fraction"] == pytest.approx((counts / tokens).tolist(), abs=1e-12)


def test_metric_modules_load_from_local_folders():
    metric = load_metric("routed_fraction")
    result = metric.compute(routed_tokens=[[5, 2, 5, 0], [3, 3, 3, 1]], tokens=[5, 3])
    assert result == {"per_layer_routed_fraction": [1.0, 5 / 8, 1.0, 1 / 8]}
    with pytest.raises(ValueError, match="routed-token counts"):
        load_metric("routed_fraction").compute(routed_tokens=[[6]], tokens=[5])
    assert load_metric("kv_fraction").compute(mod_kv_bytes=[10, 20], base_kv_bytes=[40, 40]) == {"kv_fraction": 30 / 80}


def test_results_merge_keeps_other_rows_and_drops_stale_routing(tmp_path):
    model = routed_model("llama")
    path = tmp_path / "results.json"
    row = {"dataset": "a", "context_length": 64, "tokens": 10, "mod": 5.0, "base": 4.0}
    update_results(path, model.config, "m", None, "cmd1", quality={"perplexity": [row]})
    update_results(path, model.config, "m", None, "cmd2",
                   quality={"perplexity": [dict(row, context_length=128), dict(row, mod=6.0)]},
                   efficiency={"kv_fraction": 0.8})
    results = load_results(path)
    assert sorted((r["context_length"], r["mod"]) for r in results["quality"]["perplexity"]) == [(64, 6.0), (128, 5.0)]
    assert results["commands"] == ["cmd1", "cmd2"] and results["efficiency"]["kv_fraction"] == 0.8
    data = json.loads(path.read_text())
    data["training"] = {"recipe": "r"}
    path.write_text(json.dumps(data))
    model.config.router_threshold = 0.6
    results = update_results(path, model.config, "m", None, "cmd3", efficiency={"kv_fraction": 0.7})
    assert results["quality"] == {} and results["commands"] == ["cmd3"]
    assert results["training"] == {"recipe": "r"} and results["routing"]["router_threshold"] == 0.6


def test_show_routing_writes_map_html_and_bars(tmp_path, capsys):
    ck = _routed_checkpoint(tmp_path / "mod")
    words = [f"w{i}" for i in range(3, 43)]
    text = " ".join(words[:20]) + " <b>&\n" + " ".join(words[20:])
    out = tmp_path / "routing"
    assert cli(["show-routing", "--model", str(ck), "--text", text, "--out", str(out)]) == 0
    for name in ("routing.png", "routed_fraction.png"):
        _png_ok(out / name)
    page = (out / "routing.html").read_text()
    data = json.loads((out / "routing.json").read_text())
    assert len(data["tokens"]) == 41 and len(data["gates"]) == 4  # 40 words and "<b>&" (unknown: one token)
    assert page.count('class="tok"') == len(data["tokens"])
    assert "&lt;b&gt;&amp;" in page and " src=" not in page and "href=" not in page  # escaped, self-contained
    # Gates come from the model's own router logits; decisions are gate >= p.
    model = routed_model("llama")
    ids = tiny_tokenizer()(text, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        out_ = model(ids, output_router_decisions=True)
    router_logits = dict(zip(model.config.routed_layers, out_.router_logits))  # one per routed layer
    for layer, (gates, ran) in enumerate(zip(data["gates"], data["ran"])):
        assert ran == out_.router_decisions[layer][0].int().tolist()
        if layer not in router_logits:
            assert gates == [None] * len(ran)
        else:
            assert gates == pytest.approx(torch.sigmoid(router_logits[layer][0]).tolist(), abs=1e-4)
    assert "wrote" in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv,message",
    [
        (["eval", "--data", "{tmp}/missing.txt"], "does not exist"),
        (["eval", "--data", "{tmp}/empty.txt"], "holds no text"),
        (["eval", "--data", "{tmp}/bad.jsonl"], "has no field 'text'"),
        (["eval"], "nothing to evaluate"),
        (["eval", "--tasks", "hellaswagg"], "unknown lm-eval task 'hellaswagg'; did you mean hellaswag"),
        (["eval", "--tasks", "x", "--tasks-path", "{tmp}/nowhere"], "no task folder or file"),
        (["show-routing", "--text", "   "], "the text is empty"),
        (["show-routing", "--text-file", "{tmp}/missing.txt"], "no text file"),
    ],
)
def test_bad_input_is_a_clear_error(tmp_path, capsys, argv, message):
    (tmp_path / "empty.txt").write_text("\n  \n")
    (tmp_path / "bad.jsonl").write_text(json.dumps({"body": "w1 w2"}) + "\n")
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    # The model folder does not exist either: the data error must come first, before any model is loaded.
    assert cli([argv[0], "--model", str(tmp_path / "no-model"), *argv[1:]]) == 2
    err = capsys.readouterr().err
    assert f"modification {argv[0]}: error:" in err and message in err


def test_optional_result_fields_are_validated():
    from modification.conversion.results import validate_results

    good = {"schema_version": 2, "model": {"name_or_path": "m"}, "routing": {
        "router_kind": "threshold", "gate_mode": "exact", "routed_layers": [1], "router_threshold": 0.5},
        "quality": {"perplexity": [{"dataset": "a", "context_length": 8, "mod": 2.0, "base": None, "stride": 4}],
                    "lookup": [{"dataset": "a", "distance": 64, "passage_tokens": 16, "trials": 2,
                                "mod": {"accuracy": 0.5, "loss": 2.0}, "base": None}]},
        "efficiency": {"per_layer_routed_fraction": [1.0, 0.5], "kv_fraction": 0.75, "flop_fraction": {"8": 0.7},
                       "decode": [{"batch_size": 1, "throughput_ratio": 1.2, "flop_fraction": 0.8}]}}
    validate_results(good)
    for section, key, bad in [("quality", "perplexity", {"stride": "4"}), ("efficiency", "decode", {"new_tokens": 1.5}),
                              ("quality", "lookup", {"distance": 64.5})]:
        broken = json.loads(json.dumps(good))
        broken[section][key][0].update(bad)
        with pytest.raises(ValueError, match=f"{section}.{key}\\[0\\].{next(iter(bad))}"):
            validate_results(broken)
    for path, bad, field in [
        (("efficiency", "per_layer_routed_fraction"), [1.2], "per_layer_routed_fraction"),
        (("efficiency", "kv_fraction"), None, "efficiency.kv_fraction"),
        (("efficiency", "flop_fraction"), {"long": 0.5}, "efficiency.flop_fraction"),
        (("efficiency", "flop_fraction"), {"8": 1.5}, "efficiency.flop_fraction.8"),
        (("quality", "lookup"), [{**good["quality"]["lookup"][0], "mod": {"accuracy": 2.0, "loss": 1.0}}],
         r"quality.lookup\[0\].mod.accuracy"),
        (("quality", "lookup"), [{**good["quality"]["lookup"][0], "base": {"accuracy": 0.5}}],
         r"quality.lookup\[0\].base"),
    ]:
        broken = json.loads(json.dumps(good))
        broken[path[0]][path[1]] = bad
        with pytest.raises(ValueError, match=field):
            validate_results(broken)
    with pytest.raises(ValueError, match="schema_version' must be 2, got 1: the file was written by another version"):
        validate_results({**good, "schema_version": 1})


def test_results_of_an_older_schema_start_afresh_keeping_the_training(tmp_path, caplog):
    model = routed_model("llama")
    path = tmp_path / "results.json"
    path.write_text(json.dumps({"schema_version": 1, "training": {"recipe": "r"}, "efficiency": {
        "executed_fraction": 0.8, "kv_ratio": 0.8}, "quality": {"perplexity": []}, "commands": ["old"]}))
    results = update_results(path, model.config, "m", None, "new", efficiency={"kv_fraction": 0.7})
    assert results["schema_version"] == 2 and results["training"] == {"recipe": "r"}
    assert results["efficiency"] == {"kv_fraction": 0.7} and results["commands"] == ["new"]
    assert "schema version 1, not 2" in caplog.text


def _lookup_text(path: Path, words: int = 300) -> Path:
    return _write_text(path, words, seed=5)


def test_lookup_rows_land_in_results_and_the_card_and_are_printed(tmp_path, capsys, caplog):
    """The look-up check runs on the first data source, for MoD and base on the same sequences; distances the text
    cannot hold are left out with a warning, and the rows reach results.json, the printout and the model card."""
    from modification.conversion.lookup import lookup_rows, passkey_rows
    from modification.model_cards.card import render_card

    base_dir = save_base("llama", tmp_path / "base")
    ck = _routed_checkpoint(tmp_path / "mod", base_dir)
    first, second = _lookup_text(tmp_path / "first.txt"), _write_text(tmp_path / "second.txt", 2000, seed=6)
    out = tmp_path / "out"
    capsys.readouterr()
    assert cli(["eval", "--model", str(ck), "--base", str(base_dir), "--data", str(first), str(second),
                "--context-lengths", "64", "--lookup-distances", "48,200,400,500", "--lookup-passage-tokens", "16",
                "--lookup-trials", "3", "--passkey-lengths", "128,1024", "--out", str(out), "--no-progress"]) == 0
    captured = capsys.readouterr()
    results = load_results(out)
    rows = results["quality"]["lookup"]
    filler = tokenize_texts(tiny_tokenizer(), [first.read_text()])
    assert filler.numel() < 400 - 16 + 1  # so 400 does not fit the first text (the second would hold it)
    assert [r["distance"] for r in rows] == [48, 200]
    assert "look-up at distance 400 left out: the filler text first.txt" in caplog.text
    assert "look-up at distance 500 left out: 516 tokens exceed the model's 512 positions" in caplog.text
    # the same numbers as the library function on the first text's tokens
    mod, base = routed_model("llama"), tiny_base("llama")
    expected = lookup_rows({"mod": mod, "base": base}, filler, [48, 200], passage_tokens=16, trials=3,
                           dataset="first.txt")
    for row, want in zip(rows, expected):
        assert set(row) == set(want) == {"dataset", "distance", "passage_tokens", "trials", "mod", "base"}
        for name in ("mod", "base"):
            assert row[name] == pytest.approx(want[name], rel=1e-5)
        assert row["mod"] != row["base"]  # the routers skip tokens: MoD and base differ
        assert f"look-up first.txt distance {row['distance']} (16-token passage, 3 trials): accuracy mod " \
               f"{row['mod']['accuracy']:.3f}" in captured.out
    # the passkey check: the same prompts and scores as the library's, lengths past the positions left out
    [passkey] = results["quality"]["passkey"]
    assert "passkey at 1024 tokens left out: more than the model's 512 positions" in caplog.text
    [want] = passkey_rows({"mod": mod, "base": base}, tiny_tokenizer(), [128], trials=3)
    assert passkey["length"] == want["length"] <= 128 and passkey["trials"] == 3
    for name in ("mod", "base"):
        assert passkey[name] == pytest.approx(want[name], rel=1e-5)
    assert f"passkey {passkey['length']} tokens (3 trials): accuracy mod" in captured.out
    (ck / "results.json").write_text((out / "results.json").read_text())
    card = render_card(ck, "test-org/tiny-mod", base_model="test-org/tiny-llama").text
    row = rows[1]
    assert (f"| first.txt | 200 | 16 | 3 | {row['mod']['accuracy']:.6g} | {row['base']['accuracy']:.6g} | "
            f"{row['mod']['loss']:.6g} | {row['base']['loss']:.6g} |") in card
    assert f"| {passkey['length']} | 3 | {passkey['mod']['accuracy']:.6g} |" in card

    # --no-base: the base column is null; an empty list turns the check off
    assert cli(["eval", "--model", str(ck), "--no-base", "--data", str(first), "--context-lengths", "64",
                "--lookup-distances", "48", "--lookup-passage-tokens", "16", "--out", str(tmp_path / "alone"),
                "--no-progress"]) == 0
    [alone] = load_results(tmp_path / "alone")["quality"]["lookup"]
    assert alone["base"] is None and alone["mod"] == pytest.approx(
        lookup_rows({"mod": mod}, filler, [48], passage_tokens=16, trials=4, dataset="first.txt")[0]["mod"])
    assert cli(["eval", "--model", str(ck), "--no-base", "--data", str(first), "--context-lengths", "64",
                "--lookup-distances", "", "--out", str(tmp_path / "none"), "--no-progress"]) == 0
    assert "lookup" not in load_results(tmp_path / "none")["quality"]


def test_a_card_says_what_a_skipped_token_leaves_out(tmp_path):
    from modification.model_cards.card import render_card

    for granularity, words in [("attention", "still runs the layer's MLP"),
                               (["attention", "block"], "as `routing_granularity` says per layer")]:
        ck = _routed_checkpoint(tmp_path / str(len(words)), routing_granularity=granularity)
        assert words in render_card(ck, "test-org/tiny-mod", base_model="test-org/tiny-llama").text


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--lookup-distances", "64,8", "--lookup-passage-tokens", "16"], "eval: lookup_distances must be at least "
                                                                         "lookup_passage_tokens (16"),
        (["--lookup-passage-tokens", "1"], "eval: lookup_passage_tokens must be at least 2"),
        (["--lookup-trials", "0"], "eval: lookup_trials must be at least 1"),
        (["--passkey-lengths", "64"], "eval: passkey_lengths must be at least 128 tokens"),
        (["--lookup-trials", "many"], "eval.lookup_trials: must be an integer"),
        (["--full-context"], "unrecognized arguments: --full-context"),  # on by default: --no-full-context
        (["--context-lengths", "1024"], "context_lengths holds 1024, more than the model's max_position_embeddings "
                                        "(512)"),
    ],
)
def test_bad_eval_settings_name_the_field(tmp_path, capsys, argv, message):
    ck = _routed_checkpoint(tmp_path / "mod")
    text = _write_text(tmp_path / "text.txt", 50)
    with pytest.raises(SystemExit) if message.startswith("unrecognized") else contextlib.nullcontext():
        assert cli(["eval", "--model", str(ck), "--no-base", "--data", str(text), "--no-progress", *argv]) == 2
    assert message in capsys.readouterr().err
