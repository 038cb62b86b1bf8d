"""The batched generation engine (see API.md): every command and the server generate through it."""

from apr.engine.engine import Engine, QueueFull, engine_for
from apr.engine.request import Event, Request, SamplingParams

__all__ = ["Engine", "Event", "QueueFull", "Request", "SamplingParams", "engine_for"]
