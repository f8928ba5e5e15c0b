"""`loraplex train`: flags -> TrainConfig -> train (or a sweep, or N processes); one line per user error.

The `loraplex` entry point adds this with add_train_parser(subparsers) and calls run_train(args);
`python -m loraplex.training` runs the same command on its own (what `accelerate launch` starts).
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings
from pathlib import Path

from loraplex.server.adapters.names import adapter_name_problem
from loraplex.server.errors import ConfigError, LoraplexError

from .config import TrainConfig, parse_target_modules

DEFAULT_SERVER = "127.0.0.1:50051"
# flag -> (TrainConfig field, argparse keywords). Defaults stay None so TrainConfig's (or a sweep file's) apply.
TRAIN_FLAGS = {
    "--data": ("data", dict(metavar="FILE.jsonl", help="training data: chat messages, instruction/input/output, "
                                                       "prompt/completion or text records")),
    "--out": ("out", dict(metavar="DIR", help="output folder (PEFT adapter, README.md card, checkpoints/, logs/)")),
    "--base": ("base", dict(metavar="PATH", help="HF model folder (default: the embedded SmolLM2-135M-Instruct)")),
    "--eval-data": ("eval_data", dict(metavar="FILE", help="evaluation JSONL (default: hold out --eval-split)")),
    "--eval-split": ("eval_split", dict(type=float, metavar="F", help="fraction held out for eval (default 0.1)")),
    "--qlora": ("qlora", dict(action="store_true", default=None, help="NF4 base (double quant) + LoRA")),
    "--r": ("r", dict(type=int, metavar="N", help="LoRA rank (default 16)")),
    "--alpha": ("alpha", dict(type=float, metavar="A", help="LoRA alpha (default 32)")),
    "--dropout": ("dropout", dict(type=float, metavar="P", help="LoRA dropout (default 0.05)")),
    "--target-modules": ("target_modules", dict(type=parse_target_modules, metavar="all-linear|q_proj,v_proj,...",
                                                help="projections to adapt (default all-linear)")),
    "--rslora": ("rslora", dict(action="store_true", default=None, help="rank-stabilized scale alpha/sqrt(r)")),
    "--lr": ("learning_rate", dict(type=float, metavar="LR", help="learning rate (default 2e-4)")),
    "--scheduler": ("lr_scheduler", dict(metavar="NAME", help="cosine (default), linear, constant, ...")),
    "--warmup": ("warmup", dict(type=float, metavar="W", help="warmup fraction (< 1) or steps (default 0.03)")),
    "--weight-decay": ("weight_decay", dict(type=float, metavar="WD")),
    "--max-grad-norm": ("max_grad_norm", dict(type=float, metavar="N")),
    "--epochs": ("epochs", dict(type=float, metavar="E", help="epochs (default 3)")),
    "--max-steps": ("max_steps", dict(type=int, metavar="N", help="optimizer steps; overrides --epochs")),
    "--batch-size": ("batch_size", dict(type=int, metavar="N", help="rows per device per micro-step (default 4)")),
    "--grad-accum": ("grad_accum", dict(type=int, metavar="N", help="micro-steps per optimizer step (default 1)")),
    "--max-length": ("max_length", dict(type=int, metavar="N", help="tokens per example / packed row (default 1024)")),
    "--packing": ("packing", dict(action="store_true", default=None,
                                  help="pack examples into rows (no attention across examples)")),
    "--group-by-length": ("group_by_length", dict(action="store_true", default=None,
                                                  help="batch examples of similar length")),
    "--gradient-checkpointing": ("gradient_checkpointing", dict(action="store_true", default=None)),
    "--checkpoint-layers": ("checkpoint_layers", dict(type=int, metavar="N", help="with --gradient-checkpointing: "
                                                      "recompute only the first N decoder layers (default all)")),
    "--attention": ("attention", dict(choices=["auto", "sdpa", "varlen"], help="varlen: packed rows without a "
                                      "dense mask (FlashAttention varlen on a GPU); auto (default) picks it there")),
    "--liger": ("liger", dict(choices=["auto", "on", "off"], help="Liger Kernel fused ops (default auto: on with "
                              "CUDA + Triton + liger-kernel)")),
    "--no-chunked-loss": ("chunked_loss", dict(action="store_false", default=None,
                                               help="use the model's full-logits loss")),
    "--eval-steps": ("eval_steps", dict(type=int, metavar="N", help="also evaluate every N steps")),
    "--logging-steps": ("logging_steps", dict(type=int, metavar="N", help="default 10")),
    "--save-steps": ("save_steps", dict(type=int, metavar="N", help="checkpoint every N steps (0: none; default 100)")),
    "--save-total-limit": ("save_total_limit", dict(type=int, metavar="N")),
    "--resume": ("resume", dict(nargs="?", const="latest", metavar="CHECKPOINT",
                                help="continue from the newest checkpoint in OUT/checkpoints, or from CHECKPOINT")),
    "--seed": ("seed", dict(type=int, metavar="N")),
    "--precision": ("precision", dict(choices=["auto", "bf16", "fp32"])),
    "--device": ("device", dict(choices=["auto", "cpu", "cuda"])),
    "--optim": ("optim", dict(metavar="NAME", help="auto (paged_adamw_8bit for QLoRA on a GPU), adamw_torch, ...")),
    "--fsdp": ("fsdp", dict(action="store_true", default=None, help="with --num-processes: shard with FSDP")),
    "--no-tensorboard": ("tensorboard", dict(action="store_false", default=None)),
    "--no-progress": ("progress", dict(action="store_false", default=None)),
}


def add_train_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser("train", help="train a LoRA / QLoRA adapter from JSONL",
                                   description="Train a LoRA / QLoRA adapter (a PEFT folder) from JSONL.")
    _add_arguments(parser)
    return parser


def _add_arguments(parser: argparse.ArgumentParser) -> None:
    for flag, (dest, kwargs) in TRAIN_FLAGS.items():
        parser.add_argument(flag, dest=dest, **kwargs)
    parser.add_argument("--num-processes", type=int, default=1, metavar="N",
                        help="processes (GPUs) through accelerate launch (DDP, or FSDP with --fsdp)")
    parser.add_argument("--sweep", metavar="SWEEP.toml", help="run a grid of configs; ranked table + loss plot in OUT")
    parser.add_argument("--register", metavar="NAME", help="upload the adapter to a running loraplex server as NAME")
    parser.add_argument("--server", metavar="HOST:PORT", default=None, help=f"for --register (default {DEFAULT_SERVER})")
    parser.add_argument("--token-file", default=None, metavar="FILE",
                        help="admin bearer token for --register (else env LORAPLEX_ADMIN_TOKEN)")
    parser.add_argument("--overwrite", action="store_true", help="delete an earlier run's outputs in OUT first")


def config_from_args(args: argparse.Namespace, base: dict | None = None) -> TrainConfig:
    values = dict(base or {})
    values.update({dest: getattr(args, dest) for dest, _ in TRAIN_FLAGS.values() if getattr(args, dest) is not None})
    return TrainConfig(**values)


def train_argv(args: argparse.Namespace) -> list[str]:
    """The flags that reproduce this run's TrainConfig (for the processes `accelerate launch` starts)."""
    argv = []
    for flag, (dest, kwargs) in TRAIN_FLAGS.items():
        value = getattr(args, dest)
        if value is None:
            continue
        if kwargs.get("action") in ("store_true", "store_false"):
            argv.append(flag)
        elif dest == "target_modules":
            argv += [flag, ",".join(value)]
        else:
            argv += [flag, str(value)]
    return argv


def check_register(args: argparse.Namespace) -> None:
    """Validate --register / --server before training, so a typo does not cost a whole run."""
    if args.server is not None and not args.register:
        raise ConfigError("--server is only used with --register NAME")
    if not args.register:
        return
    problems = []
    name_problem = adapter_name_problem(args.register)
    if name_problem:
        problems.append(f"--register {name_problem}")
    server = args.server or DEFAULT_SERVER
    host, _, port = server.rpartition(":")
    if not host or not port.isdigit() or not 1 <= int(port) <= 65535:
        problems.append(f"--server {server!r}: expected HOST:PORT")
    if problems:
        raise ConfigError("; ".join(problems))


def register_trained(args: argparse.Namespace, folder: Path, say=print) -> None:
    """Upload the finished adapter folder to a running server (Adapters.UploadAdapter)."""
    from loraplex.client import Client, ClientConfig, LoraplexClientError
    from loraplex.server.settings import read_tokens

    tokens = read_tokens(getattr(args, "token_file", None), "LORAPLEX_ADMIN_TOKEN")
    target = args.server or DEFAULT_SERVER
    try:
        with Client(ClientConfig(target=target, token=tokens[0] if tokens else None)) as client:
            info = client.upload_adapter(args.register, folder)
    except LoraplexClientError as exc:
        raise ConfigError(f"--register: {target} refused the upload ({exc.status.name}: {exc.message}); "
                          f"the adapter is saved in {folder}") from None
    say(f"registered {info.name!r} version {info.version} on {target} (sha256 {info.sha256[:12]})")


def run_train(args: argparse.Namespace, say=print) -> int:
    """The `train` subcommand; user errors become one line on stderr and exit code 2."""
    _quiet_libraries(getattr(args, "verbose", False))
    try:
        check_register(args)
        if args.sweep:
            if args.num_processes != 1:
                raise ConfigError("--sweep runs in one process; drop --num-processes")
            from .sweep import run_sweep

            run_sweep(Path(args.sweep), args, say=say)
            return 0
        if args.num_processes < 1:
            raise ConfigError(f"--num-processes {args.num_processes} (>= 1)")
        if args.fsdp and args.num_processes == 1 and not _under_launcher():
            raise ConfigError("--fsdp shards over several processes: add --num-processes N")
        cfg = config_from_args(args)
        if args.overwrite:
            from .train import clear_outputs

            clear_outputs(Path(cfg.out))
        if args.num_processes > 1 and not _under_launcher():
            from .launch import launch

            code = launch(train_argv(args), args.num_processes, bool(args.fsdp), Path(cfg.out), say=say)
            if code != 0:
                print(f"loraplex train: error: the {args.num_processes} training processes failed (exit {code})",
                      file=sys.stderr)
                return 2
            return 0
        from .train import train

        train(cfg, say=say if _is_main_process() else (lambda *_: None))
        if args.register and _is_main_process():
            register_trained(args, Path(cfg.out), say=say)
        return 0
    except LoraplexError as exc:
        print(f"loraplex train: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("loraplex train: interrupted (continue with --resume)", file=sys.stderr)
        return 130


def _under_launcher() -> bool:
    from .launch import under_launcher

    return under_launcher()


def _is_main_process() -> bool:
    return os.environ.get("RANK", "0") == "0"


def _quiet_libraries(verbose: bool) -> None:
    """Library chatter (weight-loading bars, deprecation notes) off unless -v; our own lines stay."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if verbose:
        return
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    for name in ("bitsandbytes", "peft", "accelerate"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning, module=r"(peft|transformers|torch|bitsandbytes)\b.*")


def main(argv: list[str] | None = None) -> int:
    """`python -m loraplex.training ...`: the train command alone."""
    parser = argparse.ArgumentParser(prog="loraplex train", description="Train a LoRA / QLoRA adapter from JSONL.")
    parser.add_argument("-v", "--verbose", action="store_true")
    _add_arguments(parser)
    return run_train(parser.parse_args(argv))
