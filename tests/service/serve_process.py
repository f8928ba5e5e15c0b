"""A real `loraplex serve` in a subprocess (the chaos and many-replica tests kill it with SIGKILL)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from loraplex.client import NO_RETRY, Client, ClientConfig

from .conftest import free_port


class Serve:
    """`loraplex serve` on the embedded model (fp32) in a subprocess."""

    def __init__(self, state: Path, root: Path, log: Path, extra: tuple[str, ...] = ()):
        self.port = free_port()
        command = [sys.executable, "-m", "loraplex.server.cli", "serve", "--quantization", "none",
                   "--port", str(self.port), "--no-metrics", "--state-dir", str(state), "--adapter-root", str(root),
                   "--max-lora-rank", "16", "--max-loras", "4", "--max-cpu-loras", "8",
                   "--kv-cache-bytes", str(64 << 20), "--max-model-len", "512", "--grace-seconds", "1",
                   "--min-free-disk-bytes", "0", *extra]
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        self.log = open(log, "a")
        self.process = subprocess.Popen(command, stdout=self.log, stderr=subprocess.STDOUT, env=env)
        self.client = Client(ClientConfig(target=f"127.0.0.1:{self.port}", timeout=60, retry=NO_RETRY))
        self.client.wait_ready(180, alive=lambda: self.process.poll() is None)

    def kill(self) -> None:
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(30)
        self.client.channel.close()
        self.log.close()

    def stop(self) -> int:
        self.process.send_signal(signal.SIGTERM)
        code = self.process.wait(60)
        self.client.channel.close()
        self.log.close()
        return code
