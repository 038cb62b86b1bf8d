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


@pytest.mark.parametrize("name", [
    "qwen2.5-coder-0.5b-instruct",
    "qwen2.5-coder-1.5b-instruct",
    "smollm2-135m-instruct",  # int8 activations missed here (top-1 95.3%): it takes two rows (hub.act_split)
])
def test_default_path_matches_transformers(name):
    real_model(name)
    r = measure(name)
    print(name, r)  # shown with -rA: the figures
    assert r["positions"] >= 256 and r["step_impl"] in ("native-c", "native-c-block", "torch", "torch-block", "cuda-graph")
    assert r["top1"] >= MIN_TOP1 and r["kl"] <= MAX_KL, r
    assert r["activations"] == ("int8x2" if name.startswith("smollm2") else "int8"), r
