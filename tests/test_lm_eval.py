"""lm-evaluation-harness itself against a live `apr serve` (tiny random model, loopback): its
`local-completions` model on a loglikelihood task (multiple choice: echo + logprobs on /v1/completions) and
a generate_until task, and its `local-chat-completions` model on the generate_until task. The task and its
data ship in tests/data/lm_eval_task (local jsonl, no hub, no network). Every score, and every per-item
response behind it, must equal what apr computes directly for the same items: loglikelihoods from the
model's own forward, generations from `apr.generate`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("lm_eval")
pytest.importorskip("fastapi")

from test_serve_harness import LiveServer  # noqa: E402

from apr.generate import generate  # noqa: E402
from apr.runtime import load_model  # noqa: E402

TASK_DIR = Path(__file__).parent / "data" / "lm_eval_task"
EOS = "<|endoftext|>"


def _docs(name: str) -> list[dict]:
    return [json.loads(line) for line in (TASK_DIR / name).read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def harness(tiny_qwen, tmp_path_factory):
    """(evaluate(model, model_args, tasks, chat) -> lm_eval's results, the live server, a reference copy of
    the model). Datasets are read from the local jsonl only (offline, cache in a temporary folder)."""
    mp = pytest.MonkeyPatch()
    tmp = tmp_path_factory.mktemp("lm_eval")
    for k, v in {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_DATASETS_CACHE": str(tmp / "datasets"),
                 "TOKENIZERS_PARALLELISM": "false"}.items():
        mp.setenv(k, v)
    import lm_eval
    from lm_eval.tasks import TaskManager
    from transformers import PreTrainedTokenizerFast

    served = load_model(str(tiny_qwen), dtype="float32", backend="cpu", quiet=True)
    ref = load_model(str(tiny_qwen), dtype="float32", backend="cpu", quiet=True)
    # local-completions tokenizes on the client: the same tokenizer apr builds from the GGUF, saved locally
    tok_dir = tmp / "tokenizer"
    PreTrainedTokenizerFast(tokenizer_object=ref.tokenizer.backend, eos_token=EOS).save_pretrained(str(tok_dir))
    server = LiveServer(served, parallel=4, max_queue=64)
    manager = TaskManager(include_path=str(TASK_DIR))

    def evaluate(model: str, tasks: list[str], chat: bool, endpoint: str, **model_args) -> dict:
        mp.chdir(TASK_DIR)  # the task yamls name their jsonl relative to this folder
        args = {"base_url": server.url + endpoint, "model": "tiny", "max_length": 512, "num_concurrent": 2,
                "max_retries": 1, **model_args}
        return lm_eval.simple_evaluate(model=model, model_args=args, tasks=tasks, task_manager=manager,
                                       log_samples=True, apply_chat_template=chat)

    yield evaluate, ref, tok_dir
    server.close()
    mp.undo()


def _loglikelihood(lm, context: str, continuation: str) -> tuple[float, bool]:
    """log p(continuation | context) and whether greedy decoding would produce it, from apr's forward, with
    lm_eval's split of the tokens (the whole encoded, the context's tokens first)."""
    tok = lm.tokenizer
    whole, ctx = tok.encode(context + continuation), tok.encode(context)
    lm.model.setup_cache(len(whole) + 1)
    with torch.no_grad():
        logp = torch.log_softmax(lm.model(torch.tensor(whole), 0, all_logits=True).float(), -1)  # [T, vocab]
    pos = range(len(ctx), len(whole))
    return (sum(float(logp[i - 1, whole[i]]) for i in pos),
            all(int(logp[i - 1].argmax()) == whole[i] for i in pos))


def _by_doc(result: dict, task: str) -> list[dict]:
    return sorted(result["samples"][task], key=lambda s: s["doc_id"])


def test_local_completions_scores_equal_apr_direct(harness):
    evaluate, ref, tok_dir = harness
    out = evaluate("local-completions", ["apr_choice", "apr_complete"], False, "/v1/completions",
                   tokenizer_backend="huggingface", tokenizer=str(tok_dir))
    # loglikelihood: each choice's score, and acc (the best choice is the labelled one)
    docs, correct = _docs("choice.jsonl"), []
    for doc, sample in zip(docs, _by_doc(out, "apr_choice"), strict=True):
        # lm_eval puts its target delimiter (" ") between the context and each choice
        direct = [_loglikelihood(ref, doc["context"], " " + c) for c in doc["choices"]]
        got = [tuple(r) for r in sample["filtered_resps"]]
        assert [g[0] for g in got] == pytest.approx([d[0] for d in direct], rel=1e-5, abs=1e-3)
        assert [g[1] for g in got] == [d[1] for d in direct]
        scores = [d[0] for d in direct]
        correct.append(scores.index(max(scores)) == doc["label"])
    assert out["results"]["apr_choice"]["acc,none"] == pytest.approx(sum(correct) / len(docs), abs=1e-12)
    # generate_until: the greedy text up to the first stop, and exact match
    docs, hits = _docs("complete.jsonl"), []
    for doc, sample in zip(docs, _by_doc(out, "apr_complete"), strict=True):
        text = generate(ref, doc["prompt"], chat=False, max_tokens=8, temperature=0.0, stop=["\n", EOS]).text
        assert sample["filtered_resps"] == [text]
        hits.append(text == doc["answer"])
    assert out["results"]["apr_complete"]["exact_match,none"] == pytest.approx(sum(hits) / len(docs), abs=1e-12)


def test_local_chat_completions_generations_equal_apr_direct(harness):
    evaluate, ref, _ = harness
    out = evaluate("local-chat-completions", ["apr_complete"], True, "/v1/chat/completions",
                   tokenizer_backend="none")
    docs, hits = _docs("complete.jsonl"), []
    for doc, sample in zip(docs, _by_doc(out, "apr_complete"), strict=True):
        text = generate(ref, doc["prompt"], chat=True, max_tokens=8, temperature=0.0, stop=["\n"]).text
        assert sample["filtered_resps"] == [text]
        hits.append(text == doc["answer"])
    assert out["results"]["apr_complete"]["exact_match,none"] == pytest.approx(sum(hits) / len(docs), abs=1e-12)

