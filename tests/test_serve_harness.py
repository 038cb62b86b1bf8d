"""A real `apr serve` app on a loopback port, in a thread of the test process (so tests can read the
engine's state directly); no tests here, only what test_serve*.py share."""

from __future__ import annotations

import threading
import time

import pytest


class LiveServer:
    def __init__(self, lm, parallel: int = 4, max_queue: int = 16, api_key: str | None = None,
                 cors: list[str] | None = None, start: bool = True):
        import uvicorn

        from apr.engine import Engine
        from apr.serve.app import ServeState, create_app
        from apr.serve.errors import CatchAll
        from apr.serve.server import bind, url_of

        self.engine = Engine(lm, parallel=parallel, max_queue=max_queue)
        if start:  # not started: requests wait in the queue until engine.start()
            self.engine.start()
        self.state = ServeState(model_id="tiny", api_key=api_key, lm=lm, engine=self.engine)
        sock = bind("127.0.0.1", 0)
        self.url = url_of(sock)
        config = uvicorn.Config(CatchAll(create_app(self.state, cors)), log_level="warning", lifespan="off")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the test server did not start")
            time.sleep(0.02)
        self.submitted: list = []  # every engine Request, in order (to check cancellation)
        submit = self.engine.submit

        def recording_submit(ids, params):
            req = submit(ids, params)
            self.submitted.append(req)
            return req

        self.engine.submit = recording_submit

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)
        self.engine.stop(drain=False, timeout=10)


def wait_for(predicate, timeout: float = 10.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.01)
    pytest.fail(f"timed out waiting for {what}")
