"""LoRA training tokens/s: `apr finetune`'s loop against transformers + peft, same configuration, in one run.

Both sides train the SAME token windows (apr's tokenization of the corpus) with the same LoRA (rank, alpha,
dropout, the seven attention/FFN projections), sequence length, batch, AdamW and learning rate, on the CPU
with the same thread count. Like against like: apr's float32 modes (dequant, dense) against peft's float32
model; peft's bfloat16 model (adapters float32) against apr's bf16 mode where a tree has one (branch
`train-bf16`: frozen GEMMs in bfloat16, adapters float32; not on main, see docs/training.md). Each side runs
in its own process so its peak RSS is its own. The peer loads the same GGUF through transformers' GGUF reader
(dequantized to a dense model: peft has no on-the-fly dequantization on the CPU).
peft is a benchmark-only tool (`pip install peft`), never an apr dependency.

    python benchmarks/train.py --steps 4 --seq-len 256 --batch 4 --modes dense --peer-dtypes float32,bfloat16
    python benchmarks/train.py --steps 6 --seq-len 256 --batch 4 --modes dense --numerics 2,3   # versions side by side
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

TARGETS = "attn_q,attn_k,attn_v,attn_output,ffn_gate,ffn_up,ffn_down"
HF_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

APR = r"""
import json, resource, sys, time, torch
job = json.load(open(sys.argv[1]))
torch.set_num_threads(job["threads"])
from apr.train import forward, lora
b = forward.load_base(job["model"])
v = job["numerics"] or forward.NUMERICS
ad = lora.attach(b.model, job["targets"].split(","), job["rank"], job["alpha"], job["dropout"], 0, job["mode"], numerics=v)
params = [t for m in ad.values() for t in (m.lora_a, m.lora_b)]
opt = torch.optim.AdamW(params, lr=job["lr"])
w = torch.load(job["windows"])
times = []
for s in range(job["steps"] + 1):  # step 0 is a warm-up, not timed
    t0 = time.perf_counter()
    x = w[s * job["batch"]:(s + 1) * job["batch"]]
    loss = forward.token_losses(b.model, x, job["grad_checkpoint"], numerics=v).mean()
    loss.backward(); opt.step(); opt.zero_grad(set_to_none=True)
    times.append(time.perf_counter() - t0)
print(json.dumps({"numerics": v, "step_s": times[1:], "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""

PEER = r"""
import json, resource, sys, time, torch
job = json.load(open(sys.argv[1]))
torch.set_num_threads(job["threads"])
from pathlib import Path
from transformers import AutoModelForCausalLM
from peft import LoraConfig, get_peft_model
p = Path(job["model"])
m = AutoModelForCausalLM.from_pretrained(str(p.parent), gguf_file=p.name, dtype=getattr(torch, job["dtype"]))
m = get_peft_model(m, LoraConfig(r=job["rank"], lora_alpha=job["alpha"], lora_dropout=job["dropout"],
                                 target_modules=job["hf_targets"], task_type="CAUSAL_LM"))
if job["grad_checkpoint"]:
    m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    m.enable_input_require_grads()
m.train()
opt = torch.optim.AdamW([q for q in m.parameters() if q.requires_grad], lr=job["lr"])
w = torch.load(job["windows"])
times = []
for s in range(job["steps"] + 1):
    t0 = time.perf_counter()
    x = w[s * job["batch"]:(s + 1) * job["batch"]]
    out = m(input_ids=x[:, :-1], labels=None)
    loss = torch.nn.functional.cross_entropy(out.logits.float().flatten(0, 1), x[:, 1:].reshape(-1))
    loss.backward(); opt.step(); opt.zero_grad(set_to_none=True)
    times.append(time.perf_counter() - t0)
print(json.dumps({"step_s": times[1:], "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def _windows(model: str, corpus: str | None, seq_len: int, n: int, path: Path) -> str:
    import torch

    from apr.train import data as D
    from apr.train import forward

    b = forward.load_base(model)
    root = Path(corpus) if corpus else D.default_corpus_dir()
    if not (root / D.MANIFEST).is_file():
        D.build_code_corpus(root)
    c = D.open_corpus(root)
    train, _ = D.split_files(c.files, 0)
    w = D.make_windows(c, train, b.tokenizer, seq_len, n)
    torch.save(w.ids, path)
    return str(b.path)


def _side(code: str, job: dict, tmp: Path, name: str) -> dict:
    jf = tmp / f"{name}.json"
    jf.write_text(json.dumps(job))
    r = subprocess.run([sys.executable, "-c", code, str(jf)], capture_output=True, text=True)
    if r.returncode:
        return {"error": (r.stderr.strip().splitlines() or ["?"])[-1]}
    out = json.loads(r.stdout.strip().splitlines()[-1])
    tokens = job["batch"] * job["seq_len"]
    out["tok_s"] = tokens * len(out["step_s"]) / sum(out["step_s"])
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="qwen2.5-coder-0.5b-instruct")
    ap.add_argument("--corpus", default=None, help="corpus folder (default: apr data code-corpus's)")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--grad-checkpoint", action="store_true", help="both sides recompute activations in backward")
    ap.add_argument("--modes", default="dequant",
                    help="apr weight modes to run, comma-separated (dequant, dense; bf16 on branch train-bf16)")
    ap.add_argument("--peer-dtypes", default="float32",
                    help="peft runs, comma-separated: float32 (the model dense in float32), bfloat16 (the model "
                         "in bfloat16, its adapters in float32: peft's autocast_adapter_dtype, like apr's bf16 mode)")
    ap.add_argument("--numerics", default="",
                    help="apr training numerics versions to run, comma-separated (default: the one new runs use)")
    ap.add_argument("--no-peer", action="store_true")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        path = _windows(a.model, a.corpus, a.seq_len, a.batch * (a.steps + 1), tmp / "w.pt")
        job = {"model": path, "windows": str(tmp / "w.pt"), "steps": a.steps, "batch": a.batch, "seq_len": a.seq_len,
               "threads": a.threads, "rank": 8, "alpha": 16, "dropout": 0.05, "lr": 2e-4, "targets": TARGETS,
               "hf_targets": HF_TARGETS, "grad_checkpoint": a.grad_checkpoint}
        versions = [int(v) for v in a.numerics.split(",") if v] or [0]  # 0: apr's default
        res = {f"{m}, numerics {v or 'default'}": _side(APR, {**job, "mode": m, "numerics": v}, tmp, f"apr-{m}-{v}")
               for m in a.modes.split(",") for v in versions}
        peers = {} if a.no_peer else {d: _side(PEER, {**job, "dtype": d}, tmp, f"peft-{d}")
                                      for d in a.peer_dtypes.split(",")}
    conf = {k: job[k] for k in ("steps", "batch", "seq_len", "threads", "rank", "alpha", "grad_checkpoint")}
    for m, r in res.items():
        line = {"side": f"apr ({m})", **conf, **r}
        for d, peer in peers.items():
            if "tok_s" in peer and "tok_s" in r:
                line[f"ratio_vs_peft_{d}"] = r["tok_s"] / peer["tok_s"]
        print(json.dumps(line))
    for d, peer in peers.items():
        print(json.dumps({"side": f"transformers+peft ({d})", **conf, **peer}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
