"""A local OpenAI-compatible chat-completions server for tests (nothing leaves the machine).

It answers ``POST /v1/chat/completions`` on 127.0.0.1 (a free port) after ``latency_s``, labels each
text deterministically, lists ``models`` at ``GET /v1/models`` (404 when ``models`` is ``None``, or
``models_status`` if set), and can be told to misbehave: per text (``script``), for the next requests
whatever their text (``fail_next``), by a function of the request (``policy``), or with one status
for every request until told otherwise (``down_with``: an outage, a refused key). Every request is
recorded with its arrival and answer times (the server's ``time.monotonic``), text, model,
``Authorization`` header, status and JSON body. Error bodies echo the key the client sent, as real
providers do, so a test can prove the worker never repeats them.

It serves from a thread of its own (with its own event loop), started and stopped from the test's
event loop, while the replicas under test run as subprocesses.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import socket
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

DEFAULT_LABELS = ("question", "complaint", "order", "greeting", "spam", "other")


@dataclass(frozen=True)
class Reply:
    """One scripted answer: a status, headers, and either a message ``content`` or a raw body."""

    status: int = 200
    content: str | None = None
    headers: tuple[tuple[str, str], ...] = ()
    raw_body: str | None = None

    @classmethod
    def ok(cls, label: str, confidence: float = 0.9) -> Reply:
        return cls(content=json.dumps({"label": label, "confidence": confidence}))

    @classmethod
    def rate_limited(cls, retry_after_s: float) -> Reply:
        return cls(status=429, headers=(("Retry-After", f"{retry_after_s:g}"),))

    @classmethod
    def server_error(cls, status: int = 500) -> Reply:
        return cls(status=status)

    @classmethod
    def not_json(cls) -> Reply:
        return cls(content="Sure! This message is a question, I think.")

    @classmethod
    def unknown_label(cls) -> Reply:
        return cls(content=json.dumps({"label": "weather_report", "confidence": 0.99}))

    @classmethod
    def http_error(cls, status: int) -> Reply:
        return cls(status=status)


@dataclass
class Recorded:
    """One request as the server saw it."""

    received_at: float
    answered_at: float
    text: str
    model: str
    authorization: str
    status: int
    body: dict[str, Any] = field(repr=False)


Policy = Callable[[str, int], Reply | None]


class FakeLLM:
    """``async with FakeLLM(latency_s=0.2) as llm:`` then point ``LLM_BASE_URL`` at ``llm.base_url``."""

    def __init__(self, *, latency_s: float = 0.0, labels: tuple[str, ...] = DEFAULT_LABELS) -> None:
        self.latency_s = latency_s
        self.labels = labels
        self.requests: list[Recorded] = []
        self.policy: Policy | None = None
        self.down_with: int | None = None  # every chat completion answers this status while set
        self.models: list[str] | None = ["test-model"]
        self.models_status = 200
        self.models_requests: list[str] = []  # the Authorization header of each GET /v1/models
        self._scripts: dict[str, deque[Reply]] = {}
        self._next: deque[Reply] = deque()
        self._runner: web.AppRunner | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self.port = 0

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def label_for(self, text: str) -> str:
        """The label this server gives ``text`` when nothing is scripted (stable across runs)."""
        digest = hashlib.blake2b(" ".join(text.split()).encode(), digest_size=4).digest()
        return self.labels[int.from_bytes(digest, "big") % len(self.labels)]

    def script(self, text: str, *replies: Reply) -> None:
        """Answer the next requests for ``text`` with ``replies``, in order (then normally)."""
        self._scripts.setdefault(text, deque()).extend(replies)

    def fail_next(self, *replies: Reply) -> None:
        """Answer the next requests, whatever their text, with ``replies`` in order."""
        self._next.extend(replies)

    def requests_for(self, text: str) -> list[Recorded]:
        return [r for r in self.requests if r.text == text]

    def max_in_window(self, window_s: float = 1.0) -> int:
        """The most requests that arrived within any ``window_s`` (half-open) window."""
        times = sorted(r.received_at for r in self.requests)
        best, start = 0, 0
        for end, t in enumerate(times):
            while t - times[start] >= window_s:
                start += 1
            best = max(best, end - start + 1)
        return best

    def requests_between(self, start: float, end: float) -> list[Recorded]:
        """The requests that arrived from ``start`` to ``end`` (``time.monotonic`` values)."""
        return [r for r in self.requests if start <= r.received_at < end]

    def _reply_for(self, text: str) -> Reply:
        if self.down_with is not None:
            return Reply.http_error(self.down_with)
        scripted = self._scripts.get(text)
        if scripted:
            return scripted.popleft()
        if self._next:
            return self._next.popleft()
        if self.policy is not None:
            decided = self.policy(text, len(self.requests))
            if decided is not None:
                return decided
        return Reply.ok(self.label_for(text))

    async def _handle(self, request: web.Request) -> web.Response:
        received_at = time.monotonic()
        authorization = request.headers.get("Authorization", "")
        try:
            body = json.loads(await request.read())
            text = str(body["messages"][-1]["content"])
            model = str(body["model"])
        except (ValueError, KeyError, IndexError, TypeError):
            return web.json_response({"error": {"message": "bad request"}}, status=400)
        reply = self._reply_for(text)
        if self.latency_s:
            await asyncio.sleep(self.latency_s)
        response = self._render(reply, model, authorization)
        self.requests.append(
            Recorded(
                received_at,
                time.monotonic(),
                text,
                model,
                authorization,
                reply.status,
                body,
            )
        )
        return response

    async def _models(self, request: web.Request) -> web.Response:
        self.models_requests.append(request.headers.get("Authorization", ""))
        if self.models is None:
            return web.json_response({"error": {"message": "not found"}}, status=404)
        if self.models_status != 200:
            return web.json_response({"error": {"message": "no"}}, status=self.models_status)
        listed = [{"id": model, "object": "model", "owned_by": "test"} for model in self.models]
        return web.json_response({"object": "list", "data": listed})

    @staticmethod
    def _render(reply: Reply, model: str, authorization: str) -> web.Response:
        headers = dict(reply.headers)
        if reply.status != 200:
            # Like real providers, errors quote the key they were given: the worker must not.
            error = {
                "error": {"message": f"failed for key {authorization!r}", "code": reply.status}
            }
            return web.json_response(error, status=reply.status, headers=headers)
        if reply.raw_body is not None:
            return web.Response(
                text=reply.raw_body, content_type="application/json", headers=headers
            )
        completion = {
            "id": "chatcmpl-test",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": model,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": reply.content},
                    "finish_reason": "stop",
                }
            ],
            "usage": {"prompt_tokens": 50, "completion_tokens": 10, "total_tokens": 60},
        }
        return web.json_response(completion, headers=headers)

    async def start(self) -> FakeLLM:
        """Serve from a thread of its own, so that the test's own event loop being busy (publishing,
        collecting results) never delays the server's answers or skews its timestamps."""
        ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        caller = asyncio.get_running_loop()

        def serve() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            try:
                loop.run_until_complete(self._serve())
                caller.call_soon_threadsafe(ready.set_result, None)
            except BaseException as exc:  # report start-up failures to the test
                caller.call_soon_threadsafe(ready.set_exception, exc)
                return
            loop.run_forever()
            loop.run_until_complete(self._cleanup())
            loop.close()

        self._thread = threading.Thread(target=serve, name="fake-llm", daemon=True)
        self._thread.start()
        await ready
        return self

    async def _serve(self) -> None:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self._handle)
        app.router.add_get("/v1/models", self._models)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", 0))
        self.port = int(sock.getsockname()[1])
        await web.SockSite(self._runner, sock).start()

    async def _cleanup(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def close(self) -> None:
        if self._thread is None or self._loop is None:
            return
        self._loop.call_soon_threadsafe(self._loop.stop)
        await asyncio.to_thread(self._thread.join, 10)
        self._thread = None

    async def __aenter__(self) -> FakeLLM:
        return await self.start()

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()


def replica_env(llm: FakeLLM, env: dict[str, str], **extra: str) -> dict[str, str]:
    """``env`` (from ``Names.env``) plus the settings of an LLM replica talking to ``llm``."""
    return {
        **env,
        "CLASSIFIER": "llm",
        "LLM_BASE_URL": llm.base_url,
        "LLM_MODEL": "test-model",
        "LLM_TIMEOUT_S": "5",
        **extra,
    }
