"""The model to train: the base (fp32 / bf16, or NF4 for QLoRA) with fresh LoRA layers from PEFT."""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from loraplex.server.errors import ConfigError, ModelLoadError

from .config import ALL_LINEAR, TrainConfig

log = logging.getLogger(__name__)
SERVABLE_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
"""What loraplex serves (server/model/arch.py LINEAR_MODULES)."""


@dataclass(frozen=True, slots=True)
class Runtime:
    """Where and how this run computes, resolved from the config and the machine."""

    device: str
    """cpu or cuda."""
    bf16: bool
    optim: str


def resolve_runtime(cfg: TrainConfig) -> Runtime:
    cuda = torch.cuda.is_available() and cfg.device != "cpu"
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device='cuda' but no CUDA device is visible")
    if cfg.precision == "bf16" and not (cuda and torch.cuda.is_bf16_supported()):
        raise ConfigError("precision='bf16' needs a GPU with bf16 support")
    bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and cuda and torch.cuda.is_bf16_supported())
    optim = cfg.optim
    if optim == "auto":
        optim = ("paged_adamw_8bit" if cfg.qlora else "adamw_torch_fused") if cuda else "adamw_torch"
    if not cuda and ("8bit" in optim or "paged" in optim):
        raise ConfigError(f"optim={optim!r} needs a GPU (bitsandbytes optimizers); use adamw_torch on the CPU")
    return Runtime(device="cuda" if cuda else "cpu", bf16=bf16, optim=optim)


def base_model_id(base_dir: Path) -> str:
    """The name a base calls itself in config.json (_name_or_path), else its folder."""
    try:
        name = json.loads((base_dir / "config.json").read_text()).get("_name_or_path")
    except (OSError, ValueError):
        name = None
    return name if name and not Path(name).is_absolute() else str(base_dir)


def load_tokenizer(base_dir: Path):
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(base_dir))
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"{base_dir}: cannot load the tokenizer ({exc})") from None
    if tokenizer.pad_token_id is None:  # padding is masked out of attention and loss; any id works
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_base(base_dir: Path, cfg: TrainConfig, runtime: Runtime):
    """The base for training: frozen, in bf16 / fp32, or NF4 with double quantization (QLoRA)."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    dtype = torch.bfloat16 if runtime.bf16 else torch.float32
    kwargs = dict(dtype=dtype, attn_implementation="sdpa")
    if cfg.qlora:
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype,
            # FSDP shards flat tensors of one dtype: store the packed 4-bit weights as bf16 (QLoRA + FSDP recipe)
            bnb_4bit_quant_storage=torch.bfloat16 if cfg.fsdp else torch.uint8)
        if not cfg.fsdp:
            kwargs["device_map"] = {"": _local_device(runtime)}
    try:
        model = AutoModelForCausalLM.from_pretrained(str(base_dir), **kwargs)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"{base_dir}: cannot load the base model ({exc})") from None
    model.config.use_cache = False  # training: no KV cache (it would also hide packed-sequence boundaries)
    if cfg.qlora and runtime.device == "cpu":
        _keep_nf4_trainable_on_cpu(model)
    return model


def _keep_nf4_trainable_on_cpu(model) -> None:
    """bitsandbytes (0.50) repacks an NF4 weight into an inference-only CPU layout the first time the layer
    runs in eval mode without grad (an AVX512-bf16 fast path), and training through it afterwards silently
    yields no gradients: evaluating before training would freeze the run. Keep every layer off that path."""
    import bitsandbytes as bnb

    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False


def _local_device(runtime: Runtime) -> str:
    if runtime.device != "cuda":
        return "cpu"
    from accelerate import PartialState

    return f"cuda:{PartialState().local_process_index}"


def add_lora(model, cfg: TrainConfig):
    """PEFT LoRA on the chosen projections; QLoRA first prepares the NF4 model (fp32 norms, input grads)."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    if cfg.qlora:
        frozen_tables = _frozen_tables(model)
        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=cfg.gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False})
        # it upcasts every weight that is not 4-bit to fp32; the norms keep that (QLoRA's recipe), but the frozen
        # embedding and lm_head only cost memory in fp32 (8B: +4 GB) and get cast back to bf16 in every matmul
        for weight, dtype in frozen_tables:
            weight.data = weight.data.to(dtype)
    elif cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()  # frozen embeddings: checkpointed blocks still need a grad path
    targets = ALL_LINEAR if cfg.all_linear else list(cfg.target_modules)
    check_targets(model, cfg.target_modules)
    config = LoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=targets,
                        use_rslora=cfg.rslora, bias="none", task_type="CAUSAL_LM")
    return get_peft_model(model, config)


def _frozen_tables(model) -> list[tuple[torch.nn.Parameter, torch.dtype]]:
    """The input embedding and lm_head weights with their dtypes (one entry when tied)."""
    tables = {}
    for module in (model.get_input_embeddings(), model.get_output_embeddings()):
        if module is not None and not type(module.weight).__name__ == "Params4bit":
            tables[id(module.weight)] = (module.weight, module.weight.dtype)
    return list(tables.values())


def check_targets(model, targets: tuple[str, ...]) -> None:
    """Every named target exists in the model; warn about targets loraplex cannot serve."""
    if targets == (ALL_LINEAR,):
        return
    names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    missing = [t for t in targets if t.rsplit(".", 1)[-1] not in names]
    if missing:
        linear = sorted({name.rsplit(".", 1)[-1] for name, module in model.named_modules()
                         if "Linear" in type(module).__name__})
        raise ConfigError(f"target_modules {missing} are not in the model (its linear layers: {', '.join(linear)})")
    unservable = [t for t in targets if t.rsplit(".", 1)[-1] not in SERVABLE_MODULES]
    if unservable:
        log.warning("target_modules %s: loraplex serve only applies adapters to %s", unservable,
                    ", ".join(SERVABLE_MODULES))


def decoder_layers(model) -> list:
    """The decoder blocks of a (PEFT-wrapped) causal LM."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return list(base.model.layers)


def limit_checkpointing(model, layers: int) -> int:
    """Recompute in backward only the first `layers` decoder blocks (after gradient_checkpointing_enable);
    the rest keep their activations. Early blocks are the ones whose activations live longest. Returns how
    many blocks are checkpointed."""
    blocks = decoder_layers(model)
    for i, block in enumerate(blocks):
        block.gradient_checkpointing = block.gradient_checkpointing and i < layers
    return sum(bool(block.gradient_checkpointing) for block in blocks)


def speedups(model, cfg: TrainConfig, runtime: Runtime) -> dict:
    """Apply the configured speed-ups to a model with LoRA; returns what runs (for the summary and the bench)."""
    from .attention import resolve_attention, use_varlen
    from .kernels import apply_liger, resolve_liger

    cuda = runtime.device == "cuda"
    attention = resolve_attention(cfg.attention, cuda, cfg.packing)
    if attention == "varlen":
        use_varlen(model)
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    liger = resolve_liger(cfg.liger, cuda, base.config.model_type)
    if liger:
        apply_liger(model)
    if runtime.bf16:
        keep_lora_inputs_in_compute_dtype(model)
    checkpointed = 0
    if cfg.gradient_checkpointing:
        blocks = len(decoder_layers(model))
        checkpointed = limit_checkpointing(model, blocks if cfg.checkpoint_layers is None else cfg.checkpoint_layers)
    return {"attention": attention, "liger": liger, "checkpointed_layers": checkpointed,
            "lora_inputs": "bf16 (autocast)" if runtime.bf16 else "as computed"}


def keep_lora_inputs_in_compute_dtype(model) -> int:
    """PEFT casts each LoRA layer's input to its weights' dtype: fp32 LoRA weights (kept for exact small updates)
    then turn every [tokens, hidden] activation into an fp32 copy, 7 projections x every layer, forward and
    recompute. Under bf16 autocast the matmul runs in bf16 anyway, so the copy only costs time and memory: keep the
    input as it comes. Returns how many LoRA layers were switched."""
    switched = 0
    for module in model.modules():
        if hasattr(module, "cast_input_dtype_enabled"):
            module.cast_input_dtype_enabled = False
            switched += 1
    return switched
