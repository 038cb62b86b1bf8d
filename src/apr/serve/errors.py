"""Errors as OpenAI-style objects: {"error": {"message", "type", "param", "code"}}; Ollama routes get
Ollama's {"error": "message"}. No handler lets a traceback reach a client."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger("apr.serve")

TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
         405: "invalid_request_error", 413: "invalid_request_error", 422: "invalid_request_error",
         503: "server_error"}


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.headers = status, message, param, code, headers


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param, code)


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": TYPES.get(status, "server_error" if status >= 500
                                                             else "invalid_request_error"),
                      "param": param, "code": code}}


def error_response(request: Request | None, status: int, message: str, param: str | None = None,
                   code: str | None = None, headers: dict | None = None) -> JSONResponse:
    if request is not None and request.url.path.startswith("/api/"):  # Ollama's clients read a plain string
        return JSONResponse({"error": message}, status_code=status, headers=headers)
    return JSONResponse(error_body(status, message, param, code), status_code=status, headers=headers)


def _loc(loc) -> str:
    parts = [str(p) for p in loc if p != "body"]
    return ".".join(parts) if parts else "body"


def validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    """One line naming the first problem: bad JSON, an unknown field, or a field of the wrong type."""
    err = exc.errors()[0]
    kind, param = err.get("type", ""), _loc(err.get("loc", ()))
    if kind == "json_invalid":
        return f"the request body is not valid JSON: {err.get('ctx', {}).get('error', err.get('msg'))}", None
    if kind == "extra_forbidden":
        return f"unknown field '{param}'", param
    if kind == "missing":
        return f"missing required field '{param}'", param
    if param == "body" and kind in ("model_attributes_type", "dict_type"):
        return "the request body must be a JSON object", None
    return f"invalid value for '{param}': {err.get('msg', 'invalid')}", param


def install(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        return error_response(request, exc.status, exc.message, exc.param, exc.code, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        message, param = validation_message(exc)
        return error_response(request, 400, message, param, "invalid_request")

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        message = exc.detail if isinstance(exc.detail, str) else "request failed"
        if exc.status_code == 404:
            message = f"no route {request.method} {request.url.path}"
        return error_response(request, exc.status_code, message, None, None, getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _bug(request: Request, exc: Exception):  # Starlette answers with this, then re-raises to CatchAll
        return error_response(request, 500, f"internal error: {type(exc).__name__}", None, "internal_error")


class CatchAll:
    """Outermost ASGI wrapper: a bug of ours becomes a one-line log and a JSON 500, not a traceback
    (Starlette's own handler for Exception re-raises after answering)."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = False

        async def tracked(message):
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, receive, tracked)
        except Exception as e:  # noqa: BLE001 - the point of this wrapper
            log.error("internal error on %s %s: %s: %s", scope.get("method"), scope.get("path"), type(e).__name__, e)
            if started:
                return  # the response is under way; the connection just ends
            import json

            body = json.dumps(error_body(500, f"internal error: {type(e).__name__}", None, "internal_error")).encode()
            await send({"type": "http.response.start", "status": 500,
                        "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
            await send({"type": "http.response.body", "body": body})
