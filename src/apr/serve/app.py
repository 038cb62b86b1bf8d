"""The FastAPI app: shared state, the API-key gate, CORS (only when asked), /health, /metrics, /tokenize,
/detokenize, and the OpenAI and Ollama routers."""

from __future__ import annotations

import hmac
import json
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse

from apr import __version__
from apr.serve import common, errors, metrics
from apr.serve.errors import APIError, bad_request
from apr.serve.schemas import DetokenizeRequest, TokenizeRequest

OPEN_PATHS = {"/health"}  # liveness probes need no key


@dataclass
class ServeState:
    model_id: str
    api_key: str | None = None
    retry_after: int = 1
    default_max_tokens: int = 4096
    lm: object = None
    engine: object = None
    load_error: str | None = None
    created: int = field(default_factory=lambda: int(time.time()))
    http_counts: dict = field(default_factory=dict)

    @property
    def loading(self) -> bool:
        return self.engine is None

    def ready(self) -> "ServeState":
        if self.engine is None:
            raise APIError(503, "the model is still loading", None, "model_loading", {"Retry-After": "2"})
        return self

    @property
    def fingerprint(self) -> str:
        return f"apr-{__version__}-{self.engine.step_impl}"

    @property
    def quantization(self) -> str:
        """The GGUF file type by llama.cpp's name (Q4_K_M), as Ollama reports it."""
        ftype = self.lm.metadata.get("general.file_type")
        try:
            from gguf import LlamaFileType

            return LlamaFileType(int(ftype)).name.removeprefix("MOSTLY_")
        except (TypeError, ValueError):
            return str(ftype or "")

    def model_card(self) -> dict:
        return {"id": self.model_id, "object": "model", "created": self.created, "owned_by": "apr",
                "max_model_len": self.lm.config.context_length}

    def ollama_model(self) -> dict:
        path, cfg = self.lm.path, self.lm.config
        modified = datetime.fromtimestamp(path.stat().st_mtime, timezone.utc).isoformat().replace("+00:00", "Z")
        details = {"format": path.suffix.lstrip("."), "family": cfg.architecture, "families": [cfg.architecture],
                   "parameter_size": str(self.lm.metadata.get("general.size_label", "")),
                   "quantization_level": self.quantization}
        return {"name": self.model_id, "model": self.model_id, "modified_at": modified,
                "size": path.stat().st_size, "digest": self.lm.sha256, "details": details}


class Gate:
    """Pure ASGI (streams and disconnects pass straight through): the API key, and response counts."""

    def __init__(self, app, state: ServeState):
        self.app, self.state = app, state

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        counts = self.state.http_counts

        async def counted(message):
            if message["type"] == "http.response.start":
                counts[message["status"]] = counts.get(message["status"], 0) + 1
            await send(message)

        key = self.state.api_key
        if key and scope["path"] not in OPEN_PATHS and scope["method"] != "OPTIONS" and not self._authorized(scope, key):
            body = json.dumps(errors.error_body(401, "a valid API key is required: Authorization: Bearer KEY",
                                                None, "invalid_api_key")).encode()
            await counted({"type": "http.response.start", "status": 401,
                           "headers": [(b"content-type", b"application/json"), (b"www-authenticate", b"Bearer")]})
            return await send({"type": "http.response.body", "body": body})
        await self.app(scope, receive, counted)

    @staticmethod
    def _authorized(scope, key: str) -> bool:
        headers = dict(scope.get("headers") or [])
        value = headers.get(b"authorization", b"").decode("latin-1")
        scheme, _, token = value.partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), key.encode())


def create_app(state: ServeState, cors_origins: list[str] | None = None, lifespan=None) -> FastAPI:
    from apr.serve import ollama_api, openai_api

    app = FastAPI(title="apr serve", version=__version__, lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.apr = state
    errors.install(app)
    app.include_router(openai_api.router)
    app.include_router(ollama_api.router)
    _add_routes(app)
    app.add_middleware(Gate, state=state)
    if cors_origins:  # added last: outermost, so preflight requests are answered before the key check
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=cors_origins, allow_methods=["*"], allow_headers=["*"])
    return app


def _add_routes(app: FastAPI) -> None:
    @app.get("/")
    async def root():  # Ollama answers its root the same way; some clients probe it
        return PlainTextResponse("apr serve is running")

    @app.get("/health")
    async def health(http: Request):
        state: ServeState = http.app.state.apr
        if state.loading:
            return JSONResponse({"status": "loading", "error": state.load_error}, status_code=503,
                                headers={"Retry-After": "2"})
        return {"status": "ok", "model": state.model_id, "step_impl": state.engine.step_impl,
                "activations": state.engine.lm.activations,
                "parallel": state.engine.parallel}

    @app.get("/metrics")
    async def prometheus(http: Request):
        state: ServeState = http.app.state.apr
        stats = None if state.loading else state.engine.stats()
        return PlainTextResponse(metrics.render(stats, state.http_counts, state.model_id, state.loading),
                                 media_type="text/plain; version=0.0.4")

    @app.post("/tokenize")
    async def tokenize(body: TokenizeRequest, http: Request):
        from apr.generate import prepare_messages

        state = http.app.state.apr.ready()
        texts = [t for t in (body.content, body.prompt) if t is not None]
        if len(texts) + (body.messages is not None) != 1:
            raise bad_request("give exactly one of content, prompt or messages", "content")
        if body.messages is not None:
            msgs = [m.as_template_message(i) for i, m in enumerate(body.messages)]
            _, ids = prepare_messages(state.lm, msgs, add_generation_prompt=body.add_generation_prompt)
        else:
            ids = state.lm.tokenizer.encode(texts[0], add_bos=None if body.add_special else False)
        return {"tokens": ids, "count": len(ids), "max_model_len": state.lm.config.context_length}

    @app.post("/detokenize")
    async def detokenize(body: DetokenizeRequest, http: Request):
        state = http.app.state.apr.ready()
        common.check_ids(state, body.tokens, "tokens")
        return {"content": state.lm.tokenizer.decode(body.tokens)}
