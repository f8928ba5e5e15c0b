"""`loraplex` command line: one entry point, a subcommand per job, one clear line per user error.

Each subcommand is a pair (add_X_parser(sub), run_X(args)) in COMMANDS; training and export plug in
the same way (an import and a pair each).
"""
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


def add_demo_parser(sub) -> None:
    demo = sub.add_parser("demo", help="start a server on the embedded model and run a client against it",
                          description="Starts `loraplex serve` on a free local port, registers the example adapters, "
                                      "generates with each and with a weighted mix, streams one answer, stops.")
    _add_model_args(demo)
    demo.add_argument("--adapters-dir", default=None, help="folder of example adapters (default: examples/adapters)")
    demo.add_argument("--max-new-tokens", type=int, default=48)
    demo.add_argument("--in-process", action="store_true",
                      help="no server: base, two adapters and a 50/50 mix in one engine batch")


def run_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo as demo

    return demo(args)


def commands() -> list:
    """(add_parser, run) per subcommand. A new one is an import and a pair, e.g.
    `from loraplex.training.cli import add_train_parser, run_train` and `(add_train_parser, run_train)`."""
    from .bench.cli import add_bench_parser, run_bench
    from .service.client_cmds import (add_adapters_parser, add_generate_parser, add_health_parser, run_adapters,
                                      run_generate, run_health)
    from .service.serve_cmd import add_serve_parser, run_serve
    from loraplex.export.cli import add_export_parser, run_export
    from loraplex.training.cli import add_train_parser, run_train

    return [(add_serve_parser, run_serve), (add_generate_parser, run_generate),
            (add_adapters_parser, run_adapters), (add_health_parser, run_health), (add_demo_parser, run_demo),
            (add_bench_parser, run_bench),
            (add_train_parser, run_train), (add_export_parser, run_export)]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="loraplex", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="log lifecycle events")
    parser.add_argument("--config", default=os.environ.get("LORAPLEX_CONFIG"), metavar="FILE",
                        help="TOML settings, tables [serve] and [client] (env LORAPLEX_CONFIG); "
                             "precedence: flag > env > config file > default")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add_parser, run in commands():
        before = set(sub.choices)
        add_parser(sub)
        for name in set(sub.choices) - before:
            sub.choices[name].set_defaults(_run=run)
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
        layers = getattr(args, "_layers", None)
        if layers is not None:
            from .settings import read_config_file

            layers.resolve(args, read_config_file(args.config))
        return args._run(args)
    except LoraplexError as exc:
        print(f"loraplex: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # a file the user named: missing, unreadable, a folder where a file goes ...
        where = f" {exc.filename}" if exc.filename else ""
        print(f"loraplex: error:{where} {exc.strerror or exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except Exception as exc:
        from loraplex.client import LoraplexClientError

        if isinstance(exc, LoraplexClientError):
            hint = f" (is `loraplex serve` running at {args.server}?)" if exc.retryable and hasattr(
                args, "server") else ""
            print(f"loraplex: error: {exc.status.name}: {exc.message}{hint}", file=sys.stderr)
            return 1
        raise

if __name__ == "__main__":
    sys.exit(main())
