"""Debian packages the tests run for real (PostgreSQL, nginx, Prometheus), installed when missing.

The test setup installs what a test needs (nothing runs on a fresh machine); when that is impossible the test
fails with apt's own words: a service test that cannot get its service must not pass as skipped."""
from __future__ import annotations

import os
import shutil
import subprocess

import pytest


def ensure_packages(*packages: str) -> None:
    """apt-get install `packages` (after `apt-get update` if the first try fails); pytest.fail if impossible."""
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    install = ["apt-get", "install", "-y", "-q", "--no-install-recommends", *packages]
    result = subprocess.run(install, env=env, capture_output=True, text=True, timeout=600)
    if result.returncode != 0:
        subprocess.run(["apt-get", "update", "-q"], env=env, capture_output=True, timeout=600)
        result = subprocess.run(install, env=env, capture_output=True, text=True, timeout=600)
    if result.returncode != 0:
        pytest.fail(f"cannot install Debian's {' '.join(packages)}: {result.stderr.strip()[-500:]}")


def debian_binary(name: str, package: str, fallback: str | None = None) -> str:
    """Path of `name` (on PATH, or at `fallback`), installing `package` first when it is missing."""
    def find() -> str | None:
        found = shutil.which(name)
        return found or (fallback if fallback and os.path.exists(fallback) else None)
    found = find()
    if found is None:
        ensure_packages(package)
        found = find()
    assert found, f"{name} not found after installing Debian's {package}"
    return found
