"""`loraplex demo --in-process`: the embedded model serving base, two adapters and their exact 50/50 mix in
ONE engine batch, without a server. (`loraplex demo` runs the server and a client: service/demo_client.py.)"""
from __future__ import annotations

import argparse
import textwrap
import time
from pathlib import Path

from .config import EngineConfig, LoRAConfig, ModelConfig, SchedulerConfig
from .errors import ModelLoadError
from .types import AdapterWeight, ChatMessage, GenerationRequest, StoppingCriteria

QUESTION = "What is the capital of France?"


def default_adapters_dir() -> Path:
    """examples/adapters of the source checkout this package runs from."""
    return Path(__file__).resolve().parent.parent / "examples" / "adapters"


def run_demo(args: argparse.Namespace) -> int:
    if not args.in_process:
        from .service.demo_client import run_server_demo

        return run_server_demo(args)
    return run_engine_demo(args)


def check_example_adapters(adapters_dir: Path, names: list[str]) -> None:
    missing = [n for n in names if not (adapters_dir / n / "adapter_config.json").is_file()]
    if missing:
        raise ModelLoadError(f"example adapters {', '.join(missing)} not found under {adapters_dir} "
                             "(make them with: python examples/make_example_adapters.py)")


def run_engine_demo(args: argparse.Namespace) -> int:
    from .cli import resolve_device
    from .engine.engine import Engine

    adapters_dir = Path(args.adapters_dir) if args.adapters_dir else default_adapters_dir()
    names = ["caps", "pirate"]
    check_example_adapters(adapters_dir, names)
    device = resolve_device(args.device)
    dtype = args.dtype or ("bfloat16" if device.startswith("cuda") else "float32")
    started = time.monotonic()
    engine = Engine(EngineConfig(
        model=ModelConfig(path=args.model, quantization=args.quantization, dtype=dtype, device=device),
        lora=LoRAConfig(max_lora_rank=16, max_loras=4, max_cpu_loras=8, max_adapters_per_request=2,
                        derived_rank=16),
        scheduler=SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=256)))
    for name in names:
        entry = engine.register_adapter(name, str(adapters_dir / name))
        print(f"registered {name!r}: rank {entry.rank}, targets {', '.join(entry.target_modules)}")
    print(f"engine ready in {time.monotonic() - started:.1f} s: {engine.loaded.model_id}, "
          f"{engine.loaded.quantization}, {device}\n")
    messages = (ChatMessage("user", QUESTION),)
    stopping = StoppingCriteria(max_new_tokens=args.max_new_tokens)
    rows = [("base model", dict()), ("adapter 'caps'", dict(adapter="caps")),
            ("adapter 'pirate'", dict(adapter="pirate")),
            ("mix 0.5 caps + 0.5 pirate", dict(adapters=(AdapterWeight("caps", 0.5), AdapterWeight("pirate", 0.5))))]
    requests = [GenerationRequest(messages=messages, stopping=stopping, **kw) for _, kw in rows]
    started = time.monotonic()
    results = engine.generate(requests)
    seconds = time.monotonic() - started
    print(f"Q: {QUESTION}\n")
    for (label, _), result in zip(rows, results):
        print(f"[{label}]")
        print(textwrap.indent(textwrap.fill(result.text.strip(), 88), "  "))
        print()
    tokens = sum(r.generated_tokens for r in results)
    print(f"{len(requests)} requests in one batch: {tokens} tokens in {seconds:.1f} s "
          f"({engine.steps_total} steps, {tokens / seconds:.1f} tok/s)")
    engine.stop()
    return 0
