"""`apr serve`: an OpenAI- and Ollama-compatible HTTP server over the batched engine (apr.engine).

    server.py        socket, uvicorn, model loading in the background, SIGTERM drain
    app.py           the FastAPI app: state, auth, CORS, health, metrics, tokenize
    openai_api.py    /v1/chat/completions, /v1/completions, /v1/models
    ollama_api.py    /api/chat, /api/generate, /api/tags, /api/show, /api/version
    schemas.py       request models (closed where OpenAI's schema is closed)
    common.py        request -> engine parameters, streaming the engine's events, logprobs
    errors.py        every failure as an OpenAI-style error object, never a traceback
    metrics.py       Prometheus text from engine.stats()

Imported only by `apr serve` (fastapi and uvicorn are not needed for any other command).
"""
