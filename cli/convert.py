"""`modification convert`: a Llama/Mistral/Qwen2/Qwen3 checkpoint becomes a MoD checkpoint (`convert_checkpoint`)."""

from __future__ import annotations

import argparse

from .options import add_out_argument, add_overwrite_argument, add_routing_arguments, routing_from_args


def register(sub) -> None:
    p = sub.add_parser("convert", help="convert a Llama/Mistral/Qwen2/Qwen3 checkpoint into a MoD checkpoint",
                       description=__doc__)
    p.add_argument("--base", required=True,
                   help="base model: Hub id, folder, or a name fetched with `modification fetch-base`")
    add_out_argument(p)
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--revision", default=None, help="Hub revision of the base")
    add_overwrite_argument(p)
    p.add_argument("--trust-remote-code", action="store_true", help="allow custom code in the base checkpoint")
    add_routing_arguments(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> None:
    from modification.conversion.convert import convert_checkpoint

    out = convert_checkpoint(
        args.base, args.out, dtype=args.dtype, revision=args.revision, overwrite=args.overwrite,
        trust_remote_code=args.trust_remote_code, **routing_from_args(args),
    )
    print(f"wrote MoD checkpoint to {out}")
