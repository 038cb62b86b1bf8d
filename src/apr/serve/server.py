"""Running the server: bind first (a busy port is a one-line error, and port 0 picks a free one), answer
/health with 503 while the model loads in a thread, print the URL once ready, and on SIGTERM/SIGINT stop
accepting, let in-flight requests finish (uvicorn waits for open connections), then drain the engine."""

from __future__ import annotations

import contextlib
import logging
import socket
import sys
import threading
from pathlib import Path

from apr.errors import AprError
from apr.serve.app import ServeState, create_app
from apr.serve.errors import CatchAll

log = logging.getLogger("apr.serve")


def model_name(spec: str | None) -> str:
    from apr import hub

    spec = spec or hub.DEFAULT_MODEL
    return spec if spec in hub.REGISTRY else Path(spec).stem


def bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise AprError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def url_of(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def _server_class():
    import signal

    import uvicorn

    class Server(uvicorn.Server):
        """uvicorn's, except that a drained shutdown exits 0 (uvicorn re-raises the signal once done)."""

        @contextlib.contextmanager
        def capture_signals(self):
            if threading.current_thread() is not threading.main_thread():
                yield
                return
            previous = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
            try:
                yield
            finally:
                for sig, handler in previous.items():
                    signal.signal(sig, handler)

    return Server


def default_parallel(lm, tokens_per_slot: int, most: int = 8) -> int:
    """Slots that fit a quarter of the memory available now, each holding `tokens_per_slot` tokens of KV
    (keys and values of every layer), at most `most`: beyond that a CPU step is compute-bound anyway."""
    cfg = lm.config
    per_token = 2 * cfg.n_layers * cfg.n_kv_heads * cfg.head_dim * (4 if lm.dtype == "float32" else 2)
    try:
        with open("/proc/meminfo") as f:
            avail = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError):
        avail = 4 << 30
    return max(1, min(most, avail // 4 // max(1, per_token * tokens_per_slot)))


def start_engine(lm, parallel: int | None, max_queue: int, tokens_per_slot: int = 4096):
    from apr.engine import Engine

    if parallel is None:
        parallel = default_parallel(lm, min(lm.config.context_length, tokens_per_slot))
    engine = Engine(lm, parallel=parallel, max_queue=max_queue)
    engine.start()
    return engine


def serve(args) -> int:
    """`apr serve`: returns the exit code (0 after a clean drain, 1 if the model failed to load)."""
    import uvicorn

    from apr import hub

    path = hub.resolve_model(args.model)  # a missing file or unknown name fails here, before binding
    sock = bind(args.host, args.port)
    url = url_of(sock)
    state = ServeState(model_id=model_name(args.model), api_key=args.api_key,
                       default_max_tokens=getattr(args, "max_tokens", None) or 4096)
    server = None
    failed = threading.Event()

    def load():
        try:
            from apr.runtime import load_model  # torch: in the loader thread, after the port is bound

            if getattr(args, "threads", None):
                import torch

                torch.set_num_threads(args.threads)
            lm = load_model(path, dtype=args.dtype, backend=args.backend, quiet=True)
            engine = start_engine(lm, args.parallel, args.max_queue, 2 * state.default_max_tokens)
            state.lm, state.engine = lm, engine  # the engine last: it is what "ready" means
            print(f"apr serve: {state.model_id} ready on {url} (parallel {engine.parallel}, {lm.backend} {lm.dtype}); "
                  f"OpenAI API at {url}/v1", flush=True)
        except Exception as e:  # noqa: BLE001 - reported as one line, then the server exits
            state.load_error = str(e) if isinstance(e, AprError) else f"{type(e).__name__}: {e}"
            print(f"apr: error: cannot load {state.model_id}: {state.load_error}", file=sys.stderr, flush=True)
            failed.set()
            if server is not None:
                server.should_exit = True

    @contextlib.asynccontextmanager
    async def lifespan(_app):
        threading.Thread(target=load, name="apr-serve-load", daemon=True).start()
        yield
        if state.engine is not None:
            print("apr serve: draining", file=sys.stderr, flush=True)
            state.engine.stop(drain=True)

    app = CatchAll(create_app(state, args.cors_origin, lifespan))
    config = uvicorn.Config(app, log_level="warning", access_log=False, timeout_graceful_shutdown=None,
                            timeout_keep_alive=5, lifespan="on")
    server = _server_class()(config)
    print(f"apr serve: loading {state.model_id}; listening on {url} (/health answers 503 until ready)",
          file=sys.stderr, flush=True)
    server.run(sockets=[sock])
    return 1 if failed.is_set() else 0
