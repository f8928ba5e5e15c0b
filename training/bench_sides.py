"""The sides of `loraplex bench train`, each training a fresh copy of the same NF4 model on the same examples.

    loraplex  training/model.add_lora + our packed rows (or one full row per example), loraplex_varlen
              attention (or sdpa), Liger ops and fused linear + CE in our loss when on, checkpointing of
              the first N layers (default all)
    trl       PEFT + TRL SFTTrainer as its docs tune it: the quantized model and a LoraConfig handed to
              SFTTrainer; packed: packing=True, packing_strategy="bfd" (padding-free: each batch flattened to
              one row, position_ids and cu_seq_lens); full rows: plain batches (no padding to remove);
              attention sdpa or flex_attention; use_liger_kernel when asked; its own fused LM-head loss
    peft      the old baseline, kept for continuity: PEFT + transformers Trainer, examples padded to the
              longest of each batch, the model's full-logits loss

Every side: r / alpha / all-linear / dropout 0.05, gradient checkpointing (non-reentrant), bf16 and paged AdamW
8-bit on a GPU (fp32 and AdamW on the CPU), lr 2e-4. Timing: wall clock between optimizer-step ends (synced).
"""
from __future__ import annotations

import gc
import tempfile
import time
from dataclasses import dataclass

import torch

from .batching import Collator, RowDataset, pack, unpacked
from .encode import IGNORE, Encoded

SIDES = ("loraplex", "trl", "peft")


@dataclass(frozen=True, slots=True)
class Side:
    """One run: which implementation, on which data layout, with which levers."""

    impl: str
    case: str
    """packed (examples of mixed lengths) or full (every example exactly seq_len tokens)."""
    batch_size: int
    attention: str = "auto"
    """ours: auto / sdpa / varlen; trl: sdpa / flex_attention."""
    liger: str = "auto"
    """ours: auto / on / off; trl: on / off (its use_liger_kernel: RMSNorm, SwiGLU, RoPE)."""
    checkpoint_layers: int | None = None


class Counting:
    """Wraps a collator; remembers the real (non-padding) tokens of each batch, in order."""

    def __init__(self, collate):
        self.collate, self.tokens = collate, []

    def __call__(self, rows):
        self.tokens.append(sum(len(r["input_ids"]) for r in rows))
        return self.collate(rows)


def pad_collate(rows: list[dict]) -> dict:
    """Plain padding to the longest example (what DataCollatorForSeq2Seq does)."""
    width = max(len(r["input_ids"]) for r in rows)
    ids = torch.zeros((len(rows), width), dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for b, r in enumerate(rows):
        n = len(r["input_ids"])
        ids[b, :n], labels[b, :n], mask[b, :n] = torch.tensor(r["input_ids"]), torch.tensor(r["labels"]), 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def run_side(side: Side, bench, model_config: dict, examples: list[Encoded]) -> dict:
    """Train warmup_steps + steps on a fresh model; throughput and peak memory over the measured steps."""
    from transformers import TrainerCallback
    from transformers.quantizers import AutoHfQuantizer

    from loraplex.server.bench.peft_baseline import build_hf_nf4_model

    from .kernels import restored_modeling_modules

    if side.impl not in SIDES:
        raise ValueError(f"unknown impl {side.impl!r} ({', '.join(SIDES)})")
    cuda = bench.device.startswith("cuda")
    dtype = torch.bfloat16 if cuda else torch.float32
    _reset_memory(cuda)
    times: list[float] = []

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter())

    with restored_modeling_modules(), tempfile.TemporaryDirectory() as tmp:
        model = build_hf_nf4_model(model_config, bench.device, compute_dtype=dtype, seed=bench.seed).train()
        model.config.use_cache = False
        # what from_pretrained(quantization_config=...) attaches; Trainer reads it to allow training on NF4
        model.hf_quantizer = AutoHfQuantizer.from_config(model.config.quantization_config)
        build = {"loraplex": _ours, "trl": _trl, "peft": _peft}[side.impl]
        trainer, counting, ran = build(side, bench, model, examples, cuda, tmp, [Clock()])
        start = time.perf_counter()
        trainer.train()
        losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
        rows = len(trainer.train_dataset)
        del trainer, model
    measured = slice(bench.warmup_steps, bench.warmup_steps + bench.steps)
    step_times = [b - a for a, b in zip([start, *times[:-1]], times)][measured]
    tokens = counting.tokens[measured]
    result = {
        "impl": side.impl, "case": side.case, "steps_measured": len(step_times),
        "tokens_per_s": sum(tokens) / sum(step_times), "step_s": sum(step_times) / len(step_times),
        "tokens_per_step": sum(tokens) / len(tokens),
        "peak_memory_gb": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,  # CPU: not measured
        "loss_first": losses[0], "loss_last": losses[-1], "rows": rows, "batch_size": side.batch_size, "ran": ran}
    _reset_memory(cuda)
    return result


def _common_args(bench, side: Side, cuda: bool, tmp: str) -> dict:
    return dict(output_dir=tmp, per_device_train_batch_size=side.batch_size,
                max_steps=bench.warmup_steps + bench.steps, learning_rate=2e-4, bf16=cuda, use_cpu=not cuda,
                optim="paged_adamw_8bit" if cuda else "adamw_torch", logging_steps=1, save_strategy="no",
                report_to=[], disable_tqdm=True, seed=bench.seed, dataloader_drop_last=True)


def _lora_kwargs(bench) -> dict:
    return dict(r=bench.rank, lora_alpha=bench.alpha, lora_dropout=0.05, target_modules="all-linear",
                task_type="CAUSAL_LM")


def _ours(side: Side, bench, model, examples, cuda, tmp, callbacks):
    from transformers import TrainingArguments

    from .config import TrainConfig
    from .loss import ChunkedCausalLMLoss
    from .model import Runtime, add_lora, speedups
    from .trainer import LoraplexTrainer

    cfg = TrainConfig(data="(bench)", out="(bench)", qlora=True, r=bench.rank, alpha=bench.alpha, dropout=0.05,
                      gradient_checkpointing=True, packing=True, max_length=bench.seq_len, seed=bench.seed,
                      attention=side.attention, liger=side.liger, checkpoint_layers=side.checkpoint_layers)
    model = add_lora(model, cfg)
    running = speedups(model, cfg, Runtime(device="cuda" if cuda else "cpu", bf16=cuda, optim=""))
    rows, _ = pack(examples, bench.seq_len)
    counting = Counting(Collator(0, chunked_loss=True, varlen=running["attention"] == "varlen"))
    args = TrainingArguments(**_common_args(bench, side, cuda, tmp), remove_unused_columns=False,
                             label_names=["labels"])
    trainer = LoraplexTrainer(model=model, args=args, train_dataset=RowDataset(rows), data_collator=counting,
                              callbacks=callbacks,
                              compute_loss_func=ChunkedCausalLMLoss(model, fused=running["liger"]))
    ran = {"rows": f"our best-fit-decreasing packing into rows of {bench.seq_len}, position_ids restart per example",
           "attention": "loraplex_varlen (FlashAttention varlen, torch.nn.attention.varlen)"
           if running["attention"] == "varlen" else "sdpa (block-diagonal mask from position_ids when packed)",
           "liger": "RMSNorm, SwiGLU, RoPE + fused linear cross-entropy" if running["liger"] else "off",
           "loss": "Liger fused linear + CE over trained positions" if running["liger"]
           else "chunked CE over trained positions (training/loss.py)",
           "checkpointed_layers": running["checkpointed_layers"],
           "qlora_prep": "prepare_model_for_kbit_training (fp32 norms; embedding and lm_head kept bf16)",
           "lora_dtype": "fp32 (PEFT default), inputs not upcast (bf16 under autocast)" if cuda else "fp32"}
    return trainer, counting, ran


def _trl(side: Side, bench, model, examples, cuda, tmp, callbacks):
    from datasets import Dataset
    from peft import LoraConfig
    from trl import SFTConfig, SFTTrainer

    packed = side.case == "packed"
    attention = "sdpa" if side.attention == "auto" else side.attention
    if attention not in ("sdpa", "flex_attention", "eager"):
        raise ValueError(f"trl attention {attention!r}: sdpa, flex_attention or eager (no flash-attn package here)")
    model.set_attn_implementation(attention)
    liger = side.liger == "on"
    data = Dataset.from_dict({"input_ids": [list(e.input_ids) for e in examples],
                              "labels": [list(e.labels) for e in examples]})
    args = SFTConfig(**_common_args(bench, side, cuda, tmp), max_length=bench.seq_len, packing=packed,
                     packing_strategy="bfd", padding_free=packed, gradient_checkpointing=True,
                     gradient_checkpointing_kwargs={"use_reentrant": False}, use_liger_kernel=liger,
                     dataset_num_proc=None)
    trainer = SFTTrainer(model=model, args=args, train_dataset=data, peft_config=LoraConfig(**_lora_kwargs(bench)),
                         processing_class=_ids_tokenizer(), callbacks=callbacks)
    counting = Counting(trainer.data_collator)
    trainer.data_collator = counting  # read when train() builds the dataloader
    ran = {"rows": f"TRL packing_strategy='bfd' into rows of {bench.seq_len}, padding_free (batch flattened to one "
                   "row, position_ids + cu_seq_lens)" if packed else "plain batches of full rows (nothing to pad)",
           "attention": attention, "liger": "RMSNorm, SwiGLU, RoPE (use_liger_kernel)" if liger else "off",
           "loss": "TRL's fused LM head (chunked log-probs over all positions)",
           "checkpointed_layers": "all", "qlora_prep": "SFTTrainer's own (LoRA weights cast to bf16)",
           "lora_dtype": "bf16 (TRL casts LoRA on quantized models)"}
    return trainer, counting, ran


def _ids_tokenizer():
    """A tokenizer with only <pad> (id 0) and <eos>: the bench data is token ids already, SFTTrainer only reads
    the pad token (the shape folders hold no tokenizer)."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer(WordLevel({"<pad>": 0, "<eos>": 1}, unk_token="<pad>")),
                                   pad_token="<pad>", eos_token="<eos>")


def _peft(side: Side, bench, model, examples, cuda, tmp, callbacks):
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import Trainer, TrainingArguments

    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True,
                                            gradient_checkpointing_kwargs={"use_reentrant": False})
    model = get_peft_model(model, LoraConfig(**_lora_kwargs(bench)))
    counting = Counting(pad_collate)
    args = TrainingArguments(**_common_args(bench, side, cuda, tmp), remove_unused_columns=False,
                             label_names=["labels"])
    trainer = Trainer(model=model, args=args, train_dataset=RowDataset(unpacked(examples)), data_collator=counting,
                      callbacks=callbacks)
    ran = {"rows": "one example per row, padded to the longest of the batch (old baseline)", "attention": "sdpa",
           "liger": "off", "loss": "the model's loss over full logits", "checkpointed_layers": "all",
           "qlora_prep": "prepare_model_for_kbit_training", "lora_dtype": "fp32 (PEFT default)"}
    return trainer, counting, ran


def _reset_memory(cuda: bool) -> None:
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
