"""Offline sm_90 compiles of the NF4 kernels (no GPU): shared memory, registers and SASS of the hot loop.

Uses Triton's bundled ptxas / nvdisasm / cuobjdump, so CPU machines can check what a config costs on an H100/H200:
`loop_stats` counts the instructions of the kernel's main loop, which divided by the weight elements a thread
handles per iteration gives the instructions per weight element used for predictions (see `describe`).

    python -m loraplex.server.nf4.sass lut:8:16:256:1:8:8 gemm:16:128:128:4:4     # kernel:m:n:k:split:warps[:kw]
"""
from __future__ import annotations

import collections
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass

import torch

from .kernel_config import KernelConfig

_TL_NAMES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}


def _bin(tool: str) -> str:
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", tool)


def available() -> bool:
    """Whether this machine can compile for sm_90 (Triton's NVIDIA backend and its ptxas / nvdisasm)."""
    try:
        return all(os.access(_bin(t), os.X_OK) for t in ("ptxas", "nvdisasm", "cuobjdump"))
    except ImportError:
        return False


@dataclass
class Compiled:
    shared: int
    """Dynamic shared memory the launch asks for (bytes)."""
    registers: int
    spills: int
    """Local-memory instructions (LDL/STL) in the whole kernel."""
    sass: str

    def loop(self) -> tuple[int, collections.Counter]:
        """(instructions, opcode counts) of the longest backward branch: the K loop."""
        lines = self.sass.splitlines()
        labels = {m.group(1): i for i, line in enumerate(lines) if (m := re.match(r"^(\.L_x_\d+):", line))}
        best = None
        for i, line in enumerate(lines):
            m = re.search(r"BRA `\((\.L_x_\d+)\)", line)
            if m and m.group(1) in labels and labels[m.group(1)] < i:
                if best is None or i - labels[m.group(1)] > best[1] - best[0]:
                    best = (labels[m.group(1)], i)
        if best is None:
            return 0, collections.Counter()
        ops = [m.group(1) for line in lines[best[0]:best[1] + 1]
               if (m := re.match(r"^\s+/\*[0-9a-f]+\*/\s+(?:@!?U?P\w+\s+)?([A-Z0-9_]+)", line))]
        return len(ops), collections.Counter(ops)


def _finish(kernel) -> Compiled:
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.cubin")
        with open(path, "wb") as f:
            f.write(kernel.asm["cubin"])
        sass = subprocess.run([_bin("nvdisasm"), "-c", path], capture_output=True, text=True, check=True).stdout
        res = subprocess.run([_bin("cuobjdump"), "-res-usage", path], capture_output=True, text=True).stdout
    m = re.search(r"REG:(\d+)", res)
    spills = len(re.findall(r"\b(?:LDL|STL)\b", sass))
    return Compiled(shared=kernel.metadata.shared, registers=int(m.group(1)) if m else -1, spills=spills, sass=sass)


def _signature(fn, consts: dict, dtype: torch.dtype) -> tuple[dict, dict]:
    t = _TL_NAMES[dtype]
    types = {"x_ptr": f"*{t}", "out_ptr": f"*{t}", "bias_ptr": f"*{t}", "packed_ptr": "*u8", "absq_ptr": "*u8",
             "lut_ptr": "*i32"}
    sig, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in consts:
            sig[name] = "constexpr"
        else:
            sig[name] = types.get(name, "*fp32" if name.endswith("_ptr") else "i32")
            if name.endswith("_ptr") or name in ("K", "N_OUT", "N_ROWS", "stride_xm", "K_SPLIT"):
                attrs[(i,)] = [["tt.divisibility", 16]]
    return sig, attrs


def compile_config(cfg: KernelConfig, dtype: torch.dtype = torch.bfloat16, gated: bool = False,
                   has_bias: bool = False, q_vec: int = 1) -> Compiled:
    """Compile the kernel `cfg` launches for sm_90 (the flags the CUDA launcher would pass)."""
    import triton
    import triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    target = GPUTarget("cuda", 90, 32)
    if cfg.kernel == "lut":
        from triton.experimental.gluon._runtime import GluonASTSource

        from . import gluon_lut

        kw, wn = cfg.k_warps, cfg.num_warps // cfg.k_warps
        rt, nb = cfg.block_n // (16 * wn), cfg.block_k // 64
        consts = dict(KW=kw, WN=wn, RT=rt, NB=nb, BMP=cfg.block_m, GATED=gated, HAS_BIAS=has_bias,
                      LDS=cfg.lut == "lds", QV=q_vec, **gluon_lut.layouts(kw, wn, rt, nb, cfg.block_m))
        sig, attrs = _signature(gluon_lut.lut_kernel, consts, dtype)
        options = {"num_warps": cfg.num_warps, **({"maxnreg": cfg.max_regs} if cfg.max_regs else {})}
        kernel = triton.compile(GluonASTSource(gluon_lut.lut_kernel, sig, consts, attrs), target=target,
                                options=options)
        return _finish(kernel)
    from .triton_gemm import gemm_kernel
    from .triton_gemv import gemv_kernel

    tl_dtype = {torch.bfloat16: tl.bfloat16, torch.float16: tl.float16, torch.float32: tl.float32}[dtype]
    flags = dict(GATED=gated, HAS_BIAS=has_bias, OUT_DTYPE=tl_dtype, EXACT=True,
                 ASM=cfg.decode_asm and dtype != torch.float32)
    if cfg.kernel == "gemv":
        fn, consts = gemv_kernel, dict(BM=cfg.block_m, BN=cfg.block_n, NB=cfg.block_k // 64, **flags)
    else:
        fn, consts = gemm_kernel, dict(BM=cfg.block_m, BN=cfg.block_n, BK=cfg.block_k, SWAP_AB=cfg.swap_ab,
                                       INPUT_PRECISION="ieee" if dtype == torch.float32 else None, **flags)
    sig, attrs = _signature(fn, consts, dtype)
    kernel = triton.compile(ASTSource(fn, sig, consts, attrs), target=target,
                            options={"num_warps": cfg.num_warps, "num_stages": cfg.num_stages})
    return _finish(kernel)


def elements_per_iteration(cfg: KernelConfig, gated: bool = False) -> int:
    """Weight elements one thread handles per iteration of the K loop (per weight operand set, x2 when gated)."""
    threads = 32 * cfg.num_warps
    if cfg.kernel == "lut":
        return (cfg.block_n * cfg.block_k * cfg.k_warps // threads) * (2 if gated else 1)
    return cfg.block_n * cfg.block_k // threads * (2 if gated else 1)


def describe(cfg: KernelConfig, dtype: torch.dtype = torch.bfloat16, gated: bool = False) -> str:
    c = compile_config(cfg, dtype, gated)
    n, ops = c.loop()
    per = n / max(1, elements_per_iteration(cfg, gated))
    top = " ".join(f"{k}:{v}" for k, v in ops.most_common(12))
    return (f"{cfg}\n  shared {c.shared} B, {c.registers} regs, {c.spills} spill instr, loop {n} instr = "
            f"{per:.2f} per weight element  [{top}]")


if __name__ == "__main__":
    for arg in sys.argv[1:]:
        kind, *nums = arg.split(":")
        m, n, k, split, warps, *rest = map(int, nums)
        extra = dict(k_warps=rest[0]) if kind == "lut" and rest else {}
        print(describe(KernelConfig(kind, block_m=m, block_n=n, block_k=k, split_k=split, num_warps=warps,
                                    swap_ab=kind == "gemm" and m <= 64, **extra)))
