"""`loraplex train`: JSONL in, a PEFT adapter folder with a model card out. Reads top to bottom:

    config -> data (read, split, encode, pack) -> base + LoRA -> Trainer -> train (eval before/after)
           -> adapter (safetensors) + train_summary.json + README.md
"""
from __future__ import annotations

import json
import logging
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from loraplex.server.errors import ConfigError, ModelLoadError

from .batching import Collator, RowDataset, pack, unpacked
from .card import folder_weights_sha256, write_card
from .config import TrainConfig
from .data import read_jsonl, split_eval
from .encode import encode_examples
from .loss import ChunkedCausalLMLoss, supports_chunked_loss
from .model import add_lora, base_model_id, load_base, load_tokenizer, resolve_runtime, speedups

log = logging.getLogger(__name__)
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


@dataclass(frozen=True, slots=True)
class TrainResult:
    out: Path
    summary: dict
    """What train_summary.json holds (and the model card shows)."""


def train(cfg: TrainConfig, say=print) -> TrainResult:
    """Run one training job; `say` gets the human-readable lines (main process only)."""
    from transformers import ProgressCallback, TrainingArguments, set_seed

    from .trainer import LoraplexTrainer, ProgressBar

    started = time.monotonic()
    out = Path(cfg.out)
    checkpoints, logs_dir = out / "checkpoints", out / "logs"
    runtime = resolve_runtime(cfg)
    base_dir = _base_dir(cfg.base)
    resume_from = _resume_checkpoint(cfg, checkpoints)

    # ---- data ----
    train_file = read_jsonl(cfg.data)  # bad data fails here, before any model loads
    eval_file = read_jsonl(cfg.eval_data) if cfg.eval_data else None
    tokenizer = load_tokenizer(base_dir)
    train_examples, held_out = split_eval(train_file.examples, 0.0 if eval_file else cfg.eval_split, cfg.seed)
    train_encoded, train_stats = encode_examples(train_examples, tokenizer, cfg.max_length, train_file.path)
    eval_examples = eval_file.examples if eval_file else held_out
    eval_encoded, eval_stats = encode_examples(eval_examples, tokenizer, cfg.max_length,
                                               (eval_file or train_file).path) if eval_examples else ([], None)
    if cfg.packing:
        rows, pack_stats = pack(train_encoded, cfg.max_length)
    else:
        rows, pack_stats = unpacked(train_encoded), None
    say(f"data: train {train_stats.describe()}" + (f"; eval {eval_stats.describe()}" if eval_stats else "; no eval"))
    if pack_stats:
        say(f"packing: {pack_stats.examples} examples in {pack_stats.rows} rows of {cfg.max_length} "
            f"({pack_stats.fill:.0%} full)")

    # ---- model ----
    set_seed(cfg.seed)  # LoRA A matrices are drawn here
    model = add_lora(load_base(base_dir, cfg, runtime), cfg)
    running = speedups(model, cfg, runtime)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    chunked = ChunkedCausalLMLoss(model, fused=running["liger"]) \
        if cfg.chunked_loss and not cfg.fsdp and supports_chunked_loss(model) else None

    # ---- trainer ----
    has_eval = bool(eval_encoded)
    args = TrainingArguments(
        output_dir=str(checkpoints), seed=cfg.seed, data_seed=cfg.seed,
        per_device_train_batch_size=cfg.batch_size, per_device_eval_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.grad_accum, learning_rate=cfg.learning_rate,
        lr_scheduler_type=cfg.lr_scheduler, warmup_steps=cfg.warmup, weight_decay=cfg.weight_decay,
        max_grad_norm=cfg.max_grad_norm, num_train_epochs=cfg.epochs, max_steps=cfg.max_steps or -1,
        logging_steps=cfg.logging_steps, logging_first_step=True,
        eval_strategy="steps" if has_eval and cfg.eval_steps else "no", eval_steps=cfg.eval_steps or None,
        eval_on_start=has_eval and resume_from is None,
        save_strategy="steps" if cfg.save_steps else "no", save_steps=cfg.save_steps or 500,
        save_total_limit=cfg.save_total_limit,
        bf16=runtime.bf16, use_cpu=runtime.device == "cpu", optim=runtime.optim,
        train_sampling_strategy="group_by_length" if cfg.group_by_length and not cfg.packing else "random",
        label_names=["labels"], prediction_loss_only=True, remove_unused_columns=False,
        include_num_input_tokens_seen="no", ddp_find_unused_parameters=False, report_to=[],
        disable_tqdm=False)  # keeps Trainer's PrinterCallback out; its ProgressCallback is replaced below
    callbacks = [ProgressBar(cfg.progress)]
    if cfg.tensorboard and args.process_index == 0:
        callbacks.append(_tensorboard(logs_dir))
    trainer = LoraplexTrainer(
        model=model, args=args, train_dataset=RowDataset(rows),
        eval_dataset=RowDataset(unpacked(eval_encoded)) if has_eval else None,
        data_collator=Collator(tokenizer.pad_token_id, chunked_loss=chunked is not None,
                               varlen=running["attention"] == "varlen"),
        compute_loss_func=chunked, callbacks=callbacks)
    trainer.remove_callback(ProgressCallback)

    # ---- train ----
    say(f"training {'QLoRA (NF4)' if cfg.qlora else 'LoRA'} r={cfg.r} alpha={cfg.alpha} on {base_model_id(base_dir)}"
        f" ({runtime.device}, {'bf16' if runtime.bf16 else 'fp32'}, {args.world_size} process(es), {runtime.optim})"
        + (f", resuming from {resume_from}" if resume_from else ""))
    result = trainer.train(resume_from_checkpoint=resume_from)
    history = trainer.state.log_history
    if has_eval and not any(e.get("step") == trainer.state.global_step and "eval_loss" in e for e in history):
        trainer.evaluate()
    if chunked is not None:
        chunked.close()

    # ---- output ----
    summary = None
    if trainer.is_world_process_zero():
        out.mkdir(parents=True, exist_ok=True)
        unwrapped = trainer.accelerator.unwrap_model(trainer.model)
        unwrapped.peft_config["default"].base_model_name_or_path = base_model_id(base_dir)
    if cfg.fsdp:
        trainer.save_model(str(out))  # gathers the sharded adapter on every process
        (out / "training_args.bin").unlink(missing_ok=True)
    elif trainer.is_world_process_zero():
        unwrapped.save_pretrained(str(out), safe_serialization=True, save_embedding_layers=False)
    if trainer.is_world_process_zero():
        summary = _summary(cfg, runtime, args.world_size, base_dir, trainer, result, trainable,
                           train_file, eval_file, train_stats, eval_stats, pack_stats, started, running)
        (out / "train_summary.json").write_text(json.dumps(summary, indent=2))
        if checkpoints.is_dir() and not any(checkpoints.iterdir()):
            checkpoints.rmdir()  # Trainer makes its output_dir even when it saves no checkpoint
        write_card(out, summary)
        for line in summary_lines(summary):
            say(line)
    return TrainResult(out=out, summary=summary or {})


def _base_dir(base: str | None) -> Path:
    if base is None:
        from loraplex.server.model.embedded import embedded_model_dir

        return embedded_model_dir()
    path = Path(base)
    if not (path / "config.json").is_file():
        raise ModelLoadError(f"--base {base}: not an HF model folder (no config.json)")
    return path


def _resume_checkpoint(cfg: TrainConfig, checkpoints: Path) -> str | None:
    """The checkpoint to resume from; refuses to silently restart over an earlier run's checkpoints."""
    from transformers.trainer_utils import get_last_checkpoint

    existing = get_last_checkpoint(str(checkpoints)) if checkpoints.is_dir() else None
    if cfg.resume is None:
        if existing:
            raise ConfigError(f"{checkpoints} holds checkpoints of an earlier run: add --resume to continue it, "
                              "or choose another --out")
        return None
    if cfg.resume == "latest":
        if not existing:
            raise ConfigError(f"--resume: no checkpoint in {checkpoints}")
        return existing
    path = Path(cfg.resume)
    if not (path / "trainer_state.json").is_file():
        raise ConfigError(f"--resume {cfg.resume}: not a checkpoint folder (no trainer_state.json)")
    return str(path)


def _tensorboard(logs_dir: Path):
    from transformers.integrations import TensorBoardCallback

    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise ConfigError("TensorBoard logging needs the tensorboard package (pip install tensorboard), "
                          "or pass --no-tensorboard") from None
    callback = TensorBoardCallback(tb_writer=SummaryWriter(log_dir=str(logs_dir)))
    callback.logging_dir = str(logs_dir)  # where it reopens after train() closes it (the final evaluation)
    return callback


def _summary(cfg, runtime, world_size, base_dir, trainer, result, trainable, train_file, eval_file,
             train_stats, eval_stats, pack_stats, started, running) -> dict:
    import bitsandbytes
    import peft
    import torch
    import transformers

    from loraplex.server.hashing import file_sha256

    history = trainer.state.log_history
    losses = [(e["step"], e["loss"]) for e in history if "loss" in e]
    evals = [(e["step"], e["eval_loss"]) for e in history if "eval_loss" in e]
    base_config = json.loads((base_dir / "config.json").read_text())
    eval_before = evals[0][1] if evals and evals[0][0] == 0 else None
    eval_after = evals[-1][1] if evals else None
    seconds = result.metrics.get("train_runtime", 0.0)
    data = {"train": _data_entry(train_file, train_stats, held_out=False)}
    if eval_stats is not None:
        data["eval"] = _data_entry(eval_file or train_file, eval_stats, held_out=eval_file is None)
    if pack_stats is not None:
        data["packing"] = {"rows": pack_stats.rows, "row_length": pack_stats.row_length, "fill": pack_stats.fill}
    return {
        "name": Path(cfg.out).resolve().name, "out": str(cfg.out),
        "base": {"id": base_model_id(base_dir), "path": str(base_dir), "model_type": base_config.get("model_type"),
                 "num_layers": base_config.get("num_hidden_layers"), "hidden_size": base_config.get("hidden_size"),
                 "config_sha256": file_sha256(base_dir / "config.json"),
                 "weights_sha256": folder_weights_sha256(base_dir),
                 "quantization": "nf4" if cfg.qlora else "none", "dtype": "bf16" if runtime.bf16 else "fp32"},
        "data": data,
        "speedups": running,
        "hyperparameters": {**cfg.to_dict(), "optim": runtime.optim, "device": runtime.device,
                            "world_size": world_size,
                            "effective_batch": cfg.batch_size * cfg.grad_accum * world_size},
        "metrics": {
            "steps": trainer.state.global_step, "epochs": trainer.state.epoch,
            "train_loss_first": losses[0][1] if losses else None,
            "train_loss_last": losses[-1][1] if losses else None,
            "eval_loss_before": eval_before, "eval_loss_after": eval_after,
            "eval_perplexity_before": _perplexity(eval_before), "eval_perplexity_after": _perplexity(eval_after),
            "tokens": trainer.state.num_input_tokens_seen, "train_seconds": seconds,
            "tokens_per_second": trainer.state.num_input_tokens_seen / seconds if seconds else 0.0,
            "wall_seconds": time.monotonic() - started, "trainable_parameters": trainable},
        "loss_curve": losses, "eval_curve": evals,
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "peft": peft.__version__, "bitsandbytes": bitsandbytes.__version__},
    }


def _data_entry(data_file, stats, held_out: bool) -> dict:
    return {"path": data_file.path, "sha256": data_file.sha256, "form": data_file.form, "held_out": held_out,
            "examples": stats.kept, "tokens": stats.tokens, "trained_tokens": stats.trained_tokens,
            "truncated": stats.truncated, "dropped": stats.dropped, "longest": stats.longest}


def _perplexity(loss: float | None) -> float | None:
    return math.exp(min(loss, 50.0)) if loss is not None else None


def summary_lines(summary: dict) -> list[str]:
    """The end-of-run summary printed to the terminal."""
    m, out = summary["metrics"], Path(summary["out"])
    size = (out / "adapter_model.safetensors").stat().st_size
    lines = [f"done: {m['steps']} steps ({m['epochs']:.2f} epochs) in {m['train_seconds']:.1f} s, "
             f"{m['tokens']:,} tokens ({m['tokens_per_second']:,.0f} tokens/s)",
             f"train loss {_num(m['train_loss_first'])} -> {_num(m['train_loss_last'])}"]
    if m["eval_loss_after"] is not None:
        lines[-1] += (f"; eval loss {_num(m['eval_loss_before'])} -> {_num(m['eval_loss_after'])} (perplexity "
                      f"{_num(m['eval_perplexity_before'], 2)} -> {_num(m['eval_perplexity_after'], 2)})")
    lines.append(f"adapter: {out} (adapter_model.safetensors {size / 1e6:.2f} MB), model card {out / 'README.md'}")
    if (out / "logs").is_dir():
        lines.append(f"tensorboard --logdir {out / 'logs'}")
    return lines


def _num(value, digits: int = 4) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def clear_outputs(out: Path) -> None:
    """Remove what an earlier run left in `out` (adapter, card, summary, checkpoints, logs)."""
    for name in (*ADAPTER_FILES, "README.md", "train_summary.json"):
        (out / name).unlink(missing_ok=True)
    for name in ("checkpoints", "logs"):
        shutil.rmtree(out / name, ignore_errors=True)
