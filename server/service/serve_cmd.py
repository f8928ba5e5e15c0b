"""`loraplex serve`: flags (layered with the config file and env) -> EngineConfig + ServiceConfig -> serve."""
from __future__ import annotations

import argparse
import asyncio
import os
import sys
from pathlib import Path

from ..config import CacheConfig, EngineConfig, LoRAConfig, ModelConfig, SchedulerConfig, ServiceConfig
from ..settings import Layers, read_tokens

SERVE = Layers("serve")


def default_state_dir() -> str:
    return str(Path(os.environ.get("XDG_STATE_HOME") or Path.home() / ".local" / "state") / "loraplex")


def add_serve_parser(sub) -> None:
    p = sub.add_parser("serve", help="run the gRPC server (embedded model unless --model)",
                       description="Run the gRPC server. Settings: flag > env > config file [serve] > default.")
    add = lambda *flags, **kw: SERVE.add(p, *flags, **kw)  # noqa: E731
    add("--model", help="HF folder or .gguf file (default: the embedded SmolLM2-135M-Instruct)")
    add("--quantization", default="nf4", choices=["nf4", "bf16", "fp16", "none"], help="base weights")
    add("--dtype", choices=["float32", "bfloat16", "float16"], help="compute dtype (default: bf16 on GPU, fp32 on CPU)")
    add("--device", help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    add("--max-model-len", type=int, help="longest prompt + completion (default: the model's)")
    add("--adapter-root", action="append", env="LORAPLEX_ADAPTER_ROOTS", metavar="DIR",
        help="folder RegisterAdapter may read adapters from; repeat for several (env: os.pathsep-separated)")
    add("--state-dir", default=default_state_dir(), help="registry and adapter copies")
    add("--cache-dir", help="converted models and derived adapters (default: ~/.cache/loraplex)")
    add("--host", default="127.0.0.1", help="listen address")
    add("--port", type=int, default=50051, help="gRPC port (0 = any free port)")
    add("--http-port", type=int, help="also serve the OpenAI-compatible HTTP API on --host at this port "
        "(0 = any free port; default: no HTTP)")
    add("--health-port", type=int, help="also serve the gRPC health service alone, in plaintext, on this port "
        "(probes and HEALTHCHECKs when the main port speaks TLS; 0 = any free port)")
    add("--metrics-host", default="127.0.0.1", help="metrics listen address")
    add("--metrics-port", type=int, default=9400, help="Prometheus /metrics port (0 = any free port)")
    add("--no-metrics", action="store_true", help="serve no metrics endpoint")
    add("--admin-token-file", metavar="FILE",
        help="bearer tokens (one per line) the Adapters service requires; else env LORAPLEX_ADMIN_TOKEN, else none")
    add("--generation-token-file", metavar="FILE",
        help="bearer tokens the Generation service requires; else env LORAPLEX_GENERATION_TOKEN, else none")
    add("--tls-cert", metavar="PEM", help="server certificate chain (TLS with --tls-key)")
    add("--tls-key", metavar="PEM", help="server private key")
    add("--tls-ca", metavar="PEM", help="CA that client certificates must chain to (mTLS)")
    add("--grace-seconds", type=float, default=30.0, help="on SIGTERM, time running requests get to finish")
    add("--max-upload-bytes", type=int, default=1 << 30, help="largest UploadAdapter")
    add("--min-free-disk-bytes", type=int, default=256 << 20,
        help="refuse registrations and uploads that would leave less free space on the state dir's disk")
    add("--strict-base", action="store_true",
        help="refuse adapters whose adapter_config.json names another base model (default: register them "
             "with a warning in AdapterInfo.warnings)")
    add("--adapter-source", action="append", env="LORAPLEX_ADAPTER_SOURCES", metavar="PATTERN=SOURCE", sep=None,
        help="load an unregistered adapter on first use: a name matching the glob PATTERN is registered from "
             "SOURCE with {name} replaced, e.g. 'acme-*=s3://adapters/{name}'; repeat for several, first match "
             "wins (env: whitespace-separated)")
    add("--hf-endpoint", help="hub for hf:// sources (default: huggingface_hub's, HF_ENDPOINT)")
    add("--hf-cache-dir", help="huggingface_hub cache for hf:// sources (default: HF_HUB_CACHE)")
    add("--s3-endpoint-url", help="S3-compatible endpoint for s3:// sources (default: boto3's, AWS_ENDPOINT_URL)")
    add("--s3-region", help="region for s3:// sources (default: boto3's, AWS_DEFAULT_REGION, else us-east-1)")
    add("--registry-url", env="LORAPLEX_REGISTRY_URL", metavar="postgresql://...",
        help="share the adapter registry with other replicas through PostgreSQL (with --shared-adapter-dir; "
             "default: this server's own registry in --state-dir)")
    add("--shared-adapter-dir", metavar="DIR|s3://BUCKET/PREFIX",
        help="with --registry-url: where adapter versions are kept, a folder every replica mounts or an "
             "S3-compatible prefix (--s3-endpoint-url; each replica keeps its copies in --state-dir)")
    add("--max-message-bytes", type=int, default=16 << 20,
        help="largest gRPC message received (text requests past their context are refused before parsing)")
    add("--request-workers", type=int, default=2, help="threads that validate and tokenize requests")
    add("--max-pending-requests", type=int, default=256,
        help="requests waiting for a worker thread; beyond it RESOURCE_EXHAUSTED")
    add("--max-loras", type=_slot_count, default=8,
        help="adapter slots on the device (distinct adapters per step), or 'auto': as many as fit the GPU memory "
             "left after the model and KV cache, less --slot-memory-margin (at most --max-cpu-loras; 8 on the CPU)")
    add("--slot-memory-margin", type=int, default=4 << 30,
        help="with --max-loras auto: GPU bytes kept free for activations and CUDA graphs")
    add("--lora-staging-bytes", type=int, default=256 << 20,
        help="pinned host buffers that slot fills copy through on a GPU (reused; at least one slot's bytes)")
    add("--max-lora-rank", type=int, default=64, help="largest adapter rank accepted")
    add("--max-cpu-loras", type=int, default=64, help="validated adapters kept in host memory")
    add("--max-cpu-lora-bytes", type=int, help="and at most this many bytes of them (default: no byte bound)")
    add("--max-adapters-per-request", type=int, default=8, help="most adapters in one weighted mix")
    add("--max-num-seqs", type=int, default=64, help="sequences in the running batch")
    add("--max-num-batched-tokens", type=int, default=512, help="tokens per forward step")
    add("--long-prefill-token-threshold", type=int,
        help="most prompt tokens one sequence prefills per step while others decode (default: a quarter of "
             "--max-num-batched-tokens)")
    add("--max-waiting", type=int, default=256, help="bounded queue; beyond it RESOURCE_EXHAUSTED")
    add("--max-new-tokens-limit", type=int, default=4096, help="largest max_new_tokens a request may ask")
    add("--default-max-new-tokens", type=int, default=128, help="when a request leaves max_new_tokens at 0")
    add("--kv-cache-bytes", type=int, default=512 << 20, help="KV cache size on the CPU")
    add("--max-adapter-labels", type=int, default=64, help="adapter names with their own metrics label")


def configs_from_args(args: argparse.Namespace) -> tuple[ServiceConfig, EngineConfig]:
    """Service settings first: their mistakes are reported before torch is even imported."""
    service = ServiceConfig(
        host=args.host, port=args.port, http_port=args.http_port, health_port=args.health_port,
        metrics_host=args.metrics_host,
        metrics_port=None if args.no_metrics else args.metrics_port, state_dir=args.state_dir,
        adapter_roots=tuple(str(Path(r).expanduser().resolve()) for r in args.adapter_root or ()),
        admin_tokens=read_tokens(args.admin_token_file, "LORAPLEX_ADMIN_TOKEN"),
        generation_tokens=read_tokens(args.generation_token_file, "LORAPLEX_GENERATION_TOKEN"),
        tls_cert=args.tls_cert, tls_key=args.tls_key, tls_ca=args.tls_ca, grace_seconds=args.grace_seconds,
        max_upload_bytes=args.max_upload_bytes, max_adapter_labels=args.max_adapter_labels,
        min_free_disk_bytes=args.min_free_disk_bytes, strict_base=bool(args.strict_base),
        request_workers=args.request_workers, max_pending_requests=args.max_pending_requests,
        max_message_bytes=args.max_message_bytes, adapter_sources=tuple(args.adapter_source or ()),
        hf_endpoint=args.hf_endpoint, hf_cache_dir=args.hf_cache_dir, s3_endpoint_url=args.s3_endpoint_url,
        s3_region=args.s3_region, registry_url=args.registry_url or "",
        shared_adapter_dir=_shared_dir(args.shared_adapter_dir))
    from ..cli import resolve_device

    device = resolve_device(args.device)
    dtype = args.dtype or ("bfloat16" if device.startswith("cuda") else "float32")
    max_loras = args.max_loras
    engine = EngineConfig(
        model=ModelConfig(path=args.model, quantization=args.quantization, dtype=dtype, device=device,
                          max_model_len=args.max_model_len),
        lora=LoRAConfig(max_lora_rank=args.max_lora_rank, max_loras=max_loras, max_cpu_loras=args.max_cpu_loras,
                        max_cpu_lora_bytes=args.max_cpu_lora_bytes,
                        max_adapters_per_request=(args.max_adapters_per_request if max_loras == "auto" else
                                                  min(args.max_adapters_per_request, max_loras)),
                        slot_memory_margin=args.slot_memory_margin, staging_bytes=args.lora_staging_bytes,
                        derived_rank=min(64, args.max_lora_rank)),
        cache=CacheConfig(cpu_cache_bytes=args.kv_cache_bytes),
        scheduler=SchedulerConfig(max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
                                  max_waiting=args.max_waiting, max_new_tokens_limit=args.max_new_tokens_limit,
                                  default_max_new_tokens=min(args.default_max_new_tokens, args.max_new_tokens_limit),
                                  long_prefill_token_threshold=args.long_prefill_token_threshold),
        cache_dir=args.cache_dir)
    return service, engine


def _slot_count(text: str) -> int | str:
    """--max-loras: a positive count or 'auto'."""
    if str(text).strip().lower() == "auto":
        return "auto"
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: a number of slots or 'auto'") from None


def _shared_dir(given: str | None) -> str:
    """A folder made absolute; an s3://bucket/prefix as it is."""
    if not given or given.startswith("s3://"):
        return given or ""
    return str(Path(given).resolve())


def run_serve(args: argparse.Namespace) -> int:
    from .server import serve

    service, engine = configs_from_args(args)

    def ready(server):
        metrics = f", metrics on http://{service.metrics_host}:{server.metrics_port}/metrics" \
            if server.metrics_port else ""
        scheme = "https" if service.tls_cert else "http"
        http = f", OpenAI-compatible HTTP on {scheme}://{service.host}:{server.http_port}/v1" if server.http_port else ""
        health = f", plaintext health on {service.host}:{server.health_port}" if server.health_port else ""
        print(f"loraplex: serving on {service.host}:{server.port}{http}{health}{metrics}", file=sys.stderr,
              flush=True)

    asyncio.run(serve(service, engine, on_ready=ready))
    return 0
