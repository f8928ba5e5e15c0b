"""PostgreSQL and nginx from Debian's packages, run for the tests on 127.0.0.1 (installed when missing).

We run as root; PostgreSQL refuses root, so its data dir (a fresh temporary folder, on a free port, socket
in the same folder) belongs to the `postgres` user and its commands run through `runuser`. nginx runs in
the foreground from a generated config with its temporary files in its own folder. Both are stopped after.
"""
from __future__ import annotations

import glob
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from ..debian_packages import ensure_packages
from .conftest import free_port


def _postgres_bin() -> Path:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"))
    if not found:
        ensure_packages("postgresql")
        found = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"))
    return Path(found[-1]).parent


class Postgres:
    """One throwaway PostgreSQL cluster; `url` reaches its `postgres` database as the superuser."""

    def __init__(self):
        self.bin = _postgres_bin()
        self.port = free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="loraplex-pg-"))
        os.chmod(self.dir, 0o755)
        self.data = self.dir / "data"
        self.data.mkdir()
        shutil.chown(self.dir, "postgres", "postgres")
        shutil.chown(self.data, "postgres", "postgres")
        self._as_postgres("initdb", "-D", str(self.data), "-A", "trust", "-U", "postgres", "--no-sync",
                          "-E", "UTF8")
        self.start()

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def _as_postgres(self, tool: str, *args: str) -> None:
        subprocess.run(["runuser", "-u", "postgres", "--", str(self.bin / tool), *args], check=True,
                       capture_output=True, timeout=120)

    def start(self) -> None:
        options = f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1 -c fsync=off"
        self._as_postgres("pg_ctl", "-D", str(self.data), "-o", options, "-l", str(self.dir / "log"), "-w",
                          "start")

    def stop(self, mode: str = "fast") -> None:
        """`immediate`: as a crash (no checkpoint; what is committed comes back from the WAL)."""
        self._as_postgres("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "stop")

    def close(self) -> None:
        try:
            self.stop("immediate")
        except subprocess.CalledProcessError:
            pass  # already stopped
        shutil.rmtree(self.dir, ignore_errors=True)


class Nginx:
    """nginx in the foreground with `http_block` (an `http { ... }` body) as its whole configuration; its access
    log has one line per request: the x-loraplex-adapter header ("-" when none) and the replica it went to."""

    def __init__(self, http_block: str):
        if shutil.which("nginx") is None and not Path("/usr/sbin/nginx").exists():
            ensure_packages("nginx")
        self.dir = Path(tempfile.mkdtemp(prefix="loraplex-nginx-"))
        temp = "".join(f"    {kind}_temp_path {self.dir}/{kind};\n"
                       for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
        (self.dir / "nginx.conf").write_text(
            f"daemon off;\nworker_processes 1;\npid {self.dir}/nginx.pid;\nerror_log {self.dir}/error.log warn;\n"
            f"events {{ worker_connections 1024; }}\nhttp {{\n"
            f"    log_format routing '$http_x_loraplex_adapter $upstream_addr';\n"
            f"    access_log {self.dir}/access.log routing;\n{temp}{http_block}\n}}\n")
        binary = shutil.which("nginx") or "/usr/sbin/nginx"
        check = subprocess.run([binary, "-t", "-p", str(self.dir), "-c", str(self.dir / "nginx.conf")],
                               capture_output=True, text=True)
        assert check.returncode == 0, check.stderr
        self.process = subprocess.Popen([binary, "-p", str(self.dir), "-c", str(self.dir / "nginx.conf")],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        time.sleep(0.3)
        assert self.process.poll() is None, self.process.stderr.read().decode()

    def routed(self) -> list[tuple[str, str]]:
        """(header, upstream address) of every request so far (a retried one: its addresses joined by ', ')."""
        path = self.dir / "access.log"
        lines = path.read_text().splitlines() if path.exists() else []
        return [tuple(line.split(" ", 1)) for line in lines]

    def close(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        shutil.rmtree(self.dir, ignore_errors=True)
