"""`loraplex demo`: start `loraplex serve` on a free local port, then be its client.

Registers the example adapters (caps, pirate, legal), calls Generate for the base model, each adapter
and the 50/50 mix of caps and pirate (at once: they share batches), streams one answer, and stops the
server with SIGTERM (it drains and exits 0).
"""
from __future__ import annotations

import argparse
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from ..demo import QUESTION, check_example_adapters, default_adapters_dir
from ..errors import ModelLoadError
from .convert import adapter_version

NAMES = ("caps", "pirate", "legal")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _adapters_dir(args) -> Path:
    if args.adapters_dir:
        return Path(args.adapters_dir).resolve()
    for candidate in (default_adapters_dir(), Path.cwd() / "examples" / "adapters"):
        if candidate.is_dir():
            return candidate.resolve()
    return default_adapters_dir()


def serve_command(port: int, state_dir: str, adapters_dir: Path, args) -> list[str]:
    command = [sys.executable, "-m", "loraplex.server.cli", "serve", "--port", str(port), "--no-metrics",
               "--state-dir", state_dir, "--adapter-root", str(adapters_dir), "--quantization", args.quantization,
               "--max-lora-rank", "16", "--max-loras", "4", "--max-cpu-loras", "8", "--max-num-seqs", "8",
               "--max-num-batched-tokens", "256", "--grace-seconds", "10"]
    for flag in ("model", "dtype", "device"):
        if getattr(args, flag):
            command += [f"--{flag}", getattr(args, flag)]
    return command


def run_server_demo(args: argparse.Namespace) -> int:
    from loraplex.client import Client

    adapters_dir = _adapters_dir(args)
    check_example_adapters(adapters_dir, list(NAMES))
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="loraplex-demo-") as state_dir:
        log_path = Path(state_dir) / "server.log"
        started = time.monotonic()
        with open(log_path, "w") as log:
            server = subprocess.Popen(serve_command(port, state_dir + "/state", adapters_dir, args),
                                      stdout=log, stderr=subprocess.STDOUT)
        try:
            with Client(f"127.0.0.1:{port}") as client:
                print(f"loraplex serve: starting on 127.0.0.1:{port} (pid {server.pid}) ...", flush=True)
                try:
                    client.wait_ready(timeout=600, alive=lambda: server.poll() is None)
                except (RuntimeError, TimeoutError) as exc:
                    tail = "\n".join(log_path.read_text().splitlines()[-15:])
                    raise ModelLoadError(f"{exc}; its log ends with:\n{tail}") from None
                info = client.model_info()
                print(f"server SERVING in {time.monotonic() - started:.1f} s: {info.base_model}, "
                      f"{info.quantization}, {info.device}\n")
                for name in NAMES:
                    adapter = client.register_adapter(name, str(adapters_dir / name))
                    print(f"RegisterAdapter {name!r}: version {adapter.version}, rank {adapter.rank}, "
                          f"targets {', '.join(adapter.target_modules)}")
                _generate_all(client, args.max_new_tokens)
                _stream_one(client, args.max_new_tokens)
        finally:
            server.send_signal(signal.SIGTERM)
            try:
                code = server.wait(timeout=60)
            except subprocess.TimeoutExpired:
                server.kill()
                code = server.wait()
        print(f"\nserver stopped (SIGTERM -> exit {code})")
        return 0 if code == 0 else 1


def _chat(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def _generate_all(client, max_new_tokens: int) -> None:
    rows = [("base model", {}), ("adapter 'caps'", dict(adapter="caps")), ("adapter 'pirate'", dict(adapter="pirate")),
            ("adapter 'legal'", dict(adapter="legal")),
            ("mix 0.5 caps + 0.5 pirate", dict(adapters={"caps": 0.5, "pirate": 0.5}))]
    started = time.monotonic()
    with ThreadPoolExecutor(len(rows)) as pool:  # concurrent: the engine batches them together
        results = list(pool.map(lambda kw: client.generate(messages=_chat(QUESTION), max_new_tokens=max_new_tokens,
                                                           **kw), [kw for _, kw in rows]))
    seconds = time.monotonic() - started
    print(f"\nQ: {QUESTION}\n")
    for (label, _), result in zip(rows, results):
        versions = adapter_version(result.adapter_versions)
        print(f"[Generate: {label}]" + (f" ({versions})" if versions else ""))
        print(textwrap.indent(textwrap.fill(result.text.strip(), 88), "  "))
        print()
    tokens = sum(r.generated_tokens for r in results)
    print(f"{len(rows)} concurrent Generate calls: {tokens} tokens in {seconds:.1f} s")


def _stream_one(client, max_new_tokens: int) -> None:
    question = "Tell me about the sea."
    print(f"\n[GenerateStream: adapter 'pirate'] {question}\n  ", end="", flush=True)
    last = None
    for last in client.stream(messages=_chat(question), adapter="pirate", max_new_tokens=max_new_tokens):
        print(last.text, end="", flush=True)
    print(f"\n  (stop_reason {last.stop_reason.name}, {last.generated_tokens} tokens)")
