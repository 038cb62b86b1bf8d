"""`apr finetune BASE --data PATH -o OUT`: LoRA adapters over a frozen, still-quantized base (docs/training.md)."""

from __future__ import annotations

import json


def add_train_args(p, steps: int = 200, alpha_flag: str = "--alpha", required: bool = True) -> None:
    """The options finetune and distill share: data, LoRA, the loop."""
    p.add_argument("--data", required=required, metavar="PATH",
                   help="corpus folder (from `apr data code-corpus`, or any folder of text files; split by file)")
    p.add_argument("-o", "--out", required=required, metavar="OUT",
                   help="output folder: adapter.safetensors, log.jsonl, loss.png, checkpoint.pt, summary.json")
    p.add_argument("--rank", type=int, default=8, help="LoRA rank r (default 8)")
    p.add_argument(alpha_flag, dest="lora_alpha", type=float, default=16.0, help="LoRA alpha; scale alpha/r (default 16)")
    p.add_argument("--dropout", type=float, default=0.05, help="dropout on the adapters' input (default 0.05)")
    p.add_argument("--targets", default=None,
                   help="comma-separated linears to adapt, by GGUF name "
                        "(default attn_q,attn_k,attn_v,attn_output,ffn_gate,ffn_up,ffn_down)")
    p.add_argument("--steps", type=int, default=steps, help=f"optimizer steps (default {steps})")
    p.add_argument("--lr", type=float, default=2e-4, help="peak learning rate (default 2e-4)")
    p.add_argument("--batch", type=int, default=4, help="sequences per step (default 4)")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per sequence (default 256)")
    p.add_argument("--warmup", type=int, default=10, help="linear warm-up steps before cosine decay (default 10)")
    p.add_argument("--val-every", type=int, default=50, help="validate every N steps and at the end (default 50)")
    p.add_argument("--val-windows", type=int, default=16, help="validation sequences (default 16)")
    p.add_argument("--early-stop-patience", type=int, default=0,
                   help="stop after this many validations without improvement (default 0: never)")
    p.add_argument("--seed", type=int, default=0, help="seed of the split, adapter init, batches, dropout (default 0)")
    p.add_argument("--clip", type=float, default=1.0, help="gradient-norm clip (default 1.0)")
    p.add_argument("--weights", choices=["auto", "dequant", "dense"], default="auto",
                   help="base weights: dequantized on the fly in forward and backward (no dense copy), or one dense "
                        "float32 copy kept per linear (faster); auto (default): dense when it fits in half the free memory")
    p.add_argument("--no-grad-checkpoint", action="store_true",
                   help="keep every block's activations (faster, more memory) instead of recomputing them")
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
    p.add_argument("--json", action="store_true", help="print the run's summary as one JSON object")


def setup_parser(p):
    p.add_argument("model", metavar="BASE", nargs="?", default=None,
                   help="base model: registry name or .gguf path (default qwen2.5-coder-0.5b-instruct)")
    add_train_args(p, required=False)
    p.add_argument("--reproduce", metavar="RUN", default=None,
                   help="train a finished finetune or distill run's first --reproduce-steps steps (default 20) again from its "
                        "recorded configuration and seed (a distill run: with its teacher's top-k computed again) and "
                        "compare the losses with its log, bit for bit (--data: its corpus, if elsewhere)")
    p.add_argument("--reproduce-steps", type=int, default=20, metavar="N", help="steps --reproduce compares (default 20)")


def specs(args):
    from apr.train.loop import TrainSpec
    from apr.train.session import DEFAULT_TARGETS, DataSpec, LoraSpec

    targets = (args.targets if args.targets is not None else DEFAULT_TARGETS).split(",")
    lspec = LoraSpec(args.rank, args.lora_alpha, args.dropout, targets, args.weights)
    dspec = DataSpec(args.data, args.seq_len, val_windows=args.val_windows)
    tspec = TrainSpec(steps=args.steps, lr=args.lr, batch=args.batch, warmup=args.warmup, val_every=args.val_every,
                      patience=args.early_stop_patience, seed=args.seed, clip=args.clip)
    return lspec, dspec, tspec


def report(summary: dict, as_json: bool) -> None:
    if as_json:
        print(json.dumps(summary, default=str))
        return
    print(f"{summary['kind']}: {summary['steps_done']} steps ({summary['stopped']}), "
          f"val loss {summary['base_val_loss']:.4f} ± {summary['base_val_stderr']:.4f} (base) -> "
          f"{summary['best_val_loss']:.4f} (best), {summary['train_tokens_per_s']:.0f} tok/s on "
          f"{summary['threads']} threads; adapter {summary['adapter']}")


def main(args):
    from pathlib import Path

    from apr.errors import AprError
    from apr.train import session

    if args.reproduce:
        return _reproduce(args)
    if not args.data or not args.out:
        raise AprError("apr finetune needs --data PATH and -o OUT (or --reproduce RUN)")
    lspec, dspec, tspec = specs(args)
    p = session.prepare(args.model, lspec, dspec, tspec, quiet=args.json)
    gc = not args.no_grad_checkpoint
    summary = session.run(p, lspec, tspec, Path(args.out), session.lm_loss(p, gc, lspec.numerics), "finetune", resume=args.resume,
                          grad_checkpoint=gc, quiet=args.json, extra={"weights": lspec.mode, "grad_checkpoint": gc})
    report(summary, args.json)
    return 0


def _reproduce(args) -> int:
    from apr.train.reproduce import reproduce

    r = reproduce(args.reproduce, args.reproduce_steps, args.data, args.model)
    if args.json:
        print(json.dumps(r))
    else:
        print(f"{r['steps_compared']} steps of {r['run']}: " + ("identical, bit for bit" if r["identical"] else
              f"differ from step {r['first_mismatch_step']} (max |diff| {r['max_abs_diff']:.3g})"))
    return 0 if r["identical"] else 1
