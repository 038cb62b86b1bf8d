"""`apr serve [MODEL]`: an OpenAI- and Ollama-compatible HTTP server with continuous batching."""

from __future__ import annotations

import argparse

from apr.commands._common import add_model_args

EPILOG = """\
endpoints:
  OpenAI   POST /v1/chat/completions, POST /v1/completions, GET /v1/models
  Ollama   POST /api/chat, POST /api/generate, GET /api/tags, POST /api/show, GET /api/version
  other    GET /health (503 while loading), GET /metrics (Prometheus), POST /tokenize, POST /detokenize

The server binds to 127.0.0.1 unless --host says otherwise; prints its URL once the model is loaded;
on SIGTERM or Ctrl-C it stops accepting, finishes the requests in flight, then exits.
Example: apr serve --port 8080, then point an OpenAI client at http://127.0.0.1:8080/v1 (any API key,
or the one given with --api-key)."""


def _port(text: str) -> int:
    value = int(text)
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"port must be 0-65535 (0 picks a free one), got {value}")
    return value


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _non_negative(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {value}")
    return value


def setup_parser(p):
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.epilog = EPILOG
    add_model_args(p)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=_port, default=8080, help="port (default 8080; 0 picks a free one)")
    p.add_argument("--parallel", type=_positive, default=None,
                   help="most sequences decoded together, one KV slot each (default: as many slots of 2 x --max-tokens "
                        "tokens, capped by the context, as fit a quarter of the free memory, at most 8)")
    p.add_argument("--max-queue", type=_non_negative, default=64,
                   help="requests that may wait for a slot; beyond that the server answers 503 (default 64)")
    p.add_argument("--max-tokens", type=_positive, default=4096,
                   help="tokens a request may generate when it sets no limit (default 4096; never past the context)")
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on every route but /health")
    p.add_argument("--threads", type=_positive, default=None, help="CPU threads for the model (default: torch's choice)")
    from apr.commands.run import add_speculative_args

    add_speculative_args(p)
    p.add_argument("--cors-origin", action="append", default=None, metavar="ORIGIN",
                   help="allow browser requests from this origin (repeatable; '*' for any); no CORS without it")


def main(args):
    import os

    if args.threads:  # before torch loads: OpenMP reads it once, for every thread the engine runs on
        os.environ["OMP_NUM_THREADS"] = str(args.threads)
    from apr.commands.run import speculative_kwargs

    spec = speculative_kwargs(args)
    if spec["speculative"]:  # the default of every request the server's engine runs
        from apr.engine import speculative

        speculative.configure(spec["speculative"], spec["draft_model"], spec["draft_max"])
    from apr.serve.server import serve

    return serve(args)
