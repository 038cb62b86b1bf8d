"""The output head on the torch block (prefill, teacher-forced scoring) is float32 in and out, as the C decode
step's head is. Rounding the head's input or its logits to bf16 made exact ties (0.0625 apart for logits of
8-16) that argmax broke by token id: on the real 0.5B student, 3 of its 11 top-1 disagreements with llama.cpp
were such ties, and the bf16 path's mean KL against float32 was 0.00040 on the code text (0.00022 after)."""

import torch

from apr.evals.perplexity import forward_sequences
from apr.quant import native
from apr.quant.table import dequantize
from apr.runtime import load_model


def _head_inputs_and_logits(m, ids):
    seen = {}
    handle = m.output_norm.register_forward_hook(lambda _mod, _a, out: seen.__setitem__("h", out))
    try:
        logits = forward_sequences(m, ids, 1, len(ids))
    finally:
        handle.remove()
    return seen["h"], logits


def test_torch_block_head_is_float32_for_many_rows(tiny_qwen):
    m = load_model(str(tiny_qwen), dtype="bfloat16", backend="cpu", quiet=True).model
    out = m.output
    ids = [3 + (7 * i) % 200 for i in range(native.MAX_ROWS + 40)]  # more rows than the native kernel takes
    h, logits = _head_inputs_and_logits(m, ids)
    assert h.dtype == torch.float32 and logits.dtype == torch.float32
    w = dequantize(out.raw, out.qtype, (out.out_features, out.in_features)).double()
    ref = h.double() @ w.T  # (T, vocab): the head in float64 on the same inputs
    # float32 sums: ~1e-6 of the largest logit; a bf16 output is off by up to half a step, 1/256 of it
    assert (logits.double() - ref).abs().max() < 1e-5 * ref.abs().max()


def test_torch_block_head_is_the_decode_heads_call_for_few_rows(tiny_qwen):
    m = load_model(str(tiny_qwen), dtype="bfloat16", backend="cpu", quiet=True).model
    out = m.output
    h, logits = _head_inputs_and_logits(m, [5, 17, 42, 9, 100, 61])
    assert h.dtype == torch.float32
    decode_head = native.Group([(out.raw, out.qtype, out.out_features, out._bias32)], out.act_split)
    assert torch.equal(logits, decode_head(h))  # what apr.model.native_step's head returns for these rows
