"""The baseline `loraplex bench` compares against: HF `generate` + PEFT mixed-adapter batches on NF4.

Everything is random and seeded, in the shape of a real config (no checkpoint on disk): the base is
`LlamaForCausalLM` with Linear/Embedding weights ~ N(0, 0.02²) and RMSNorms = 1, whose decoder
nn.Linear layers are `bnb.nn.Linear4bit` (NF4, double quant, `compute_dtype`) and lm_head dense -
the modules `from_pretrained(..., quantization_config=BitsAndBytesConfig(load_in_4bit=True,
bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=bf16))` builds.
Adapters "a0".."a{n-1}" are PEFT LoRA adapters with non-zero A and B; rows pick theirs through
`generate(..., adapter_names=[...])`, PEFT's mixed-batch path (one sub-batch per distinct adapter).
"""
from __future__ import annotations

import contextlib
import copy
import gc
import json
import math
import platform
import time
from pathlib import Path

import torch
from torch import nn

MODES = ("base", "shared", "distinct")
QUANTIZATIONS = ("nf4", "none")
BASE_ADAPTER = "__base__"  # PEFT's adapter_names entry for "this row runs the base model only"
INIT_STD = 0.02
LLAMA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _randn(shape, std: float, generator: torch.Generator, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    return torch.randn(shape, generator=generator, device=device, dtype=dtype).mul_(std)


def _nf4_linear(weight: torch.Tensor, bias: bool, compute_dtype: torch.dtype) -> nn.Module:
    """bnb Linear4bit holding `weight` [out, in] quantized on its device, as transformers' bnb quantizer builds it."""
    import bitsandbytes as bnb

    out_features, in_features = weight.shape
    layer = bnb.nn.Linear4bit(in_features, out_features, bias=bias, compute_dtype=compute_dtype,
                              compress_statistics=True, quant_type="nf4", quant_storage=torch.uint8, device="meta")
    # Params4bit.to(device) quantizes (and records quant_state on the module) when not yet quantized.
    layer.weight = bnb.nn.Params4bit(weight, requires_grad=False, compress_statistics=True, quant_type="nf4",
                                     quant_storage=torch.uint8, module=layer).to(weight.device)
    if bias:
        layer.bias = nn.Parameter(torch.zeros(out_features, device=weight.device, dtype=compute_dtype),
                                  requires_grad=False)
    return layer


def build_hf_nf4_model(config: dict, device: str | torch.device, compute_dtype: torch.dtype = torch.bfloat16,
                       seed: int = 0, quantization: str = "nf4") -> nn.Module:
    """Seeded random HF `LlamaForCausalLM` from a config.json dict, in eval mode on `device`.

    Parameters start on the meta device (buffers such as rotary inv_freq are computed for real); each
    weight is then drawn on `device` in `compute_dtype` and, for "nf4", every Linear but lm_head is
    quantized at once, so peak memory is the 4-bit model plus one dense matrix (8B: ~6 GB, not 16).
    quantization="none" keeps plain nn.Linear (e.g. fp32 on CPU for exact comparisons)."""
    if quantization not in QUANTIZATIONS:
        raise ValueError(f"quantization must be one of {QUANTIZATIONS}, got {quantization!r}")
    from accelerate import init_empty_weights
    from transformers import LlamaConfig, LlamaForCausalLM

    device = torch.device(device)
    hf_config = LlamaConfig.from_dict(dict(config))
    hf_config._attn_implementation = "sdpa"  # from_pretrained's default for Llama; pinned so versions agree
    with init_empty_weights(include_buffers=False):
        model = LlamaForCausalLM(hf_config)
    generator = torch.Generator(device=device).manual_seed(seed)
    lm_head = model.get_output_embeddings()
    tied = bool(getattr(hf_config, "tie_word_embeddings", False))
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.Linear):
            if module is lm_head and tied:
                continue
            weight = _randn(module.weight.shape, INIT_STD, generator, device, compute_dtype)
            if quantization == "nf4" and module is not lm_head:
                parent_name, _, child_name = name.rpartition(".")
                setattr(model.get_submodule(parent_name), child_name,
                        _nf4_linear(weight, module.bias is not None, compute_dtype))
                del weight  # free the dense copy before drawing the next layer
                continue
            module.weight = nn.Parameter(weight, requires_grad=False)
            if module.bias is not None:
                module.bias = nn.Parameter(torch.zeros_like(module.bias, device=device, dtype=compute_dtype),
                                           requires_grad=False)
        elif isinstance(module, nn.Embedding):
            weight = _randn(module.weight.shape, INIT_STD, generator, device, compute_dtype)
            if module.padding_idx is not None:
                weight[module.padding_idx].zero_()  # as HF's _init_weights does
            module.weight = nn.Parameter(weight, requires_grad=False)
        else:
            for param_name, param in list(module.named_parameters(recurse=False)):
                assert param_name == "weight" and param.dim() == 1, f"unexpected parameter {name}.{param_name}"
                setattr(module, param_name, nn.Parameter(  # RMSNorm scale
                    torch.ones(param.shape, device=device, dtype=compute_dtype), requires_grad=False))
        for buffer_name, buffer in module.named_buffers(recurse=False):
            module._buffers[buffer_name] = buffer.to(device)
    if tied:
        lm_head.weight = model.get_input_embeddings().weight
    left_on_meta = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    assert not left_on_meta, f"tensors left on the meta device: {left_on_meta}"

    setattr(model.config, "dtype" if hasattr(model.config, "dtype") else "torch_dtype", compute_dtype)
    if quantization == "nf4":
        from transformers import BitsAndBytesConfig

        # What transformers' bnb quantizer records; PEFT reads is_loaded_in_4bit to pick its bnb LoRA layer.
        model.config.quantization_config = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=compute_dtype)
        model.is_quantized = True
        model.is_loaded_in_4bit = True
        model.quantization_method = model.config.quantization_config.quant_method
    return model.eval()


@contextlib.contextmanager
def _gc_paused():
    """Creating ~30k small modules (64 adapters) otherwise spends most of its time in GC passes."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def _fresh_like(module: nn.Module) -> nn.Module:
    """A new module of the same kind as a (meta-device) adapter module."""
    if type(module) is nn.Linear and module.bias is None:
        # Built by hand: nn.Linear() runs its kaiming init even on meta (~0.1 ms, x 28k for 64 adapters).
        linear = nn.Linear.__new__(nn.Linear)
        nn.Module.__init__(linear)
        linear.in_features, linear.out_features = module.in_features, module.out_features
        linear.weight = module.weight  # the template's meta weight, until add_random_adapters draws this one
        linear.register_parameter("bias", None)
        return linear
    if type(module) in (nn.Identity, nn.Dropout):
        return copy.copy(module)  # stateless; copy.deepcopy of modules costs ~0.3 ms each
    return copy.deepcopy(module)


def _clone_adapters(peft_model, lora_layers: list, template: str, names: list[str]) -> None:
    """Register adapters `names` as copies of adapter `template`'s config and per-layer state.

    What `add_adapter(name, same_config)` builds, without its O(modules × adapters) model walk per
    call (64 adapters on 32 layers: minutes). Per-adapter state is what PEFT itself enumerates to
    delete an adapter: each layer's `adapter_layer_names + other_param_names` dicts (+ `lora_variant`)."""
    for name in names:
        peft_model.peft_config[name] = copy.deepcopy(peft_model.peft_config[template])
    for layer in lora_layers:
        for attr in (*layer.adapter_layer_names, *layer.other_param_names, "lora_variant"):
            per_adapter = getattr(layer, attr, None)
            if per_adapter is None or template not in per_adapter:
                continue
            value = per_adapter[template]
            for name in names:
                per_adapter[name] = _fresh_like(value) if isinstance(value, nn.Module) else copy.copy(value)


def _draw_adapter(lora_layers: list, name: str, seed: int, b_std: float, dtype: torch.dtype | None) -> None:
    """Give adapter `name` fresh weights on each base layer's device: A ~ N(0, 0.02²), B ~ N(0, b_std²)."""
    generators = {}
    for layer in lora_layers:
        if name not in layer.lora_A:
            continue
        device = layer.get_base_layer().weight.device
        if device not in generators:
            generators[device] = torch.Generator(device=device).manual_seed(seed)
        for lora, std in ((layer.lora_A[name], INIT_STD), (layer.lora_B[name], b_std)):
            weight = _randn(lora.weight.shape, std, generators[device], device, torch.float32)
            lora.weight = nn.Parameter(weight.to(dtype or lora.weight.dtype), requires_grad=False)


def add_random_adapters(model: nn.Module, num_adapters: int, rank: int = 16, alpha: int = 32,
                        target_modules=LLAMA_TARGETS, seed: int = 0, relative_delta: float = 0.25,
                        dtype: torch.dtype | None = None, fast: bool = True):
    """Wrap `model` (in place) as a PeftModel with LoRA adapters "a0".."a{n-1}", all A and B non-zero.

    A ~ N(0, 0.02²) and B ~ N(0, σ²) with σ = relative_delta / ((alpha/rank)·√rank), so for inputs of
    unit scale each adapted projection's delta is about relative_delta × its base output (base weights
    std 0.02), whatever the hidden size. PEFT creates "a0" on the meta device (low_cpu_mem_usage); the
    others are clones of it (fast=True, see _clone_adapters) or `add_adapter` calls (fast=False); all
    are drawn here on the base layer's device, adapter k from (seed, k) only. dtype=None keeps the
    dtype PEFT gives adapters (fp32, on a 4-bit base too)."""
    if num_adapters < 1:
        raise ValueError(f"num_adapters must be >= 1, got {num_adapters}")
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora import LoraLayer

    lora_config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(target_modules), lora_dropout=0.0,
                             bias="none", task_type="CAUSAL_LM", init_lora_weights=False)
    names = [f"a{k}" for k in range(num_adapters)]
    peft_model = get_peft_model(model, lora_config, adapter_name=names[0], low_cpu_mem_usage=True)
    if not fast:
        for name in names[1:]:
            peft_model.add_adapter(name, lora_config, low_cpu_mem_usage=True)
    lora_layers = [m for m in peft_model.modules() if isinstance(m, LoraLayer)]
    b_std = relative_delta / ((alpha / rank) * math.sqrt(rank))
    with _gc_paused():
        if fast:
            _clone_adapters(peft_model, lora_layers, names[0], names[1:])
        for k, name in enumerate(names):
            _draw_adapter(lora_layers, name, seed * 1_000_003 + k, b_std, dtype)
    return peft_model.eval()


def adapter_names_for(model: nn.Module, mode: str, batch_size: int) -> list[str] | None:
    """Per-row `adapter_names` for a benchmark mode; None (no adapter_names at all) for "base" on a plain HF model."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    available = set(getattr(model, "peft_config", {}))
    if mode == "base":
        return [BASE_ADAPTER] * batch_size if available else None
    needed = ["a0"] * batch_size if mode == "shared" else [f"a{i}" for i in range(batch_size)]
    missing = sorted(set(needed) - available, key=lambda n: int(n[1:]))
    if missing:
        raise ValueError(f"mode {mode!r} with batch_size {batch_size} needs adapters {needed[0]}..{needed[-1]}, "
                         f"but the model has {len(available)} adapter(s); {missing[0]} is missing "
                         f"(add_random_adapters(model, num_adapters={len(set(needed))}) or more)")
    return needed


def random_prompt_ids(batch_size: int, prompt_len: int, vocab_size: int, seed: int = 0,
                      device: str | torch.device = "cpu") -> torch.Tensor:
    """Seeded token ids [batch_size, prompt_len] in [0, vocab_size), drawn on the CPU (same on any device)."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, (batch_size, prompt_len), generator=generator).to(device)


def generate_tokens(model: nn.Module, input_ids: torch.Tensor, adapter_names: list[str] | None,
                    new_tokens: int) -> torch.Tensor:
    """Greedy `generate` of exactly `new_tokens` per row (EOS suppressed); returns the new ids [B, new_tokens]."""
    kwargs = {} if adapter_names is None else {"adapter_names": list(adapter_names)}
    out = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=new_tokens,
                         min_new_tokens=new_tokens, do_sample=False, pad_token_id=0, **kwargs)
    return out[:, input_ids.shape[1]:]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_peft_generate(model: nn.Module, batch_size: int, prompt_len: int, new_tokens: int, mode: str,
                      vocab_size: int, seed: int = 0, warmup: bool = True) -> dict:
    """Time one greedy `generate` of `new_tokens` per row for `mode` (see adapter_names_for).

    tokens_per_s counts generated tokens only (batch_size × new_tokens); prefill is inside wall_s."""
    for arg, value in (("batch_size", batch_size), ("prompt_len", prompt_len), ("new_tokens", new_tokens)):
        if value < 1:
            raise ValueError(f"{arg} must be >= 1, got {value}")
    adapter_names = adapter_names_for(model, mode, batch_size)
    device = model.device
    input_ids = random_prompt_ids(batch_size, prompt_len, vocab_size, seed, device)
    if warmup:
        generate_tokens(model, input_ids, adapter_names, min(2, new_tokens))
    _sync(device)
    start = time.perf_counter()
    new_ids = generate_tokens(model, input_ids, adapter_names, new_tokens)
    _sync(device)
    wall_s = time.perf_counter() - start
    return {"mode": mode, "batch_size": batch_size, "prompt_len": prompt_len, "new_tokens": new_tokens,
            "generated_tokens": new_ids.numel(), "wall_s": wall_s,
            "tokens_per_s": batch_size * new_tokens / wall_s}


def versions() -> dict:
    """Library versions and the device name, for the benchmark JSON."""
    import bitsandbytes
    import peft
    import transformers

    if torch.cuda.is_available():
        device = torch.cuda.get_device_name()
    else:
        device = f"cpu ({platform.processor() or platform.machine()})"
    return {"torch": torch.__version__, "cuda": torch.version.cuda, "transformers": transformers.__version__,
            "peft": peft.__version__, "bitsandbytes": bitsandbytes.__version__, "device": device}


def baseline_table(config_path: str | Path, batches=(1, 8, 32, 64), modes=MODES, prompt_len: int = 128,
                   new_tokens: int = 64, device: str = "cuda", num_adapters: int | None = None, rank: int = 16,
                   seed: int = 0) -> list[dict]:
    """Build the NF4 model and max(batches) adapters (or num_adapters) once, then time every (mode, batch).

    "distinct" rows whose batch exceeds the adapters are skipped; a row that runs out of GPU memory
    is kept with an "error" and None timings. Prints one line per row as it goes."""
    config = json.loads(Path(config_path).read_text())
    num_adapters = max(batches) if num_adapters is None else num_adapters
    print(f"peft baseline: {json.dumps(versions())}", flush=True)
    start = time.perf_counter()
    model = build_hf_nf4_model(config, device, seed=seed)
    built_s = time.perf_counter() - start
    start = time.perf_counter()
    model = add_random_adapters(model, num_adapters, rank=rank, seed=seed)
    _sync(model.device)
    print(f"peft baseline: built NF4 model in {built_s:.1f} s, {num_adapters} rank-{rank} adapters in "
          f"{time.perf_counter() - start:.1f} s", flush=True)
    rows = []
    for mode in modes:
        for batch_size in batches:
            if mode == "distinct" and batch_size > num_adapters:
                print(f"peft baseline: skip distinct batch={batch_size} > {num_adapters} adapters", flush=True)
                continue
            try:
                row = run_peft_generate(model, batch_size, prompt_len, new_tokens, mode, config["vocab_size"], seed)
            except torch.OutOfMemoryError:
                torch.cuda.empty_cache()
                row = {"mode": mode, "batch_size": batch_size, "prompt_len": prompt_len, "new_tokens": new_tokens,
                       "generated_tokens": 0, "wall_s": None, "tokens_per_s": None, "error": "out of memory"}
                print(f"peft baseline: {mode:8s} batch={batch_size:3d} out of memory", flush=True)
            else:
                print(f"peft baseline: {mode:8s} batch={batch_size:3d} prompt={prompt_len} new={new_tokens} "
                      f"wall={row['wall_s']:.3f}s {row['tokens_per_s']:.1f} tok/s", flush=True)
            rows.append(row)
    return rows
