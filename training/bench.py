"""`loraplex bench train`: our QLoRA training beside plain PEFT + Trainer, same model, data and LoRA config.

Model: the shape of a config.json (default Llama-3.1-8B) with seeded random weights, decoder linears in
NF4 (double quant), built by server/bench/peft_baseline.build_hf_nf4_model: no checkpoint needed.
Data: seeded synthetic examples, lengths log-normal in [32, seq_len] (median ~seq_len/4), the first
30% of each a prompt (no loss). LoRA r16, alpha 32, all-linear, dropout 0.05, gradient checkpointing,
bf16, paged AdamW 8-bit on a GPU (plain AdamW on the CPU).

    baseline  prepare_model_for_kbit_training + get_peft_model + Trainer; batches of `batch_size`
              examples padded to the longest; the model's loss over full [batch, seq, vocab] logits
    loraplex  the same model through training/model.add_lora; examples packed into rows of seq_len
              (no attention across examples); loss in chunks over trained positions only

Measured over the steps after `warmup_steps`: real (non-padding) tokens per second and peak GPU memory.
JSON to benchmarks/results/train-<device>-<time>.json.
"""
from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import math
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .batching import Collator, RowDataset, pack, unpacked
from .encode import IGNORE, Encoded


@dataclass(frozen=True, slots=True)
class TrainBenchConfig:
    model: str = "benchmarks/shapes/llama-3.1-8b"
    """Folder with config.json (random weights in its shape)."""
    device: str = "cuda"
    seq_len: int = 1024
    batch_size: int = 4
    """Rows (ours: packed rows of seq_len; baseline: examples) per step."""
    baseline_batch_size: int | None = None
    """Examples per step for the baseline, when not batch_size: a packed row holds several examples, so
    about batch_size * seq_len / mean length gives both the same tokens per step."""
    steps: int = 20
    warmup_steps: int = 3
    num_examples: int = 512
    rank: int = 16
    alpha: float = 32.0
    seed: int = 0
    impls: tuple[str, ...] = ("loraplex", "peft")


def add_bench_train_parser(bench_subparsers) -> None:
    """`train` under `loraplex bench` (the lead wires it beside `serve`)."""
    d = TrainBenchConfig()  # slots=True: class attributes are descriptors, not the defaults
    p = bench_subparsers.add_parser("train", help="QLoRA training tokens/s and peak memory, ours beside PEFT+Trainer")
    p.add_argument("--model", default=d.model, help="folder with config.json (random weights)")
    p.add_argument("--device", default="cuda")
    p.add_argument("--seq-len", type=int, default=d.seq_len)
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--baseline-batch-size", type=int, default=None,
                   help="examples per step for PEFT + Trainer (default: --batch-size)")
    p.add_argument("--steps", type=int, default=d.steps, help="measured steps")
    p.add_argument("--warmup-steps", type=int, default=d.warmup_steps)
    p.add_argument("--num-examples", type=int, default=d.num_examples)
    p.add_argument("--rank", type=int, default=d.rank)
    p.add_argument("--impls", default="loraplex,peft", help="comma-separated: loraplex, peft")
    p.add_argument("--out", default="benchmarks/results", help="folder for the JSON")


def run_bench_train(args: argparse.Namespace, say=print) -> int:
    from loraplex.server.bench.cli import environment

    cfg = TrainBenchConfig(model=args.model, device=args.device, seq_len=args.seq_len, batch_size=args.batch_size,
                           baseline_batch_size=args.baseline_batch_size,
                           steps=args.steps, warmup_steps=args.warmup_steps, num_examples=args.num_examples,
                           rank=args.rank, impls=tuple(i for i in args.impls.split(",") if i))
    env = environment(cfg.device)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"train-{env['device_slug']}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    report = {"benchmark": "train", "config": dataclasses.asdict(cfg), "environment": env, "results": {},
              "complete": False}
    for impl in cfg.impls:
        report["results"][impl] = bench_one(cfg, impl)
        r = report["results"][impl]
        peak = f"{r['peak_memory_gb']:.2f} GB" if r["peak_memory_gb"] is not None else "-"
        say(f"{impl:9s}: {r['tokens_per_s']:10.1f} tok/s, peak {peak}, "
            f"{r['step_s']:.3f} s/step, {r['tokens_per_step']:.0f} real tokens/step, loss {r['loss_first']:.3f} -> "
            f"{r['loss_last']:.3f}")
        path.write_text(json.dumps(report, indent=2))
    results = report["results"]
    if "loraplex" in results and "peft" in results:
        ours, peft = results["loraplex"], results["peft"]
        report["ratios"] = {"tokens_per_s": ours["tokens_per_s"] / peft["tokens_per_s"],
                            "peak_memory": ours["peak_memory_gb"] / peft["peak_memory_gb"]
                            if ours["peak_memory_gb"] and peft["peak_memory_gb"] else None}
        memory = report["ratios"]["peak_memory"]
        say(f"loraplex / peft: x{report['ratios']['tokens_per_s']:.2f} tokens/s, "
            + (f"x{memory:.2f} peak memory" if memory is not None else "peak memory not measured (CPU)"))
    report["complete"] = True
    path.write_text(json.dumps(report, indent=2))
    say(f"wrote {path}")
    return 0


def synthetic_examples(num: int, seq_len: int, vocab_size: int, seed: int) -> list[Encoded]:
    """Seeded token examples: log-normal lengths in [32, seq_len], the first 30% untrained (prompt)."""
    gen = torch.Generator().manual_seed(seed)
    median = max(32, seq_len // 4)
    lengths = torch.exp(torch.randn(num, generator=gen) * 0.7 + math.log(median)).clamp(32, seq_len).long()
    examples = []
    for n in lengths.tolist():
        ids = torch.randint(3, vocab_size, (n,), generator=gen).tolist()
        prompt = int(n * 0.3)
        examples.append(Encoded(tuple(ids), (IGNORE,) * prompt + tuple(ids[prompt:])))
    return examples


class _Counting:
    """Wraps a collator; remembers the real tokens of each batch, in order."""

    def __init__(self, collate):
        self.collate, self.tokens = collate, []

    def __call__(self, rows):
        self.tokens.append(sum(len(r["input_ids"]) for r in rows))
        return self.collate(rows)


def _pad_collate(rows: list[dict]) -> dict:
    """Plain padding to the longest example (what DataCollatorForSeq2Seq does)."""
    width = max(len(r["input_ids"]) for r in rows)
    ids = torch.zeros((len(rows), width), dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for b, r in enumerate(rows):
        n = len(r["input_ids"])
        ids[b, :n], labels[b, :n], mask[b, :n] = torch.tensor(r["input_ids"]), torch.tensor(r["labels"]), 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def bench_one(cfg: TrainBenchConfig, impl: str) -> dict:
    """Train warmup_steps + steps on a fresh model; throughput and peak memory over the measured steps."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import Trainer, TrainerCallback, TrainingArguments
    from transformers.quantizers import AutoHfQuantizer

    from loraplex.server.bench.peft_baseline import build_hf_nf4_model

    from .config import TrainConfig
    from .loss import ChunkedCausalLMLoss
    from .model import add_lora
    from .trainer import LoraplexTrainer

    if impl not in ("loraplex", "peft"):
        raise ValueError(f"unknown impl {impl!r} (loraplex or peft)")
    cuda = cfg.device.startswith("cuda")
    dtype = torch.bfloat16 if cuda else torch.float32
    model_config = json.loads((Path(cfg.model) / "config.json").read_text())
    examples = synthetic_examples(cfg.num_examples, cfg.seq_len, int(model_config["vocab_size"]), cfg.seed)
    _reset_memory(cuda)
    model = build_hf_nf4_model(model_config, cfg.device, compute_dtype=dtype, seed=cfg.seed).train()
    model.config.use_cache = False
    # what from_pretrained(quantization_config=...) attaches; Trainer reads it to allow training on NF4
    model.hf_quantizer = AutoHfQuantizer.from_config(model.config.quantization_config)
    train_cfg = TrainConfig(data="(bench)", out="(bench)", qlora=True, r=cfg.rank, alpha=cfg.alpha, dropout=0.05,
                            gradient_checkpointing=True, packing=True, max_length=cfg.seq_len, seed=cfg.seed)
    if impl == "loraplex":
        model = add_lora(model, train_cfg)
        rows, _ = pack(examples, cfg.seq_len)
        loss = ChunkedCausalLMLoss(model)
        collator, trainer_class, extra = _Counting(Collator(0, chunked_loss=True)), LoraplexTrainer, \
            {"compute_loss_func": loss}
    else:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True,
                                                gradient_checkpointing_kwargs={"use_reentrant": False})
        model = get_peft_model(model, LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=0.05,
                                                 target_modules="all-linear", task_type="CAUSAL_LM"))
        rows, collator, trainer_class, extra = unpacked(examples), _Counting(_pad_collate), Trainer, {}
    batch_size = cfg.batch_size if impl == "loraplex" else cfg.baseline_batch_size or cfg.batch_size
    times: list[float] = []

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter())

    with tempfile.TemporaryDirectory() as tmp:
        args = TrainingArguments(
            output_dir=tmp, per_device_train_batch_size=batch_size, max_steps=cfg.warmup_steps + cfg.steps,
            learning_rate=2e-4, bf16=cuda, use_cpu=not cuda, optim="paged_adamw_8bit" if cuda else "adamw_torch",
            logging_steps=1, save_strategy="no", report_to=[], disable_tqdm=True, remove_unused_columns=False,
            label_names=["labels"], seed=cfg.seed, dataloader_drop_last=True)
        trainer = trainer_class(model=model, args=args, train_dataset=RowDataset(rows), data_collator=collator,
                                callbacks=[Clock()], **extra)
        start = time.perf_counter()
        trainer.train()
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    measured = slice(cfg.warmup_steps, cfg.warmup_steps + cfg.steps)
    step_times = [b - a for a, b in zip([start, *times[:-1]], times)][measured]
    tokens = collator.tokens[measured]
    result = {
        "impl": impl, "steps_measured": len(step_times), "tokens_per_s": sum(tokens) / sum(step_times),
        "step_s": sum(step_times) / len(step_times), "tokens_per_step": sum(tokens) / len(tokens),
        "peak_memory_gb": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,  # CPU: not measured
        "loss_first": losses[0], "loss_last": losses[-1], "rows": len(rows), "batch_size": batch_size}
    del trainer, model
    _reset_memory(cuda)
    return result


def _reset_memory(cuda: bool) -> None:
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
