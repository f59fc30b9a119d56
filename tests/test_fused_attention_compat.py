"""Fused attention kernels as the GPU runs them, checked on CPU.

On CUDA, SDPA's flash, memory-efficient and cuDNN kernels draw their dropout
inside the op; torch 2.11's FLOP formulas refuse grouped-query attention. Both
broke runs on an H200 (save_matmuls gradients differed on BERT and GPT-2; the
planner could not profile a Llama-shaped model). CPU never calls those kernels
with dropout or GQA (its SDPA decomposes), so these tests call the policy and
the FLOP counting with the kernels' own schemas.
"""
import pytest
import torch

from revify.passes.planning.count_flops import _count, flop_counter, op_flops
from revify.runtime.checkpoint_policy import draws_random, saves_under_save_matmuls

aten = torch.ops.aten
Q = torch.randn(2, 8, 16, 32)
KV = torch.randn(2, 2, 16, 32)  # 4 query heads per key/value head


@pytest.mark.parametrize("op,args", [
    (aten._scaled_dot_product_efficient_attention.default, (Q, Q, Q, None, True)),
    (aten._scaled_dot_product_flash_attention.default, (Q, Q, Q)),
    (aten._scaled_dot_product_cudnn_attention.default, (Q, Q, Q, None, True)),
])
def test_attention_with_dropout_is_recomputed_not_kept(op, args):
    assert saves_under_save_matmuls(op, args, {})  # dropout_p defaults to 0: kept like a matmul
    assert not draws_random(op, args, {})
    assert draws_random(op, args, {"dropout_p": 0.1})
    assert not saves_under_save_matmuls(op, args, {"dropout_p": 0.1})
    position = [a.name for a in op._schema.arguments].index("dropout_p")
    positional = args + (None,) * (position - len(args)) + (0.1,)
    assert draws_random(op, positional, {}) and not saves_under_save_matmuls(op, positional, {})


def test_plain_ops():
    assert saves_under_save_matmuls(aten.mm.default, (Q[0, 0], Q[0, 0].T), {})
    assert draws_random(aten.native_dropout.default, (Q, 0.1, True), {})
    assert not draws_random(aten.mm.default, (Q[0, 0], Q[0, 0].T), {})


def _refusing_formula(query, key, value, *args, out_val=None, **kwargs):
    """torch 2.11's rule: key and value must have the query's heads."""
    if key.shape[1] != query.shape[1]:
        raise AssertionError("sdpa_flop_count: query/key/value shapes are incompatible")
    b, h, s, d = query.shape
    return 4 * b * h * s * key.shape[2] * d


def test_grouped_query_attention_counted_as_broadcast():
    expanded = KV.repeat_interleave(4, dim=1)
    assert _count(_refusing_formula, (Q, KV, KV, None, True), {}, None) == \
        _refusing_formula(Q, expanded, expanded) == 4 * 2 * 8 * 16 * 16 * 32
    op = aten._scaled_dot_product_efficient_attention.default
    assert op_flops(op, (Q, KV, KV, None, False), {}, None) == op_flops(op, (Q, expanded, expanded, None, False), {},
                                                                         None) > 0
    assert op_flops(aten.relu.default, (Q,), {}, None) == 0


def test_flop_counter_counts_like_torch():
    from torch.utils.flop_counter import FlopCounterMode

    def work():
        torch.randn(64, 32) @ torch.randn(32, 16)
        torch.nn.functional.scaled_dot_product_attention(Q, Q, Q)
        torch.bmm(Q[0], Q[0].transpose(1, 2))

    with flop_counter() as ours, FlopCounterMode(display=False) as torchs:
        work()
    assert ours.get_total_flops() == torchs.get_total_flops() == 2 * 64 * 32 * 16 + 2 * 8 * 16 * 16 * 32
