"""`loraplex bench ...`: benchmarks that write JSON (device, versions, config, figures) to benchmarks/results/."""
from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path


def add_bench_parser(sub) -> None:
    bench = sub.add_parser("bench", help="benchmarks; JSON to benchmarks/results/")
    kinds = bench.add_subparsers(dest="bench_command", required=True, metavar="BENCH")
    serve = kinds.add_parser("serve", help="multi-adapter generation throughput, ours beside HF+PEFT")
    _add_model_args(serve)
    serve.add_argument("--batches", default="1,8,32,64", help="comma-separated batch sizes")
    serve.add_argument("--modes", default="base,shared,distinct")
    serve.add_argument("--prompt-len", default="128", help="comma-separated prompt lengths (one row set each)")
    serve.add_argument("--max-batched-tokens", type=int, default=8192, help="per-step token budget")
    serve.add_argument("--baseline-prompt-lens", default=None,
                       help="prompt lengths for the baseline (default: --prompt-len)")
    serve.add_argument("--new-tokens", type=int, default=64)
    serve.add_argument("--rank", type=int, default=16)
    serve.add_argument("--num-adapters", type=int, default=None, help="default: the largest batch")
    serve.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs for decode")
    serve.add_argument("--baseline", default="peft", choices=["peft", "none"],
                       help="also run HF generate + PEFT adapter_names in the same process")
    serve.add_argument("--baseline-batches", default=None, help="batch sizes for the baseline (default: --batches)")
    serve.add_argument("--out", default="benchmarks/results", help="folder for the JSON")
    kernels = kinds.add_parser("kernels", help="kernel time over M and share of memory bandwidth, beside baselines")
    kernels.add_argument("--ms", default="1,2,4,8,16,32,64,128", help="comma-separated rows of x (tokens)")
    kernels.add_argument("--families", default="nf4", help="comma-separated kernel families")
    kernels.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    kernels.add_argument("--device", default="cuda")
    kernels.add_argument("--no-baselines", action="store_true", help="skip bitsandbytes and bf16 cuBLAS")
    kernels.add_argument("--out", default="benchmarks/results", help="folder for the JSON")
    traffic = kinds.add_parser("adapters", help="many adapters under open-loop Zipf traffic: loads, hit rates, "
                               "TTFT/TPOT percentiles")
    _add_model_args(traffic)
    traffic.add_argument("--num-adapters", default="8,64,1000", help="comma-separated adapter counts (a row each)")
    traffic.add_argument("--rank", type=int, default=8)
    traffic.add_argument("--targets", default="q_proj,k_proj,v_proj,o_proj")
    traffic.add_argument("--rate", type=float, default=8.0, help="requests per second (Poisson arrivals)")
    traffic.add_argument("--duration", type=float, default=60.0, help="seconds of arrivals per row")
    traffic.add_argument("--zipf", type=float, default=1.0, help="popularity exponent s (weight 1/k^s)")
    traffic.add_argument("--prompt-len", default="256,32,2048", help="median,min,max (log-normal)")
    traffic.add_argument("--output-len", default="128,16,512", help="median,min,max (log-normal)")
    traffic.add_argument("--max-loras", type=int, default=32, help="device slots")
    traffic.add_argument("--max-cpu-loras", type=int, default=128, help="host-tier adapters")
    traffic.add_argument("--max-num-seqs", type=int, default=64)
    traffic.add_argument("--max-batched-tokens", type=int, default=4096)
    traffic.add_argument("--kv-tokens", type=int, default=200_000)
    traffic.add_argument("--adapters-dir", default="benchmarks/adapters-cache",
                         help="where the PEFT folders are written once and reused")
    traffic.add_argument("--seed", type=int, default=0)
    traffic.add_argument("--out", default="benchmarks/results", help="folder for the JSON")
    from loraplex.training.bench import add_bench_train_parser

    add_bench_train_parser(kinds)


def _add_model_args(parser: argparse.ArgumentParser) -> None:
    """The base the benchmark serves: by default the Llama-3.1-8B shape with random NF4 weights on CUDA."""
    parser.add_argument("--model", default="benchmarks/shapes/llama-3.1-8b",
                        help="folder with config.json (and weights unless --load-format dummy)")
    parser.add_argument("--load-format", default="dummy", choices=["dummy", "auto"])
    parser.add_argument("--quantization", default="nf4", choices=["nf4", "bf16", "none"])
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--device", default="cuda")


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.split(",") if x)


def run_bench(args: argparse.Namespace) -> int:
    if args.bench_command == "train":
        from loraplex.training.bench import run_bench_train

        return run_bench_train(args)
    if args.bench_command == "kernels":
        return run_bench_kernels(args)
    if args.bench_command == "adapters":
        return run_bench_adapters(args)
    from .serving import ServeBenchConfig, run_serving_bench

    batches = _ints(args.batches)
    prompt_lens = _ints(args.prompt_len)
    cfg = ServeBenchConfig(
        model=args.model, load_format=args.load_format, quantization=args.quantization, dtype=args.dtype,
        device=args.device, batches=batches, modes=tuple(args.modes.split(",")), prompt_len=prompt_lens[0],
        new_tokens=args.new_tokens, rank=args.rank, num_adapters=args.num_adapters or max(batches),
        enforce_eager=args.enforce_eager, max_batched_tokens=args.max_batched_tokens)
    env = environment(cfg.device)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"serve-{env['device_slug']}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    report = {"benchmark": "serve", "config": dict(dataclasses.asdict(cfg), prompt_lens=list(prompt_lens)),
              "environment": env, "loraplex": [], "baseline_peft": [], "ratios": [], "complete": False}
    report["loraplex"] = run_serving_bench(cfg, log=lambda line: print(line, flush=True), prompt_lens=prompt_lens)
    path.write_text(json.dumps(report, indent=2))  # ours survive a baseline cut short
    if args.baseline == "peft":
        from .peft_baseline import baseline_table

        for prompt_len in _ints(args.baseline_prompt_lens) if args.baseline_prompt_lens else prompt_lens:
            report["baseline_peft"] += baseline_table(
                str(Path(args.model) / "config.json"),
                batches=_ints(args.baseline_batches) if args.baseline_batches else batches, modes=cfg.modes,
                prompt_len=prompt_len, new_tokens=cfg.new_tokens, device=cfg.device,
                num_adapters=cfg.num_adapters, rank=cfg.rank)
            path.write_text(json.dumps(report, indent=2))
    report["ratios"] = ratios(report["loraplex"], report["baseline_peft"])
    report["complete"] = True
    path.write_text(json.dumps(report, indent=2))
    for row in report["ratios"]:
        print(f"prompt {row['prompt_len']:5d} {row['mode']:8s} batch {row['batch_size']:3d}: "
              f"loraplex {row['loraplex_tok_s']:9.1f} tok/s, peft {row['peft_tok_s']:8.1f} tok/s, "
              f"x{row['speedup']:.1f}", flush=True)
    print(f"wrote {path}")
    return 0


def run_bench_kernels(args: argparse.Namespace) -> int:
    from .kernels import KernelsBenchConfig, run_kernels_bench

    cfg = KernelsBenchConfig(ms=_ints(args.ms), families=tuple(args.families.split(",")), dtype=args.dtype,
                             device=args.device, baselines=not args.no_baselines)
    env = environment(cfg.device)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"kernels-{env['device_slug']}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    report = {"benchmark": "kernels", "config": dataclasses.asdict(cfg), "environment": env}
    report.update(run_kernels_bench(cfg, log=lambda line: print(line, flush=True)))
    path.write_text(json.dumps(report, indent=2))
    print(json.dumps(report["summary"], indent=1))
    print(f"wrote {path}")
    return 0


def run_bench_adapters(args: argparse.Namespace) -> int:
    from .adapter_traffic import AdapterTrafficConfig, run_adapter_traffic_bench

    cfg = AdapterTrafficConfig(
        model=args.model, load_format=args.load_format, quantization=args.quantization, dtype=args.dtype,
        device=args.device, num_adapters=_ints(args.num_adapters), rank=args.rank,
        targets=tuple(args.targets.split(",")), rate=args.rate, duration_s=args.duration, zipf_s=args.zipf,
        prompt_len=_triple(args.prompt_len, "--prompt-len"), output_len=_triple(args.output_len, "--output-len"),
        max_loras=args.max_loras, max_cpu_loras=args.max_cpu_loras, max_num_seqs=args.max_num_seqs,
        max_batched_tokens=args.max_batched_tokens, kv_tokens=args.kv_tokens, adapters_dir=args.adapters_dir,
        seed=args.seed)
    env = environment(cfg.device)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"adapters-{env['device_slug']}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    report = {"benchmark": "adapters", "config": dataclasses.asdict(cfg), "environment": env,
              "rows": run_adapter_traffic_bench(cfg, log=lambda line: print(line, flush=True))}
    path.write_text(json.dumps(report, indent=2))
    print(f"wrote {path}")
    return 0


def _triple(text: str, flag: str) -> tuple[int, int, int]:
    values = _ints(text)
    if len(values) != 3 or not 0 < values[1] <= values[0] <= values[2]:
        from ..errors import ConfigError

        raise ConfigError(f"{flag} {text!r}: expected median,min,max with 0 < min <= median <= max")
    return values


def ratios(ours: list[dict], baseline: list[dict]) -> list[dict]:
    """ours / baseline for every (prompt length, mode, batch) measured by both."""
    peft = {(r.get("prompt_len", 128), r["mode"], r["batch_size"]): r["tokens_per_s"] for r in baseline
            if r.get("tokens_per_s")}
    rows = []
    for r in ours:
        key = (r.get("prompt_len", 128), r["mode"], r["batch_size"])
        if key in peft:
            rows.append({"prompt_len": key[0], "mode": key[1], "batch_size": key[2],
                         "loraplex_tok_s": r["tokens_per_s"], "peft_tok_s": peft[key],
                         "speedup": round(r["tokens_per_s"] / peft[key], 2)})
    return rows


def environment(device: str) -> dict:
    import platform

    import torch

    env = {"python": platform.python_version(), "torch": torch.__version__, "device": device}
    for name in ("transformers", "peft", "bitsandbytes", "triton"):
        try:
            env[name] = __import__(name).__version__
        except Exception:
            env[name] = None
    if device.startswith("cuda") and torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name(device)
        env["cuda"] = torch.version.cuda
    env["device_slug"] = (env.get("gpu") or "cpu").replace("NVIDIA ", "").replace(" ", "-").lower()
    return env
