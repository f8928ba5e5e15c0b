"""`loraplex` command line: one entry point, a subcommand per job, one clear line per user error."""
from __future__ import annotations

import argparse
import logging
import os
import sys

from .errors import LoraplexError


def _add_model_args(parser: argparse.ArgumentParser, quantization: str = "nf4") -> None:
    parser.add_argument("--model", default=None, help="HF folder or .gguf file (default: embedded SmolLM2-135M)")
    parser.add_argument("--quantization", default=quantization, choices=["nf4", "bf16", "fp16", "none"])
    parser.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                        help="compute dtype (default: bfloat16 on a GPU, float32 on the CPU)")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="loraplex", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="log lifecycle events")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    demo = sub.add_parser("demo", help="in-process demo: base, two adapters and a 50/50 mix in one batch")
    _add_model_args(demo)
    demo.add_argument("--adapters-dir", default=None, help="folder of example adapters (default: examples/adapters)")
    demo.add_argument("--max-new-tokens", type=int, default=48)

    from .bench.cli import add_bench_parser

    add_bench_parser(sub)
    return parser


def resolve_device(device: str | None) -> str:
    import torch

    return device or ("cuda" if torch.cuda.is_available() else "cpu")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if not args.verbose:  # bitsandbytes warns at import about optional CPU kernels it does not need
        logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    try:
        if args.command == "demo":
            from .demo import run_demo

            return run_demo(args)
        if args.command == "bench":
            from .bench.cli import run_bench

            return run_bench(args)
    except LoraplexError as exc:
        print(f"loraplex: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 1


if __name__ == "__main__":
    sys.exit(main())
