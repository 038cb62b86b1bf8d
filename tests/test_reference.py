"""Acceptance against HF transformers on the real GGUF files: greedy tokens from `apr run --raw --dtype float32`
equal transformers' greedy `generate`, and teacher-forced logits agree within 2e-3 at every position.

Transformers dequantizes the same GGUF to float32 (gguf_file=...), an implementation independent of ours.
Loading it is slow (about a minute per model on 2 cores), so each model is loaded once per module.
"""

from __future__ import annotations

import json

import pytest
import torch

from conftest import REAL_05B, REAL_SMOL, real_model

pytestmark = [pytest.mark.real, pytest.mark.reference]
transformers = pytest.importorskip("transformers")

PROMPTS = ["def fib(n):", "import numpy as np\n\ndef moving_average(x, w):\n    \"\"\"Return the moving average"]
MAX_TOKENS = 24
LOGIT_TOL = 2e-3


@pytest.fixture(scope="module", params=[REAL_05B, REAL_SMOL])
def hf(request):
    path = real_model(request.param)
    tok = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    model.eval()
    return request.param, path, tok, model


def apr_run_json(capsys, *args) -> dict:
    from apr.cli import main

    assert main(list(args)) == 0
    return json.loads(capsys.readouterr().out)


@pytest.mark.parametrize("prompt", PROMPTS)
def test_greedy_tokens_and_logits_equal_transformers(hf, prompt, capsys):
    name, path, tok, model = hf
    ours = apr_run_json(capsys, "run", str(path), "--raw", "--dtype", "float32", "--temperature", "0",
                        "--max-tokens", str(MAX_TOKENS), "--json", "--prompt", prompt)
    ids = tok(prompt, return_tensors="pt").input_ids
    assert ours["prompt_ids"] == ids[0].tolist()  # same tokenization of the prompt
    with torch.inference_mode():
        ref = model.generate(ids, max_new_tokens=MAX_TOKENS, do_sample=False, min_new_tokens=0)[0, ids.shape[1]:]
    ref_tokens = ref.tolist()
    eos_id = model.generation_config.eos_token_id
    eos = set(eos_id) if isinstance(eos_id, list) else {eos_id} - {None}
    while ref_tokens and ref_tokens[-1] in eos:
        ref_tokens.pop()  # transformers includes the eos it stopped at; apr reports it as stop_reason
    assert ours["tokens"] == ref_tokens, (name, prompt)

    # teacher forcing over prompt + generated tokens: logits at every position
    lm = _lm(path)
    seq = ids[0].tolist() + ours["tokens"]
    lm.model.setup_cache(len(seq))
    our_logits = lm.model(torch.tensor(seq), 0, all_logits=True)
    with torch.inference_mode():
        ref_logits = model(torch.tensor([seq])).logits[0].float()
    diff = (our_logits - ref_logits).abs().max().item()
    assert diff < LOGIT_TOL, f"{name}: max abs logit difference {diff:.2e}"


_CACHE: dict = {}


def _lm(path):
    from apr.runtime import load_model

    if path not in _CACHE:
        _CACHE.clear()
        _CACHE[path] = load_model(str(path), dtype="float32")
    return _CACHE[path]
