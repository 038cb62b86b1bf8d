"""Arguments shared by the commands that load a model and generate."""

from __future__ import annotations


def add_model_args(p, dtype: bool = True, backend: bool = True) -> None:
    p.add_argument("model", nargs="?", default=None,
                   help="registry name (pulled on first use) or path to a .gguf/.apr file "
                        "(default: qwen2.5-coder-0.5b-instruct)")
    if dtype:
        p.add_argument("--dtype", choices=["float32", "bfloat16"], default=None,
                       help="compute dtype; float32 is the exact reference mode (default: the fastest faithful one)")
    if backend:
        p.add_argument("--backend", choices=["auto", "cuda", "cpu"], default="auto",
                       help="where to run: auto tries cuda (after a parity gate), then cpu")


def add_sampling_args(p, max_tokens: int = 256) -> None:
    p.add_argument("--max-tokens", "-n", type=int, default=max_tokens, help=f"tokens to generate (default {max_tokens})")
    p.add_argument("--temperature", "-t", type=float, default=0.0, help="0 is greedy (default 0)")
    p.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens (0: off)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1.0: off)")
    p.add_argument("--min-p", type=float, default=0.0, help="drop tokens below min-p × the top probability")
    p.add_argument("--repeat-penalty", type=float, default=1.0, help="penalty on recent tokens (1.0: off)")
    p.add_argument("--seed", type=int, default=None, help="random seed for sampling")
    p.add_argument("--stop", action="append", default=None, help="stop when this string appears (repeatable)")


def add_content_args(p) -> None:
    p.add_argument("--allow-special-in-content", action="store_true",
                   help="let special tokens typed in a message (<|im_start|>, ...) act as control tokens, the old "
                        "behaviour (default: message text is tokenized as text; specials come only from the template)")


def sampling_kwargs(args) -> dict:
    return dict(max_tokens=args.max_tokens, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                min_p=args.min_p, repeat_penalty=args.repeat_penalty, seed=args.seed, stop=args.stop)


def load(args, quiet: bool = False):
    from apr.runtime import load_model

    lm = load_model(args.model, dtype=getattr(args, "dtype", None), backend=getattr(args, "backend", "auto"),
                    quiet=quiet)
    lm.tokenizer.allow_special_in_content = bool(getattr(args, "allow_special_in_content", False))
    return lm
