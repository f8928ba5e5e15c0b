"""Running a test file under Triton's interpreter (TRITON_INTERPRET=1) on a CPU machine.

Triton reads TRITON_INTERPRET when it and each kernel are first imported. A test file calls `interpret_if_fresh()`
before importing its kernels: on a CPU-only machine where nothing imported triton yet, the whole process may
interpret. Where triton was already imported in compiled mode, the file's `rerun_interpreted(__file__)` test runs
the file again in a fresh interpreted process.
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch


def interpret_if_fresh(gpu_file: str) -> None:
    """Skip the module on a CUDA machine (`gpu_file` runs the compiled kernels); turn the interpreter on if triton
    has not been imported yet."""
    if torch.cuda.is_available():
        pytest.skip(f"a CUDA machine runs the compiled kernels ({gpu_file})", allow_module_level=True)
    if "triton" not in sys.modules:
        os.environ["TRITON_INTERPRET"] = "1"


def rerun_interpreted(test_file: str, interpreted: bool) -> None:
    """The body of a file's `test_in_a_fresh_interpreted_process`: when this process compiles Triton, run
    `test_file` again in a process that starts with TRITON_INTERPRET=1 and require it to pass."""
    if interpreted:
        pytest.skip("this process interprets Triton")
    result = subprocess.run([sys.executable, "-m", "pytest", test_file, "-q", "-p", "no:cacheprovider"],
                            env=dict(os.environ, TRITON_INTERPRET="1"), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-3000:]
    assert " passed" in result.stdout
