"""Engine configuration: one frozen dataclass per subsystem, validated on construction."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from .adapters.source_rules import parse_rule
from .errors import ConfigError

QUANTIZATIONS = ("nf4", "bf16", "fp16", "none")
DTYPES = ("float32", "bfloat16", "float16")


def _raise_if(problems: list[str], what: str) -> None:
    if problems:
        raise ConfigError(f"invalid {what}: " + "; ".join(problems))


@dataclass(frozen=True, slots=True)
class ModelConfig:
    """Which base model, and how its weights are held."""

    path: str | None = None
    """HF folder (config.json + *.safetensors) or a .gguf file; None = the embedded SmolLM2-135M-Instruct."""
    quantization: str = "nf4"
    """nf4 (bitsandbytes, double quantization), bf16, fp16 or none (weights kept in `dtype`)."""
    dtype: str = "float32"
    """Compute dtype for activations, KV cache and unquantized weights."""
    device: str = "cpu"
    """Torch device string: cpu, cuda, cuda:1 ..."""
    load_format: str = "auto"
    """auto (read weights from `path`) or dummy (random weights in the shape of `path`'s config)."""
    max_model_len: int | None = None
    """Longest sequence (prompt + generated); None = the model's max_position_embeddings."""
    seed: int = 0
    """Seed for dummy weights."""
    enforce_eager: bool = False
    """On a GPU, run decode steps eagerly instead of replaying CUDA graphs."""

    def __post_init__(self):
        problems = []
        if self.quantization not in QUANTIZATIONS:
            problems.append(f"quantization={self.quantization!r} (choose from {', '.join(QUANTIZATIONS)})")
        if self.dtype not in DTYPES:
            problems.append(f"dtype={self.dtype!r} (choose from {', '.join(DTYPES)})")
        if self.load_format not in ("auto", "dummy"):
            problems.append(f"load_format={self.load_format!r} (auto or dummy)")
        if self.max_model_len is not None and self.max_model_len < 1:
            problems.append(f"max_model_len={self.max_model_len} (must be >= 1)")
        _raise_if(problems, "model config")


@dataclass(frozen=True, slots=True)
class LoRAConfig:
    """Adapter slots and limits."""

    max_lora_rank: int = 64
    """Largest adapter rank accepted; device slots are padded to it."""
    max_loras: int | Literal["auto"] = 8
    """Adapter slots on the device: distinct adapters usable in one step. "auto": as many as fit the GPU memory
    left after the model and KV cache, less `slot_memory_margin` (at most max_cpu_loras; 8 on the CPU)."""
    slot_memory_margin: int = 4 << 30
    """With max_loras "auto": GPU bytes kept free for activations, CUDA graphs and the allocator's slack."""
    max_cpu_loras: int = 64
    """Validated adapters kept in host memory (LRU); the rest reload from disk."""
    max_cpu_lora_bytes: int | None = None
    """And at most this many bytes of them (None: the count alone bounds the host tier)."""
    max_adapters_per_request: int = 8
    """Most adapters one weighted mix may name."""
    staging_bytes: int = 256 * 1024 * 1024
    """Pinned host buffers for slot fills on a GPU, reused by every fill (raised to one slot's bytes if less)."""
    staged_fills: bool | None = None
    """Fill slots through the staging pool and its worker thread (None: on a GPU only). True on the CPU runs the
    GPU's admission path (fills land a step or more after they start, at most staging_bytes of them at a time)
    with plain copies: tests and CPU benchmarks of the fill path."""
    derived_rank: int = 64
    """TIES/DARE mixes are compressed back to at most this rank by SVD."""

    def __post_init__(self):
        problems = []
        if not 1 <= self.max_lora_rank <= 1024:
            problems.append(f"max_lora_rank={self.max_lora_rank} (1..1024)")
        auto = self.max_loras == "auto"
        if not auto and (not isinstance(self.max_loras, int) or self.max_loras < 1):
            problems.append(f"max_loras={self.max_loras!r} (>= 1, or 'auto')")
            auto = True  # (the checks against it would only repeat the problem)
        if self.slot_memory_margin < 0:
            problems.append(f"slot_memory_margin={self.slot_memory_margin} (>= 0)")
        if self.staging_bytes < 1:
            problems.append(f"staging_bytes={self.staging_bytes} (>= 1)")
        if self.max_cpu_lora_bytes is not None and self.max_cpu_lora_bytes < 1:
            problems.append(f"max_cpu_lora_bytes={self.max_cpu_lora_bytes} (>= 1, or unset)")
        if not auto and self.max_cpu_loras < self.max_loras:
            problems.append(f"max_cpu_loras={self.max_cpu_loras} (>= max_loras={self.max_loras})")
        if auto and not 1 <= self.max_adapters_per_request <= self.max_cpu_loras:
            problems.append(f"max_adapters_per_request={self.max_adapters_per_request} "
                            f"(1..max_cpu_loras={self.max_cpu_loras})")
        if not auto and not 1 <= self.max_adapters_per_request <= self.max_loras:
            problems.append(
                f"max_adapters_per_request={self.max_adapters_per_request} (1..max_loras={self.max_loras})"
            )
        if not 1 <= self.derived_rank <= self.max_lora_rank:
            problems.append(f"derived_rank={self.derived_rank} (1..max_lora_rank={self.max_lora_rank})")
        _raise_if(problems, "LoRA config")


@dataclass(frozen=True, slots=True)
class CacheConfig:
    """Paged KV cache."""

    block_size: int = 16
    """Tokens per KV block."""
    num_blocks: int | None = None
    """KV blocks to allocate; None = sized from `memory_fraction` (GPU) or `cpu_cache_bytes` (CPU)."""
    memory_fraction: float = 0.85
    """On a GPU: share of total memory the process may use (weights + adapters + KV)."""
    cpu_cache_bytes: int = 512 * 1024 * 1024
    """On the CPU: bytes of KV cache when num_blocks is None."""

    def __post_init__(self):
        problems = []
        if self.block_size < 1:
            problems.append(f"block_size={self.block_size} (>= 1)")
        if self.num_blocks is not None and self.num_blocks < 1:
            problems.append(f"num_blocks={self.num_blocks} (>= 1)")
        if not 0.05 <= self.memory_fraction <= 0.99:
            problems.append(f"memory_fraction={self.memory_fraction} (0.05..0.99)")
        _raise_if(problems, "cache config")


@dataclass(frozen=True, slots=True)
class SchedulerConfig:
    """Admission and batching."""

    max_num_seqs: int = 64
    """Sequences in the running batch."""
    max_num_batched_tokens: int = 512
    """Tokens per forward step (decode tokens first, then prefill chunks)."""
    max_waiting: int = 256
    """Bounded waiting queue; a submit past it fails with RESOURCE_EXHAUSTED at once."""
    max_new_tokens_limit: int = 4096
    """Largest max_new_tokens a request may ask for."""
    default_max_new_tokens: int = 128
    """Used when a request leaves max_new_tokens at 0."""
    max_top_logprobs: int = 20
    """Largest top_logprobs a request may ask for."""
    overlap_steps: bool | None = None
    """Launch step n+1 before reading step n's tokens back (None: on for CUDA, off on the CPU)."""
    long_prefill_token_threshold: int | None = None
    """Most prompt tokens one sequence may prefill in a step while other sequences decode (then the
    rest of the budget goes to other prompts and new requests); None = max_num_batched_tokens // 4."""

    def __post_init__(self):
        problems = []
        for name in ("max_num_seqs", "max_num_batched_tokens", "max_waiting", "max_new_tokens_limit"):
            if getattr(self, name) < 1:
                problems.append(f"{name}={getattr(self, name)} (>= 1)")
        threshold = self.long_prefill_token_threshold
        if threshold is not None and not 1 <= threshold <= self.max_num_batched_tokens:
            problems.append(f"long_prefill_token_threshold={threshold} (1..max_num_batched_tokens="
                            f"{self.max_num_batched_tokens})")
        if self.max_num_batched_tokens < self.max_num_seqs:
            problems.append(
                f"max_num_batched_tokens={self.max_num_batched_tokens} (>= max_num_seqs={self.max_num_seqs}, "
                "so every running sequence can decode each step)"
            )
        if not 1 <= self.default_max_new_tokens <= self.max_new_tokens_limit:
            problems.append(f"default_max_new_tokens={self.default_max_new_tokens} (1..max_new_tokens_limit)")
        _raise_if(problems, "scheduler config")

    @property
    def prefill_chunk_cap(self) -> int:
        """long_prefill_token_threshold, or its default."""
        return self.long_prefill_token_threshold or max(1, self.max_num_batched_tokens // 4)


@dataclass(frozen=True, slots=True)
class EngineConfig:
    """Everything the engine needs, one field per subsystem."""

    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    cache_dir: str | None = None
    """Where converted models and derived adapters are cached; None = ~/.cache/loraplex."""


@dataclass(frozen=True, slots=True)
class ServiceConfig:
    """The gRPC server (and the HTTP API beside it) around the engine: addresses, state, security, limits."""

    host: str = "127.0.0.1"
    port: int = 50051
    """0 = any free port (the server reports the one it bound)."""
    http_port: int | None = None
    """OpenAI-compatible HTTP API on `host` (server/openai_api/); 0 = any free port, None = none."""
    health_port: int | None = None
    """A second, plaintext listener on `host` with the gRPC health service only: what Kubernetes' gRPC probes
    and container HEALTHCHECKs reach when the main port speaks TLS; 0 = any free port, None = none."""
    metrics_host: str = "127.0.0.1"
    metrics_port: int | None = 9400
    """Prometheus text at http://metrics_host:metrics_port/metrics; 0 = any free port, None = none."""
    state_dir: str = "loraplex-state"
    """Registry (registry.json) and one copy of every registered adapter version."""
    adapter_roots: tuple[str, ...] = ()
    """Folders RegisterAdapter may read from; none = adapters arrive by upload only."""
    admin_tokens: tuple[str, ...] = field(default=(), repr=False)
    """Bearer tokens accepted by the Adapters service; none = no token needed."""
    generation_tokens: tuple[str, ...] = field(default=(), repr=False)
    """Bearer tokens accepted by the Generation service; none = no token needed."""
    tls_cert: str | None = None
    """PEM certificate chain of the server; with tls_key, the server speaks TLS only."""
    tls_key: str | None = None
    tls_ca: str | None = None
    """PEM CA bundle: clients must present a certificate it signed (mTLS)."""
    grace_seconds: float = 30.0
    """On SIGTERM: how long running requests may take to finish before they are cancelled."""
    max_upload_bytes: int = 1 << 30
    """Largest UploadAdapter (all files together)."""
    max_adapter_labels: int = 64
    """Distinct adapter names that get their own metrics label; later ones are counted as `other`."""
    stats_flush_seconds: float = 30.0
    """How often adapter use counts are written to the registry (also on shutdown)."""
    max_message_bytes: int = 16 << 20
    """Largest gRPC message received. Text requests larger than their context could use are refused
    INVALID_ARGUMENT naming the field, unparsed; past this limit gRPC itself refuses them
    (RESOURCE_EXHAUSTED, without the field, but before the event loop spends ~3 ms per MB receiving them)."""
    request_workers: int = 2
    """Threads that validate and tokenize requests, off the event loop."""
    max_pending_requests: int = 256
    """Requests waiting for a worker thread; beyond it RESOURCE_EXHAUSTED at once."""
    min_free_disk_bytes: int = 256 << 20
    """Registrations and uploads are refused when they would leave less free space on the state dir's disk."""
    strict_base: bool = False
    """Refuse adapters whose adapter_config.json names another base model (or none); default: register
    them with a warning in AdapterInfo.warnings and the log."""
    adapter_sources: tuple[str, ...] = ()
    """`PATTERN=SOURCE` rules (adapters/source_rules.py): an unknown adapter name a request asks for is
    registered on first use from the first rule that matches it, once however many requests ask together."""
    hf_endpoint: str | None = None
    """Hub for hf:// sources; None = huggingface_hub's (HF_ENDPOINT, else huggingface.co)."""
    hf_cache_dir: str | None = None
    """huggingface_hub cache read before downloading (offline: only it); None = HF_HUB_CACHE."""
    s3_endpoint_url: str | None = None
    """S3-compatible endpoint for s3:// sources; None = boto3's (AWS_ENDPOINT_URL, else AWS)."""
    s3_region: str | None = None
    """Region for s3:// sources; None = boto3's (AWS_DEFAULT_REGION, else us-east-1)."""
    registry_url: str = field(default="", repr=False)
    """postgresql://... : the registry many replicas share (adapters/pg_store.py); "" = the state dir's own."""
    shared_adapter_dir: str = ""
    """With registry_url: where every adapter version's files are kept: a folder every replica mounts, or
    s3://bucket/prefix (each replica then keeps its own copies in state_dir)."""

    def __post_init__(self):
        problems = []
        for name in ("port", "http_port", "health_port", "metrics_port"):
            if getattr(self, name) is not None and not 0 <= getattr(self, name) <= 65535:
                problems.append(f"{name}={getattr(self, name)} (0..65535)")
        if bool(self.tls_cert) != bool(self.tls_key):
            problems.append("tls_cert and tls_key go together")
        if self.tls_ca and not self.tls_cert:
            problems.append("tls_ca (client certificates) needs tls_cert and tls_key")
        if any(not t for t in (*self.admin_tokens, *self.generation_tokens)):
            problems.append("tokens must not be empty")
        if self.grace_seconds < 0:
            problems.append(f"grace_seconds={self.grace_seconds} (>= 0)")
        if self.max_upload_bytes < 1:
            problems.append(f"max_upload_bytes={self.max_upload_bytes} (>= 1)")
        if self.max_adapter_labels < 0:
            problems.append(f"max_adapter_labels={self.max_adapter_labels} (>= 0)")
        if self.max_message_bytes < 1 << 20:
            problems.append(f"max_message_bytes={self.max_message_bytes} (>= 1 MiB: upload chunks are 1 MiB)")
        for name in ("request_workers", "max_pending_requests"):
            if getattr(self, name) < 1:
                problems.append(f"{name}={getattr(self, name)} (>= 1)")
        if self.min_free_disk_bytes < 0:
            problems.append(f"min_free_disk_bytes={self.min_free_disk_bytes} (>= 0)")
        if not self.state_dir:
            problems.append("state_dir is empty")
        if self.registry_url and not self.registry_url.startswith(("postgresql://", "postgres://")):
            problems.append("registry_url must start with postgresql:// (or be empty: the state dir's registry)")
        if bool(self.registry_url) != bool(self.shared_adapter_dir):
            problems.append("registry_url and shared_adapter_dir go together (records in PostgreSQL, files on a "
                            "volume every replica mounts)")
        for text in self.adapter_sources:
            try:
                parse_rule(text)
            except ValueError as exc:
                problems.append(str(exc))
        _raise_if(problems, "service config")
