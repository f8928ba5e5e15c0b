"""Paged attention on CUDA: check the Triton kernels against the PyTorch twin, then time them (compact tables).

    source scripts/device_env.sh && python benchmarks/attention_device_check.py [--quick]

Sections (each row prints PASS/FAIL or a time; an exception prints and the run continues):
  1. parity: Triton vs twin, relative error, over dtypes x SmolLM2/Llama-3-8B heads x decode/prefill/mixed
     (+ window, split-KV), write_kv vs index_copy_, CUDA-graph replay vs eager, determinism;
  2. decode (Llama-3-8B heads, bf16, one layer): Triton (auto split-KV / single pass) vs the PyTorch twin
     (gather-based, like the engine's attention before the Triton kernel), microseconds and KV bytes read per second;
  3. prefill and mixed steps: Triton vs the PyTorch twin vs SDPA causal on contiguous K/V;
  4. launch-config sweep for decode and prefill; 5. write_kv: Triton vs two index_copy_.
"""
from __future__ import annotations

import argparse
import random
import sys
import time
import traceback
from pathlib import Path

import torch
import triton

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests.attention helpers

from loraplex.server.attention import reference, triton_paged  # noqa: E402
from loraplex.server.attention.meta import AttentionMetaBuffers, AttentionStepMeta  # noqa: E402
from tests.attention.test_reference import make_case  # noqa: E402

LLAMA, SMOL = (32, 8, 128), (9, 3, 64)
BS = 16
TOL = {torch.float32: 2e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}
STARTED = time.monotonic()
FAILURES: list[str] = []


def row(*cells, widths=(34, 12, 12, 12, 12, 12)):
    print("".join(str(c).ljust(w) for c, w in zip(cells, widths)), flush=True)


def guarded(name):
    def wrap(fn):
        def run(*args, **kwargs):
            try:
                return fn(*args, **kwargs)
            except Exception as error:  # report and continue with the next row
                FAILURES.append(name)
                print(f"ERROR {name}: {error!r}", flush=True)
                traceback.print_exc(limit=3)
        return run
    return wrap


def rel_err(a, b):
    return float((a.float() - b.float()).norm() / b.float().norm())


def bench_us(fn):
    return triton.testing.do_bench(fn, warmup=10, rep=40, return_mode="median") * 1000


def random_cache(seq_lens, heads, dtype, seed=0):
    """Caches holding every sequence in scattered blocks, and each sequence's block table."""
    _, kv_heads, head_dim = heads
    counts = [-(-n // BS) for n in seq_lens]
    gen = torch.Generator(device="cuda").manual_seed(seed)
    shape = (sum(counts) + 1, BS, kv_heads, head_dim)
    k = torch.randn(shape, device="cuda", generator=gen).to(dtype)
    v = torch.randn(shape, device="cuda", generator=gen).to(dtype)
    perm = (torch.randperm(sum(counts), generator=torch.Generator().manual_seed(seed)) + 1).tolist()
    tables, start = [], 0
    for n in counts:
        tables.append(perm[start:start + n])
        start += n
    return k, v, tables


# --------------------------------------------------------------------------------------------- 1. parity

@guarded("parity")
def parity_row(name, seq_lens, query_lens, heads, dtype, window=None, segments=None):
    case = make_case(seq_lens, query_lens, *heads, block_size=BS, dtype=dtype, device="cuda", q_std=3.0)
    scale = heads[2] ** -0.5
    got = triton_paged.paged_attention(case.q, case.k_cache, case.v_cache, case.meta, scale, window,
                                       num_segments=segments)
    want = reference.paged_attention(case.q, case.k_cache, case.v_cache, case.meta, scale, window)
    err = rel_err(got, want)
    again = triton_paged.paged_attention(case.q, case.k_cache, case.v_cache, case.meta, scale, window,
                                         num_segments=segments)
    ok = torch.isfinite(got).all().item() and err <= TOL[dtype] and torch.equal(got, again)
    if not ok:
        FAILURES.append(name)
    row(name, str(dtype).split(".")[-1], f"{err:.1e}", "det" if torch.equal(got, again) else "NONDET",
        "PASS" if ok else "FAIL")


@guarded("write_kv parity")
def write_kv_parity():
    k = torch.randn(300, 8, 128, device="cuda").bfloat16()
    v = torch.randn(300, 8, 128, device="cuda").bfloat16()
    index = torch.randperm(64 * BS, device="cuda")[:300]
    caches = [torch.full((64, BS, 8, 128), float("nan"), device="cuda", dtype=torch.bfloat16) for _ in range(4)]
    triton_paged.write_kv(caches[0], caches[1], k, v, index)
    reference.write_kv(caches[2], caches[3], k, v, index)
    ok = all(torch.equal(a.nan_to_num(7.0), b.nan_to_num(7.0)) for a, b in ((caches[0], caches[2]),
                                                                           (caches[1], caches[3])))
    FAILURES.extend([] if ok else ["write_kv"])
    row("write_kv vs index_copy_", "bf16", "", "", "PASS" if ok else "FAIL")


@guarded("cuda graph")
def graph_parity(bucket=8, num_seqs=5):
    k_cache, v_cache, tables = random_cache([2048] * num_seqs, LLAMA, torch.bfloat16)
    buffers = AttentionMetaBuffers(bucket, bucket, 160, "cuda", block_size=BS)
    q = torch.randn(bucket, 32, 128, device="cuda").bfloat16()
    lens = [random.Random(1).randint(100, 2000) for _ in range(num_seqs)]
    fill = lambda step: buffers.fill([1] * num_seqs, [n + step for n in lens], tables, num_seqs=bucket,  # noqa
                                     num_tokens=bucket)
    meta = fill(0)
    fwd = lambda m: triton_paged.paged_attention(q, k_cache, v_cache, m, 0.088, None)  # noqa: E731
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fwd(meta)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fwd(meta)
    ok = True
    for step in range(1, 4):
        meta = fill(step)
        q.normal_()
        graph.replay()
        ok &= torch.equal(out.clone(), fwd(meta))
    FAILURES.extend([] if ok else ["cuda graph"])
    row(f"graph replay == eager (b{num_seqs}->{bucket})", "bf16", "", "", "PASS" if ok else "FAIL")


def parity():
    print("\n== 1. parity: Triton vs twin (relative error), determinism", flush=True)
    row("case", "dtype", "rel err", "repeat", "result")
    rng = random.Random(0)
    decode32 = [rng.randint(1, 4096) for _ in range(32)]
    for heads, tag in ((SMOL, "smol"), (LLAMA, "8b")):
        for dtype in (torch.bfloat16, torch.float16, torch.float32):
            parity_row(f"{tag} decode b1 ctx4096 (split)", [4096], [1], heads, dtype)
            parity_row(f"{tag} decode b32 ctx<=4096", decode32, [1] * 32, heads, dtype)
            parity_row(f"{tag} chunk 512 at 1024", [1536], [512], heads, dtype)
            parity_row(f"{tag} mixed", [4096, 300, 1000, 17, 2048, 1], [1, 300, 128, 1, 1, 1], heads, dtype)
        parity_row(f"{tag} mixed window 256", [4096, 300, 1000, 17], [1, 300, 128, 1], heads, torch.bfloat16, 256)
        parity_row(f"{tag} decode b32 seg 1", decode32, [1] * 32, heads, torch.bfloat16, None, 1)
        parity_row(f"{tag} decode b32 seg 16", decode32, [1] * 32, heads, torch.bfloat16, None, 16)
    write_kv_parity()
    graph_parity()


# --------------------------------------------------------------------------------------------- 2-5. timing

@guarded("decode timing")
def decode_row(batch, context):
    k_cache, v_cache, tables = random_cache([context] * batch, LLAMA, torch.bfloat16)
    meta = AttentionStepMeta.from_lists(tables, [context] * batch, [1] * batch, BS, "cuda")
    q = torch.randn(batch, 32, 128, device="cuda").bfloat16()
    segments = triton_paged.default_num_segments(meta, 8, q.device)
    auto = bench_us(lambda: triton_paged.paged_attention(q, k_cache, v_cache, meta, 0.088, None))
    single = bench_us(lambda: triton_paged.paged_attention(q, k_cache, v_cache, meta, 0.088, None, num_segments=1))
    old = bench_us(lambda: reference.paged_attention(q, k_cache, v_cache, meta, 0.088, None))
    gbps = 2 * batch * context * 8 * 128 * 2 / (min(auto, single) * 1e-6) / 1e9
    row(f"b{batch} ctx{context} (seg {segments})", f"{auto:.1f}", f"{single:.1f}", f"{old:.1f}", f"{gbps:.0f}",
        f"x{old / min(auto, single):.1f}")


@guarded("prefill timing")
def prefill_row(name, seq_lens, query_lens):
    k_cache, v_cache, tables = random_cache(seq_lens, LLAMA, torch.bfloat16)
    meta = AttentionStepMeta.from_lists(tables, seq_lens, query_lens, BS, "cuda")
    q = torch.randn(sum(query_lens), 32, 128, device="cuda").bfloat16()
    ours = bench_us(lambda: triton_paged.paged_attention(q, k_cache, v_cache, meta, 0.088, None))
    old = bench_us(lambda: reference.paged_attention(q, k_cache, v_cache, meta, 0.088, None))
    flops = sum(4 * 32 * 128 * ql * (n - ql / 2) for n, ql in zip(seq_lens, query_lens))
    flash = ""
    if len(seq_lens) == 1:  # SDPA causal on contiguous K/V: a floor, not paged
        qd = q.transpose(0, 1)[None]
        kd = torch.randn(1, 32, seq_lens[0], 128, device="cuda").bfloat16()
        causal = seq_lens[0] == query_lens[0]
        sdpa = torch.nn.functional.scaled_dot_product_attention
        flash = f"{bench_us(lambda: sdpa(qd, kd, kd, is_causal=causal)):.0f}"
    row(name, f"{ours:.0f}", f"{old:.0f}", flash, f"{flops / (ours * 1e-6) / 1e12:.0f}", f"x{old / ours:.1f}")


@guarded("config sweep")
def sweep(name, seq_lens, query_lens, configs):
    k_cache, v_cache, tables = random_cache(seq_lens, LLAMA, torch.bfloat16)
    meta = AttentionStepMeta.from_lists(tables, seq_lens, query_lens, BS, "cuda")
    q = torch.randn(sum(query_lens), 32, 128, device="cuda").bfloat16()
    times = []
    for cfg in configs:
        try:
            call = lambda: triton_paged.paged_attention(q, k_cache, v_cache, meta, 0.088, None, config=cfg)  # noqa
            times.append(f"{bench_us(call):.0f}")
        except Exception as error:  # e.g. out of shared memory
            times.append(type(error).__name__[:10])
    row(name, *times, widths=(34,) + (12,) * len(configs))


@guarded("write_kv timing")
def write_kv_row(tokens):
    k_cache = torch.zeros(4096, BS, 8, 128, device="cuda").bfloat16()
    v_cache = torch.zeros_like(k_cache)
    qkv = torch.randn(tokens, 48, 128, device="cuda").bfloat16()
    k, v = qkv[:, 32:40], qkv[:, 40:]
    index = torch.randperm(4096 * BS, device="cuda")[:tokens]
    ours = bench_us(lambda: triton_paged.write_kv(k_cache, v_cache, k, v, index))
    theirs = bench_us(lambda: reference.write_kv(k_cache, v_cache, k, v, index))
    row(f"write_kv T={tokens}", f"{ours:.1f}", f"{theirs:.1f}")


def timing(quick: bool):
    print("\n== 2. decode, Llama-3-8B heads (32/8/128), bf16, one layer: microseconds", flush=True)
    row("batch x context", "triton", "1 segment", "torch twin", "KV GB/s", "speed-up")
    for batch in (1, 8, 32, 64):
        for context in ((2048,) if quick else (512, 2048, 8192)):
            decode_row(batch, context)
    print("\n== 3. prefill / mixed, Llama-3-8B heads, bf16, one layer: microseconds", flush=True)
    row("step", "triton", "torch twin", "sdpa flash", "TFLOP/s", "speed-up")
    prefill_row("prompt 2048 from 0", [2048], [2048])
    prefill_row("prompt 128 from 0", [128], [128])
    prefill_row("chunk 512 at 4096", [4608], [512])
    prefill_row("32 decodes@2048 + chunk 512", [2048] * 32 + [512], [1] * 32 + [512])
    if time.monotonic() - STARTED > 100 or quick:
        return
    print("\n== 4. launch configs (block_m, block_n, warps, stages): microseconds", flush=True)
    cfg = triton_paged.LaunchConfig
    decode_cfgs = [cfg(16, 32, 4, 2), cfg(16, 64, 4, 2), cfg(16, 64, 4, 3), cfg(16, 128, 4, 2), cfg(16, 64, 8, 2)]
    prefill_cfgs = [cfg(64, 64, 4, 2), cfg(64, 64, 4, 3), cfg(128, 64, 8, 2), cfg(128, 32, 4, 2), cfg(64, 32, 4, 3)]
    row("config", *[f"{c.block_m},{c.block_n},{c.num_warps},{c.num_stages}" for c in decode_cfgs],
        widths=(34,) + (12,) * 5)
    sweep("decode b32 ctx2048", [2048] * 32, [1] * 32, decode_cfgs)
    row("config", *[f"{c.block_m},{c.block_n},{c.num_warps},{c.num_stages}" for c in prefill_cfgs],
        widths=(34,) + (12,) * 5)
    sweep("prompt 2048 from 0", [2048], [2048], prefill_cfgs)
    print("\n== 5. write_kv: microseconds", flush=True)
    row("tokens", "triton", "index_copy_")
    for tokens in (32, 2048):
        write_kv_row(tokens)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="fewer timing rows, no sweep")
    args = parser.parse_args()
    assert torch.cuda.is_available(), "needs a CUDA device"
    print(f"{torch.cuda.get_device_name()} | torch {torch.__version__} | triton {triton.__version__} | "
          f"SMs {torch.cuda.get_device_properties(0).multi_processor_count}", flush=True)
    parity()
    timing(args.quick)
    print(f"\n{len(FAILURES)} failure(s){': ' + ', '.join(FAILURES) if FAILURES else ''}; "
          f"{time.monotonic() - STARTED:.0f} s", flush=True)
    sys.exit(1 if FAILURES else 0)


if __name__ == "__main__":
    main()
