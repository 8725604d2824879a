"""The `modification` command-line tool."""

from __future__ import annotations

import argparse
import logging
import sys


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
    try:
        args.func(args)
    except (ValueError, FileExistsError, FileNotFoundError, OSError) as err:
        print(f"modification {args.command}: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
