"""GPU twins: FlashAttention varlen equals the per-segment SDPA reference; Liger's ops train like the model's."""
from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.gpu
TINY_CONFIG = dict(vocab_size=1000, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@cuda
@pytest.mark.parametrize("kv_heads", [8, 2])
def test_flash_varlen_matches_segment_reference(kv_heads):
    from loraplex.training.attention import _flash_varlen, segment_attention, varlen_kernel_available

    assert varlen_kernel_available()
    torch.manual_seed(0)
    cu = torch.tensor([0, 5, 300, 301, 1024, 1500], dtype=torch.int32, device="cuda")
    n = int(cu[-1])
    q = torch.randn(n, 8, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(n, kv_heads, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn(n, kv_heads, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    grad = torch.randn(n, 8, 128, device="cuda", dtype=torch.bfloat16)
    out = _flash_varlen(q, k, v, cu, int(cu.diff().max()), 128 ** -0.5)
    got = (out, *torch.autograd.grad(out, (q, k, v), grad))
    ref_out = segment_attention(q.float(), k.float(), v.float(), cu.cpu(), 128 ** -0.5)
    ref = (ref_out, *torch.autograd.grad(ref_out, (q, k, v), grad.float()))
    for a, b in zip(got, ref):
        torch.testing.assert_close(a.float(), b.float(), atol=3e-2, rtol=3e-2)


@cuda
def test_liger_and_varlen_train_like_the_plain_model():
    """Loss and LoRA gradients with Liger (RMSNorm, SwiGLU, RoPE, fused linear + CE) and varlen attention on
    packed rows equal those of the plain model with SDPA."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from loraplex.training.attention import use_varlen
    from loraplex.training.batching import Collator, pack
    from loraplex.training.bench import synthetic_examples
    from loraplex.training.kernels import apply_liger, restored_modeling_modules
    from loraplex.training.loss import ChunkedCausalLMLoss

    TINY = LlamaConfig(**TINY_CONFIG, attn_implementation="sdpa")
    rows, _ = pack(synthetic_examples(12, 128, 1000, seed=0), 256)
    results = []
    for fast in (False, True):
        with restored_modeling_modules():
            torch.manual_seed(0)
            base = LlamaForCausalLM(TINY).cuda()
            base.config.use_cache = False
            model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                                    init_lora_weights="gaussian", task_type="CAUSAL_LM"))
            if fast:
                use_varlen(model)
                apply_liger(model)
            loss_fn = ChunkedCausalLMLoss(model, fused=fast)
            batch = {k: v.cuda() if torch.is_tensor(v) else v
                     for k, v in Collator(0, chunked_loss=True, varlen=fast)(rows).items() if k != "num_tokens"}
            labels = batch.pop("labels")
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = loss_fn(model(**batch), labels)
            loss.backward()
            results.append((loss.item(), {n: p.grad.float() for n, p in model.named_parameters() if p.requires_grad}))
    (plain, plain_grads), (fast, fast_grads) = results
    assert abs(fast - plain) < 1e-2 * abs(plain)
    for name, grad in plain_grads.items():
        torch.testing.assert_close(fast_grads[name], grad, atol=2e-2, rtol=5e-2)
