"""The shipped path against the reference, on the real models: apr's default path as `apr run` generates
(the default dtype, the native C decode block: a prefill, then one token per step) against HF transformers
in float32 (apr.qa.refparity), teacher-forced over 256 positions of stdlib source. The same figures decide
the qa reference_parity gate (SHIP-006)."""

from __future__ import annotations

import pytest

from apr.qa.refparity import MAX_KL, MIN_TOP1, measure
from conftest import real_model

pytestmark = [pytest.mark.real, pytest.mark.reference]
pytest.importorskip("transformers")

SMOL_MISS = ("measured 2026-12-01/02: top-1 95.3%, KL 0.0039 over 257 positions (float32 path: 100%; llama.cpp on the "
             "same GGUF: 95.7%): the default path's int8-activation rounding, not a layer bug: see docs/contracts.md")


@pytest.mark.parametrize("name", [
    "qwen2.5-coder-0.5b-instruct",
    "qwen2.5-coder-1.5b-instruct",
    pytest.param("smollm2-135m-instruct", marks=pytest.mark.xfail(reason=SMOL_MISS, strict=True)),
])
def test_default_path_matches_transformers(name):
    real_model(name)
    r = measure(name)
    print(name, r)  # shown with -rA: the figures
    assert r["positions"] >= 256 and r["step_impl"] in ("native-c", "native-c-block", "torch", "torch-block", "cuda-graph")
    assert r["top1"] >= MIN_TOP1 and r["kl"] <= MAX_KL, r
