"""Our paged CausalLM against transformers: per-architecture logit parity on tiny random models, paged and
batched behaviour (chunked prefill, decode, mixed steps, garbage in unused KV blocks), the embedded model,
NF4 against transformers + bitsandbytes, and llama3 RoPE frequencies."""
from __future__ import annotations

import pytest
import torch

from loraplex.server.config import ModelConfig
from loraplex.server.model.arch import inverse_frequencies, load_arch
from loraplex.server.model.loader import load_model

from .harness import (PagedSequence, SeqChunk, blocks_needed, hf_logits, new_kv_cache, randomize_, rel_err,
                      run_step, saved_config, scattered_block_tables, step)

FP32_TOL = 1e-4
"""fp32 relative logit error allowed against transformers (differences are summation order only)."""

COMMON = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5)
LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
"""With head_dim 16 the wavelengths are 6.3, 33, 172, ...: one band is smoothed, the rest divided by 8."""

CASES = {
    "llama_gqa": ("llama", dict(COMMON)),
    "llama_tied": ("llama", dict(COMMON, tie_word_embeddings=True)),
    "llama3_rope": ("llama", dict(COMMON, rope_parameters=LLAMA3_ROPE)),
    "llama_linear_rope": ("llama", dict(COMMON, rope_parameters={"rope_type": "linear", "rope_theta": 10000.0,
                                                                  "factor": 4.0})),
    "llama_bias": ("llama", dict(COMMON, attention_bias=True, mlp_bias=True)),
    "llama_head_dim_mqa": ("llama", dict(COMMON, head_dim=24, num_key_value_heads=1)),
    "mistral_window": ("mistral", dict(COMMON, sliding_window=8)),
    "mistral_head_dim_tied": ("mistral", dict(COMMON, head_dim=8, num_attention_heads=8, sliding_window=None,
                                              tie_word_embeddings=True)),
    "qwen2": ("qwen2", dict(COMMON)),
    "qwen2_tied_window": ("qwen2", dict(COMMON, tie_word_embeddings=True, use_sliding_window=True,
                                        sliding_window=8, max_window_layers=0)),
    # windows transformers does not apply: Llama ignores a sliding_window key; Qwen2 windows only the layers
    # from max_window_layers on (here none of the 2)
    "llama_stray_window": ("llama", dict(COMMON, sliding_window=8)),
    "qwen2_window_below_max_layers": ("qwen2", dict(COMMON, use_sliding_window=True, sliding_window=8,
                                                    max_window_layers=2)),
}
PAGED_CASES = ["llama_gqa", "mistral_window"]
NF4_CASE = ("llama", dict(COMMON, intermediate_size=128))
"""Every K a multiple of 64, as in real models: bitsandbytes' CPU dequantize (AVX-512 builds) treats each row
on its own where a 64-block straddles two rows (K = 96), unlike its CUDA kernel and our flat blocks."""


def _config(model_type: str, kwargs: dict):
    from transformers import LlamaConfig, MistralConfig, Qwen2Config

    return {"llama": LlamaConfig, "mistral": MistralConfig, "qwen2": Qwen2Config}[model_type](**kwargs)


class Pair:
    """A tiny random model saved as safetensors, loaded by us and by transformers."""

    def __init__(self, name: str, folder):
        from transformers import AutoModelForCausalLM

        model_type, kwargs = NF4_CASE if name == "llama_nf4" else CASES[name]
        config = _config(model_type, kwargs)
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        randomize_(model, seed=sum(map(ord, name)))
        model.save_pretrained(str(folder), safe_serialization=True)
        self.name, self.folder = name, folder
        self.ours = load_model(ModelConfig(path=str(folder), quantization="none", dtype="float32")).model
        self.hf = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
        self.vocab = config.vocab_size

    def tokens(self, n: int, seed: int) -> list[int]:
        return torch.randint(0, self.vocab, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    """Builds each case once per module, on first use."""
    built: dict[str, Pair] = {}

    def get(name: str) -> Pair:
        if name not in built:
            built[name] = Pair(name, tmp_path_factory.mktemp(name))
        return built[name]

    return get


def _prefill_all(pair: Pair, ids: list[int], block_size: int = 4) -> torch.Tensor:
    """Our logits for every token of one sequence prefilled in one step."""
    n_blocks = blocks_needed(len(ids), block_size)
    kv = new_kv_cache(pair.ours, n_blocks + 1, block_size)
    return run_step(pair.ours, kv, [SeqChunk(list(range(1, n_blocks + 1)), 0, ids)], block_size, all_tokens=True)


# --------------------------------------------------------------------------------------------- per architecture

def test_configs_are_what_this_transformers_writes(zoo):
    """The saved config.json files carry the fields our arch reads (transformers 5: rope_parameters)."""
    cfg = saved_config(zoo("llama3_rope").folder)
    assert cfg["rope_parameters"]["rope_type"] == "llama3"
    arch = load_arch(zoo("llama3_rope").folder)
    assert (arch.rope.kind, arch.rope.theta, arch.rope.factor, arch.rope.original_max_position_embeddings) == \
        ("llama3", 500000.0, 8.0, 64)
    arch = load_arch(zoo("llama_linear_rope").folder)
    assert (arch.rope.kind, arch.rope.factor) == ("linear", 4.0)
    assert load_arch(zoo("mistral_window").folder).sliding_window == 8
    assert load_arch(zoo("qwen2").folder).sliding_window is None
    assert load_arch(zoo("qwen2_tied_window").folder).sliding_window == 8
    assert saved_config(zoo("llama_stray_window").folder)["sliding_window"] == 8
    assert load_arch(zoo("llama_stray_window").folder).sliding_window is None
    cfg = saved_config(zoo("qwen2_window_below_max_layers").folder)
    assert cfg["use_sliding_window"] and cfg["sliding_window"] == 8
    assert load_arch(zoo("qwen2_window_below_max_layers").folder).sliding_window is None
    arch = load_arch(zoo("llama_head_dim_mqa").folder)
    assert (arch.head_dim, arch.num_kv_heads) == (24, 1) and arch.head_dim * arch.num_heads != arch.hidden_size
    arch = load_arch(zoo("llama_bias").folder)
    assert arch.qkv_bias and arch.o_bias and arch.mlp_bias
    arch = load_arch(zoo("qwen2").folder)
    assert arch.qkv_bias and not arch.o_bias
    for name in ("llama_tied", "qwen2_tied_window", "mistral_head_dim_tied"):
        pair = zoo(name)
        assert pair.ours.arch.tie_word_embeddings
        assert pair.ours.lm_head_weight.data_ptr() == pair.ours.model.embed_tokens.weight.data_ptr()
    untied = zoo("llama_gqa").ours
    assert not torch.equal(untied.lm_head_weight, untied.model.embed_tokens.weight)


@pytest.mark.parametrize("name", list(CASES))
def test_prefill_logits_match_hf(zoo, name):
    pair = zoo(name)
    ids = pair.tokens(24, seed=1)  # longer than the sliding windows (8), spans 6 blocks of 4
    ours = _prefill_all(pair, ids)
    ref = hf_logits(pair.hf, ids)
    assert ours.shape == ref.shape
    assert rel_err(ours, ref) <= FP32_TOL


def test_sliding_window_matters(zoo):
    """Negative control: without the window our logits are far from transformers', so the parity above
    really checks that the window is applied (and that transformers applies it)."""
    pair = zoo("mistral_window")
    ids = pair.tokens(24, seed=1)
    ref = hf_logits(pair.hf, ids)
    kv = new_kv_cache(pair.ours, 7, 4)
    no_window = run_step(pair.ours, kv, [SeqChunk([1, 2, 3, 4, 5, 6], 0, ids)], 4, all_tokens=True,
                         sliding_window=None)
    assert rel_err(no_window[:8], ref[:8]) <= FP32_TOL  # inside the window nothing changes
    assert rel_err(no_window[8:], ref[8:]) > 1e-2


def test_qwen2_window_on_some_layers_only_is_refused():
    """transformers windows only Qwen2's layers from max_window_layers on; one window for all layers cannot
    match that, so the config must be refused rather than served with wrong attention."""
    from transformers import Qwen2Config

    from loraplex.server.errors import ModelLoadError
    from loraplex.server.model.arch import arch_from_config

    cfg = Qwen2Config(**COMMON, use_sliding_window=True, sliding_window=8, max_window_layers=1).to_dict()
    assert cfg["layer_types"] == ["full_attention", "sliding_attention"]
    with pytest.raises(ModelLoadError, match="some layers only"):
        arch_from_config(cfg)
    cfg.pop("layer_types")  # older config files: derived from max_window_layers, as transformers does
    with pytest.raises(ModelLoadError, match="some layers only"):
        arch_from_config(cfg)


def test_biases_matter(zoo):
    """Negative control for the bias case: the randomized biases are not zero and change the logits."""
    pair = zoo("llama_bias")
    attn = pair.ours.model.layers[0].self_attn
    for proj in (attn.qkv_proj, attn.o_proj, pair.ours.model.layers[0].mlp.gate_up_proj):
        assert proj.base.bias is not None and proj.base.bias.abs().max() > 0.1
        for part in proj.base.bias.split(proj.slice_features):  # every fused slice's bias, q|k|v and gate|up
            assert part.abs().max() > 0.1


# --------------------------------------------------------------------------------------------- paged behaviour

@pytest.mark.parametrize("name", PAGED_CASES)
def test_chunked_prefill_matches_full_prefill(zoo, name):
    pair = zoo(name)
    ids = pair.tokens(21, seed=2)
    bs = 4
    full = _prefill_all(pair, ids, bs)[-1:]

    seq = PagedSequence(ids, block_table=[6, 2, 5, 1, 3, 4])  # not in order
    kv = new_kv_cache(pair.ours, 7, bs)
    ref = hf_logits(pair.hf, ids)
    for n, end in ((7, 7), (6, 13), (None, 21)):  # chunks straddle block boundaries
        last = step(pair.ours, kv, bs, [(seq, n)])
        assert rel_err(last, ref[end - 1:end]) <= FP32_TOL
    assert rel_err(last, full) <= 1e-5


@pytest.mark.parametrize("name", PAGED_CASES)
def test_decode_loop_matches_hf(zoo, name):
    pair = zoo(name)
    bs = 4
    prompt = pair.tokens(5, seed=3)
    seq = PagedSequence(prompt, block_table=[5, 2, 7, 1, 6, 3, 4])  # 28 slots
    kv = new_kv_cache(pair.ours, 8, bs)
    ours = step(pair.ours, kv, bs, [(seq, None)])
    compared_argmax = 0
    for _ in range(16):  # past the window (8) and across four block boundaries
        ref = hf_logits(pair.hf, seq.tokens)[-1:]
        assert rel_err(ours, ref) <= FP32_TOL
        top2 = ref[0].topk(2).values
        if top2[0] - top2[1] > 1e-3:  # argmax is only well defined away from near-ties
            assert int(ours.argmax()) == int(ref.argmax())
            compared_argmax += 1
        seq.tokens.append(int(ref.argmax()))  # greedy continuation, transformers' choice
        ours = step(pair.ours, kv, bs, [(seq, 1)])
    assert seq.cached == 21 and compared_argmax >= 8


def _mixed_scenario(pair: Pair, kv, tables: list[list[int]], bs: int) -> list[torch.Tensor]:
    """Two steps over four sequences; step 2 mixes decodes, a middle chunk and a fresh prefill."""
    a = PagedSequence(pair.tokens(12, seed=10), tables[0])
    b = PagedSequence(pair.tokens(15, seed=11), tables[1])
    c = PagedSequence(pair.tokens(9, seed=12), tables[2])
    d = PagedSequence(pair.tokens(4, seed=13), tables[3])
    # step 1: a prefills all but its last token, b its first 6, d all but its last
    s1 = step(pair.ours, kv, bs, [(a, 11), (b, 6), (d, 3)])
    # step 2: a decodes, b feeds the rest (9 tokens), c prefills all 9, d decodes
    s2 = step(pair.ours, kv, bs, [(a, 1), (b, None), (c, None), (d, 1)])
    assert [s.cached for s in (a, b, c, d)] == [12, 15, 9, 4]
    return [s1, s2]


MIXED_LENGTHS = [12, 15, 9, 4]


def _solo(pair: Pair, tokens: list[int], chunks: list[int], bs: int) -> torch.Tensor:
    """Last logits of one sequence run alone (contiguous blocks, own cache) with the given chunking."""
    n_blocks = blocks_needed(len(tokens), bs)
    kv = new_kv_cache(pair.ours, n_blocks + 1, bs)
    seq = PagedSequence(tokens, list(range(1, n_blocks + 1)))
    for n in chunks:
        out = step(pair.ours, kv, bs, [(seq, n)])
    return out


@pytest.mark.parametrize("name", PAGED_CASES)
def test_mixed_step_matches_each_sequence_alone(zoo, name):
    pair = zoo(name)
    bs = 4
    tables, num_blocks = scattered_block_tables(MIXED_LENGTHS, bs, seed=5)
    assert any(t != list(range(t[0], t[0] + len(t))) for t in tables)  # really non-contiguous
    kv = new_kv_cache(pair.ours, num_blocks, bs)
    s1, s2 = _mixed_scenario(pair, kv, tables, bs)
    assert s1.shape == (3, pair.vocab) and s2.shape == (4, pair.vocab)

    toks = [pair.tokens(n, seed=10 + i) for i, n in enumerate(MIXED_LENGTHS)]
    expect_s2 = [_solo(pair, toks[0], [11, 1], bs), _solo(pair, toks[1], [6, 9], bs),
                 _solo(pair, toks[2], [9], bs), _solo(pair, toks[3], [3, 1], bs)]
    for i in range(4):
        assert rel_err(s2[i:i + 1], expect_s2[i]) <= 1e-5
        assert rel_err(s2[i:i + 1], hf_logits(pair.hf, toks[i])[-1:]) <= FP32_TOL
    for row, (i, n) in enumerate(((0, 11), (1, 6), (3, 3))):
        assert rel_err(s1[row:row + 1], hf_logits(pair.hf, toks[i][:n])[-1:]) <= FP32_TOL


@pytest.mark.parametrize("name", PAGED_CASES)
def test_garbage_in_unused_kv_slots_changes_nothing(zoo, name):
    """Block 0 (padding) holds large finite values, every other block starts as NaN (owned blocks are
    overwritten only where tokens are written), and spare blocks owned by nobody stay NaN."""
    pair = zoo(name)
    bs = 4
    tables, num_blocks = scattered_block_tables(MIXED_LENGTHS, bs, seed=6)
    clean = _mixed_scenario(pair, new_kv_cache(pair.ours, num_blocks, bs), tables, bs)

    spare = 3
    kv = new_kv_cache(pair.ours, num_blocks + spare, bs)
    gen = torch.Generator().manual_seed(7)
    for k_cache, v_cache in kv:
        for cache in (k_cache, v_cache):
            cache[0] = 1e3 * torch.randn(cache[0].shape, generator=gen)
            cache[1:] = float("nan")
    dirty = _mixed_scenario(pair, kv, tables, bs)
    for x, y in zip(clean, dirty):
        assert torch.isfinite(y).all()
        assert torch.equal(x, y)
    # the poison was there to be read: unowned blocks and the unused tail of a partly filled block stay NaN
    k_cache = kv[0][0]
    assert torch.isnan(k_cache[num_blocks:]).all()
    c_table, c_len = tables[2], MIXED_LENGTHS[2]  # 9 tokens in 3 blocks of 4: slots 1..3 of the last are free
    assert torch.isnan(k_cache[c_table[-1], c_len % bs:]).all()
    assert torch.isfinite(k_cache[c_table[-1], :c_len % bs]).all()


# --------------------------------------------------------------------------------------------- embedded model

def _chat_ids(tokenizer) -> list[int]:
    messages = [{"role": "system", "content": "You are a terse assistant."},
                {"role": "user", "content": "Name three primary colours."}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert len(ids) > 16
    return ids


def test_embedded_model_matches_hf(smol_fp32, hf_smol_fp32):
    ids = _chat_ids(smol_fp32.tokenizer)
    bs = 16
    n_blocks = blocks_needed(len(ids), bs)
    kv = new_kv_cache(smol_fp32.model, n_blocks + 1, bs)
    seq = PagedSequence(ids, list(range(n_blocks, 0, -1)))
    ours = step(smol_fp32.model, kv, bs, [(seq, 19)], all_tokens=True)  # 19: ends mid-block
    ours = torch.cat([ours, step(smol_fp32.model, kv, bs, [(seq, None)], all_tokens=True)])
    ref = hf_logits(hf_smol_fp32, ids)
    assert rel_err(ours, ref) <= FP32_TOL
    assert int(ours[-1].argmax()) == int(ref[-1].argmax())


# --------------------------------------------------------------------------------------------- NF4

NF4_TOL = 1e-4
"""NF4 logits vs transformers + bitsandbytes. The 4-bit weights and their (double-quantized) absmax states are
asserted identical first, so both sides compute with the very same dequantized weights and the remaining
difference is fp32 summation order only (attention layout, matmul blocking): the fp32 tolerance applies."""


def _hf_nf4(folder):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=torch.float32)
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32, quantization_config=quant,
                                                 device_map="cpu")  # beside ours, also on a GPU machine
    # On CPUs with AVX512-BF16, bitsandbytes' Linear4bit repacks its weight on the first forward into a CPU
    # layout with *bf16* absmax (lossy, machine dependent; it also fails on shapes as small as the tiny
    # model's). Keep transformers on bitsandbytes' standard NF4 path, the one our NF4Linear calls.
    repack_flags = 0
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
            repack_flags += 1
    assert repack_flags == 7 * model.config.num_hidden_layers
    return model.eval()


def _assert_same_nf4(ours, hf, layers: list[int]) -> int:
    """Packed weights and quant states equal, before any forward (transformers may repack on CPU then)."""
    from loraplex.server.model.layers import NF4Linear

    checked = 0
    for i in layers:
        for block, group, module in (("self_attn", "qkv_proj", "q_proj"), ("self_attn", "qkv_proj", "k_proj"),
                                     ("self_attn", "qkv_proj", "v_proj"), ("mlp", "gate_up_proj", "up_proj"),
                                     ("mlp", "down_proj", "down_proj")):
            fused = getattr(getattr(ours.model.layers[i], block), group)
            mine = fused.base
            segment = fused.slices.index(module)
            theirs = getattr(getattr(hf.model.layers[i], block), module).weight
            assert isinstance(mine, NF4Linear)
            qs, ref = mine.nf4.segment_quant_state(segment), theirs.quant_state
            packed = mine.nf4.segment_packed(segment)
            assert packed.dtype == theirs.dtype == torch.uint8
            assert torch.equal(packed.view(-1), theirs.data.view(-1))
            assert qs.nested and ref.nested and qs.blocksize == ref.blocksize == 64
            assert tuple(qs.shape) == tuple(ref.shape)
            assert torch.equal(qs.absmax, ref.absmax)
            assert torch.equal(qs.code, ref.code)
            assert torch.equal(qs.offset, ref.offset)
            assert torch.equal(qs.state2.absmax, ref.state2.absmax)
            assert torch.equal(qs.state2.code, ref.state2.code)
            checked += 1
    return checked


def _nf4_logit_check(ours, hf, ids: list[int], dense_ref: torch.Tensor) -> None:
    bs = 16
    n_blocks = blocks_needed(len(ids), bs)
    kv = new_kv_cache(ours, n_blocks + 1, bs)
    seq = PagedSequence(ids, list(range(1, n_blocks + 1)))
    mine = step(ours, kv, bs, [(seq, None)], all_tokens=True)
    ref = hf_logits(hf, ids)
    assert rel_err(mine, ref) <= NF4_TOL
    # and the quantization is real: NF4 logits are measurably away from the fp32 model's
    assert rel_err(mine, dense_ref) > 10 * NF4_TOL


def test_nf4_tiny_llama_matches_hf_bitsandbytes(zoo):
    pair = zoo("llama_nf4")
    ours = load_model(ModelConfig(path=str(pair.folder), quantization="nf4", dtype="float32")).model
    hf = _hf_nf4(pair.folder)
    assert _assert_same_nf4(ours, hf, [0, 1]) == 10
    ids = pair.tokens(20, seed=4)
    _nf4_logit_check(ours, hf, ids, hf_logits(pair.hf, ids))


def test_nf4_embedded_matches_hf_bitsandbytes(embedded_dir, smol_fp32, hf_smol_fp32):
    ours = load_model(ModelConfig(path=str(embedded_dir), quantization="nf4", dtype="float32")).model
    hf = _hf_nf4(embedded_dir)
    last = ours.arch.num_layers - 1
    assert _assert_same_nf4(ours, hf, [0, last]) == 10
    ids = _chat_ids(smol_fp32.tokenizer)[:24]
    _nf4_logit_check(ours, hf, ids, hf_logits(hf_smol_fp32, ids))


# --------------------------------------------------------------------------------------------- RoPE

@pytest.mark.parametrize("rope, head_dim", [
    (LLAMA3_ROPE, 16),
    ({"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
      "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}, 128),  # Llama 3.1 8B
    ({"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0, "low_freq_factor": 1.0,
      "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}, 64),  # Llama 3.2 1B
])
def test_llama3_inverse_frequencies_match_transformers(rope, head_dim):
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from loraplex.server.model.arch import arch_from_config

    config = LlamaConfig(hidden_size=4 * head_dim, num_attention_heads=4, head_dim=head_dim,
                         intermediate_size=64, num_hidden_layers=1, vocab_size=32, rope_parameters=dict(rope))
    ref, attention_factor = ROPE_INIT_FUNCTIONS["llama3"](config, torch.device("cpu"))
    assert attention_factor == 1.0  # we apply no cos/sin scaling
    arch = arch_from_config(config.to_dict())
    ours = inverse_frequencies(arch)
    assert ours.dtype == torch.float32 and ours.shape == (head_dim // 2,)
    torch.testing.assert_close(ours, ref.float(), rtol=1e-7, atol=0)
    default = inverse_frequencies(arch_from_config(dict(config.to_dict(), rope_parameters={
        "rope_type": "default", "rope_theta": rope["rope_theta"]})))
    assert (ours < default * 0.99).sum() >= 2 and (ours == default).any()  # scaled, smoothed and kept bands


def test_llama3_model_buffer_matches_hf(zoo):
    pair = zoo("llama3_rope")
    torch.testing.assert_close(pair.ours.inv_freq, pair.hf.model.rotary_emb.inv_freq.float(), rtol=1e-7, atol=0)
