"""Training configuration: one frozen dataclass, every field with a default, validated on construction."""
from __future__ import annotations

import re
from dataclasses import asdict, dataclass, fields

from loraplex.server.errors import ConfigError

PRECISIONS = ("auto", "bf16", "fp32")
DEVICES = ("auto", "cpu", "cuda")
OPTIMIZERS = ("auto", "adamw_torch", "adamw_torch_fused", "paged_adamw_8bit", "adamw_8bit", "paged_adamw_32bit")
SCHEDULERS = ("cosine", "linear", "constant", "constant_with_warmup")
ALL_LINEAR = "all-linear"
ATTENTIONS = ("auto", "sdpa", "varlen")
LIGER_SETTINGS = ("auto", "on", "off")
_MODULE_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.]*")


@dataclass(frozen=True, slots=True)
class TrainConfig:
    """One `loraplex train` run. Paths are strings so the config prints and serializes as given."""

    data: str = ""
    """Training JSONL (chat `messages`, `instruction`/`input`/`output`, `prompt`/`completion` or `text`)."""
    out: str = ""
    """Output folder: the PEFT adapter, README.md (model card), train_summary.json, checkpoints/, logs/."""
    eval_data: str | None = None
    """Evaluation JSONL; None = hold out `eval_split` of `data`."""
    base: str | None = None
    """HF model folder; None = the embedded SmolLM2-135M-Instruct."""

    qlora: bool = False
    """Quantize the base to NF4 (double quantization) and train LoRA on top (QLoRA)."""
    r: int = 16
    """LoRA rank."""
    alpha: float = 32.0
    """LoRA alpha: the update is scaled by alpha / r (alpha / sqrt(r) with rslora)."""
    dropout: float = 0.05
    """Dropout on the LoRA input."""
    target_modules: tuple[str, ...] = (ALL_LINEAR,)
    """("all-linear",) or module names such as ("q_proj", "v_proj")."""
    rslora: bool = False
    """Rank-stabilized LoRA: scale alpha / sqrt(r)."""

    learning_rate: float = 2e-4
    lr_scheduler: str = "cosine"
    warmup: float = 0.03
    """Warmup: a fraction of the steps when < 1, else a number of steps."""
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    epochs: float = 3.0
    max_steps: int = 0
    """Optimizer steps; > 0 overrides epochs."""
    batch_size: int = 4
    """Rows per device per micro-step (with packing, a row holds several examples)."""
    grad_accum: int = 1
    """Micro-steps per optimizer step."""
    max_length: int = 1024
    """Tokens per example (longer ones are cut at the end, and counted); the row length when packing."""
    packing: bool = False
    """Pack several examples into each row; attention never crosses examples (positions restart per example)."""
    group_by_length: bool = False
    """Batch examples of similar length together (less padding; ignored with packing)."""
    gradient_checkpointing: bool = False
    """Recompute activations in backward: less memory, ~30% more time."""
    checkpoint_layers: int | None = None
    """With gradient_checkpointing: recompute only the first N decoder layers (None: all). Each layer left out
    keeps its activations: faster backward, more memory (training/model.py limit_checkpointing)."""
    chunked_loss: bool = True
    """Cross-entropy only on the trained positions, in chunks, without materializing [batch, seq, vocab] logits."""
    attention: str = "auto"
    """sdpa, varlen (packed rows without a dense mask: training/attention.py), or auto (varlen for packed rows
    on a GPU whose PyTorch has FlashAttention varlen, else sdpa)."""
    liger: str = "auto"
    """Liger Kernel (RMSNorm, SwiGLU, RoPE, fused linear + cross-entropy): on, off, or auto (on with CUDA,
    Triton and liger-kernel installed)."""

    eval_split: float = 0.1
    """Fraction of `data` held out for evaluation when there is no `eval_data` (0: no evaluation)."""
    eval_steps: int = 0
    """Evaluate every N steps as well as before and after training (0: before and after only)."""
    logging_steps: int = 10
    save_steps: int = 100
    """Checkpoint every N steps into out/checkpoints (0: none)."""
    save_total_limit: int = 2
    """Checkpoints kept (oldest deleted first)."""
    resume: str | None = None
    """'latest' (newest checkpoint in out/checkpoints) or a checkpoint folder."""
    seed: int = 0
    """Seeds LoRA init, data order, dropout and the eval split."""

    precision: str = "auto"
    """auto: bf16 on a GPU that supports it, else fp32; or bf16 / fp32."""
    device: str = "auto"
    optim: str = "auto"
    """auto: paged_adamw_8bit for QLoRA on a GPU, adamw_torch_fused on a GPU, else adamw_torch."""
    fsdp: bool = False
    """The run is sharded with FSDP (set by `--fsdp`); QLoRA then stores NF4 weights as bf16 so FSDP can shard them."""
    tensorboard: bool = True
    progress: bool = True
    """Show the progress bar (main process only)."""

    def __post_init__(self):
        problems = []
        if not self.data:
            problems.append("data: a training JSONL file is required")
        if not self.out:
            problems.append("out: an output folder is required")
        if not 1 <= self.r <= 1024:
            problems.append(f"r={self.r} (1..1024)")
        if not self.alpha > 0:
            problems.append(f"alpha={self.alpha} (> 0)")
        if not 0.0 <= self.dropout < 1.0:
            problems.append(f"dropout={self.dropout} (0 <= dropout < 1)")
        problems += _target_problems(self.target_modules)
        if not self.learning_rate > 0:
            problems.append(f"learning_rate={self.learning_rate} (> 0)")
        if self.lr_scheduler not in SCHEDULERS:
            problems.append(f"lr_scheduler={self.lr_scheduler!r} (choose from {', '.join(SCHEDULERS)})")
        if self.warmup < 0:
            problems.append(f"warmup={self.warmup} (>= 0)")
        if self.weight_decay < 0:
            problems.append(f"weight_decay={self.weight_decay} (>= 0)")
        if not self.max_grad_norm > 0:
            problems.append(f"max_grad_norm={self.max_grad_norm} (> 0)")
        if self.max_steps < 0:
            problems.append(f"max_steps={self.max_steps} (>= 0)")
        if self.max_steps == 0 and not self.epochs > 0:
            problems.append(f"epochs={self.epochs} (> 0, or set max_steps)")
        for name in ("batch_size", "grad_accum", "logging_steps", "save_total_limit"):
            if getattr(self, name) < 1:
                problems.append(f"{name}={getattr(self, name)} (>= 1)")
        if not 8 <= self.max_length <= 1 << 20:
            problems.append(f"max_length={self.max_length} (8..{1 << 20})")
        if not 0.0 <= self.eval_split < 1.0:
            problems.append(f"eval_split={self.eval_split} (0 <= eval_split < 1)")
        for name in ("eval_steps", "save_steps"):
            if getattr(self, name) < 0:
                problems.append(f"{name}={getattr(self, name)} (>= 0)")
        if self.precision not in PRECISIONS:
            problems.append(f"precision={self.precision!r} (choose from {', '.join(PRECISIONS)})")
        if self.checkpoint_layers is not None and self.checkpoint_layers < 0:
            problems.append(f"checkpoint_layers={self.checkpoint_layers} (>= 0, or None for all)")
        if self.attention not in ATTENTIONS:
            problems.append(f"attention={self.attention!r} (choose from {', '.join(ATTENTIONS)})")
        if self.liger not in LIGER_SETTINGS:
            problems.append(f"liger={self.liger!r} (choose from {', '.join(LIGER_SETTINGS)})")
        if self.device == "cpu" and self.liger == "on":
            problems.append("liger='on' needs a GPU (Triton kernels)")
        if self.device not in DEVICES:
            problems.append(f"device={self.device!r} (choose from {', '.join(DEVICES)})")
        if self.optim not in OPTIMIZERS:
            problems.append(f"optim={self.optim!r} (choose from {', '.join(OPTIMIZERS)})")
        if self.device == "cpu" and self.precision == "bf16":
            problems.append("precision='bf16' needs a GPU (the CPU trains in fp32)")
        if self.device == "cpu" and ("8bit" in self.optim or "paged" in self.optim):
            problems.append(f"optim={self.optim!r} needs a GPU (bitsandbytes optimizers); use adamw_torch")
        if problems:
            raise ConfigError("invalid train config: " + "; ".join(problems))

    @property
    def all_linear(self) -> bool:
        return self.target_modules == (ALL_LINEAR,)

    def to_dict(self) -> dict:
        out = asdict(self)
        out["target_modules"] = list(self.target_modules)
        return out

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls))


def _target_problems(targets: tuple[str, ...]) -> list[str]:
    if not isinstance(targets, tuple) or not targets:
        return [f"target_modules={targets!r} (a non-empty tuple of module names, or ('all-linear',))"]
    if ALL_LINEAR in targets and len(targets) > 1:
        return [f"target_modules={list(targets)}: 'all-linear' cannot be combined with names"]
    bad = [t for t in targets if t != ALL_LINEAR and not (isinstance(t, str) and _MODULE_NAME.fullmatch(t))]
    if bad:
        return [f"target_modules: {bad} are not module names (letters, digits, '_' and '.')"]
    if len(set(targets)) != len(targets):
        return [f"target_modules={list(targets)} has duplicates"]
    return []


def parse_target_modules(text: str) -> tuple[str, ...]:
    """'all-linear' or 'q_proj,v_proj' -> a tuple for TrainConfig."""
    return tuple(t.strip() for t in text.split(",") if t.strip())
