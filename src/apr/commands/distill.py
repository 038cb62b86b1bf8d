"""`apr distill --teacher T --student S --data PATH -o OUT`: LoRA on the student against the teacher's stored
top-k log-probs (KL on the top k plus the rest mass, mixed with the hard labels by --alpha)."""

from __future__ import annotations

from apr.commands.finetune import add_train_args, report, specs

DEFAULT_TEACHER = "qwen2.5-coder-1.5b-instruct"
DEFAULT_STUDENT = "qwen2.5-coder-0.5b-instruct"


def setup_parser(p):
    p.add_argument("--teacher", default=DEFAULT_TEACHER, help=f"teacher model (default {DEFAULT_TEACHER})")
    p.add_argument("--student", default=DEFAULT_STUDENT, help=f"student model (default {DEFAULT_STUDENT})")
    p.add_argument("--temperature", type=float, default=2.0, help="softmax temperature of both sides (default 2)")
    p.add_argument("--alpha", dest="kd_alpha", type=float, default=0.5,
                   help="weight of the teacher's soft targets; 1 - it weighs the hard labels (default 0.5)")
    p.add_argument("--top-k", type=int, default=32, help="teacher log-probs stored per position (default 32)")
    add_train_args(p, alpha_flag="--lora-alpha")


def main(args):
    from pathlib import Path

    from apr.errors import AprError
    from apr.train import distill, forward, session

    if args.top_k < 1:
        raise AprError(f"--top-k must be at least 1, got {args.top_k}")
    if not 0.0 <= args.kd_alpha <= 1.0 or not args.temperature > 0:
        raise AprError("--alpha must be in [0, 1] and --temperature positive")
    lspec, dspec, tspec = specs(args)
    teacher = forward.load_base(args.teacher, quiet=args.json)  # memory-mapped: metadata and sha only
    student = forward.load_base(args.student, quiet=args.json)
    forward.check_same_vocab(teacher, student)  # before any work
    p = session.prepare(args.student, lspec, dspec, tspec, quiet=args.json)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    ids, logp = distill.load_or_compute(out, teacher, args.teacher, p.train.ids, args.top_k, args.temperature,
                                        p.corpus.fingerprint, args.json)
    gc = not args.no_grad_checkpoint
    loss = distill.distill_loss(p, ids, logp, args.temperature, args.kd_alpha, gc)
    extra = {"teacher": str(teacher.path), "teacher_sha256": teacher.sha256, "temperature": args.temperature,
             "kd_alpha": args.kd_alpha, "top_k": args.top_k, "weights": lspec.mode}
    summary = session.run(p, lspec, tspec, out, loss, "distill", resume=args.resume, grad_checkpoint=gc,
                          quiet=args.json, extra=extra)
    report(summary, args.json)
    return 0
