"""
What serve.py lets in, so that load can't take it down: a budget of request-body bytes in flight, a deadline
for each body, and a uvicorn protocol that closes connections that start no request (slowloris). Refusals are
answered at once, with Retry-After, before the bytes they refuse are read.

    app.add_middleware(Admission, budget=Budget(2**30), body_limit=..., body_timeout_s=30, metrics=metrics)
    uvicorn.Config(app, http=idle_guarded_h11(10, on_cut))
"""
from __future__ import annotations

import asyncio
import json
import math
import time

from uvicorn.protocols.http.h11_impl import H11Protocol

BODY_GRACE_S_PER_MB = 1.0   # a body's deadline grows by this per MB received: a big upload on a slow link finishes
RELEASE = "capkit.release_body"  # scope key: the app calls it once the body's bytes are let go (spooled files closed)


class Budget:
    """Request-body bytes in flight, at most `limit`: take() all or nothing, give() back when answered."""

    def __init__(self, limit: int):
        self.limit, self.used = limit, 0

    def take(self, n: int) -> bool:
        if self.used + n > self.limit:
            return False
        self.used += n
        return True

    def give(self, n: int) -> None:
        self.used -= n


class Refused(Exception):
    """A request answered before its body is read in full: status, one sentence, and the connection closed
    (the unread bytes are not drained); 503s carry Retry-After."""

    def __init__(self, status: int, detail: str, reason: str, retry_after: int | None = None):
        super().__init__(detail)
        self.status, self.detail, self.reason, self.retry_after = status, detail, reason, retry_after

    async def answer(self, send) -> None:
        headers = [(b"content-type", b"application/json"), (b"connection", b"close")]
        if self.retry_after is not None:
            headers.append((b"retry-after", str(self.retry_after).encode()))
        await send({"type": "http.response.start", "status": self.status, "headers": headers})
        await send({"type": "http.response.body", "body": json.dumps({"detail": self.detail}).encode()})


def retry_after_s(seconds: float) -> int:
    """What Retry-After says: the expected wait rounded up, 1 s to 1 min."""
    return int(min(60, max(1, math.ceil(seconds))))


class Admission:
    """ASGI middleware. Every response is counted by status (metrics.answered). A request body is held against
    `budget` from its first byte until the answer: a declared size (Content-Length) that doesn't fit -> 503 at
    once; a chunked body that grows past it -> 503 as soon as it does; over `body_limit` -> 413. A body still
    arriving body_timeout_s after the request began (plus BODY_GRACE_S_PER_MB per MB received) -> 408. Each of
    these closes the connection without reading the rest. The app gives the bytes back early through
    scope[RELEASE] (release_body) once it has let them go."""

    def __init__(self, app, budget: Budget, body_limit: int, body_timeout_s: float, metrics):
        self.app, self.budget, self.body_limit, self.body_timeout_s = app, budget, body_limit, body_timeout_s
        self.metrics = metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started, status = time.monotonic(), []

        async def counted_send(message):
            if message["type"] == "http.response.start":
                status.append(message["status"])
            await send(message)
        body = _GuardedBody(self, receive, started)
        scope[RELEASE] = body.release
        try:
            body.held = self.admit(dict(scope["headers"]).get(b"content-length"))
            await self.app(scope, body.receive, counted_send)
        except Refused as e:
            self.metrics.refused(e.reason)
            if not status:  # (the app can't have answered: refusals come while the body is read)
                await e.answer(counted_send)
        except Exception:  # answered 500 by Starlette's outermost middleware, after this one: counted as such
            if not status:
                status.append(500)
            raise
        finally:
            body.release()
            self.metrics.answered(scope["path"], status[0] if status else 499, time.monotonic() - started)

    def admit(self, declared: bytes | None) -> int:
        """Bytes taken from the budget for a declared body (0 when chunked or empty), or Refused."""
        size = int(declared) if declared is not None and declared.isdigit() else 0
        if size > self.body_limit:
            raise self.too_large()
        if not self.budget.take(size):
            raise self.busy(size)
        return size

    def too_large(self) -> Refused:
        return Refused(413, f"request body over {self.body_limit / 2**20:.0f} MB (--max_files x --max_upload_mb)",
                       "too_large")

    def busy(self, size: int) -> Refused:
        return Refused(503, f"the server is holding {self.budget.used / 2**20:.0f} MB of uploads (its budget is "
                            f"{self.budget.limit / 2**20:.0f} MB, serve.py --max_inflight_mb) and this request's "
                            f"{size / 2**20:.1f} MB don't fit: retry after the Retry-After seconds",
                       "memory_budget", retry_after_s(self.metrics.mean_request_s()))


class _GuardedBody:
    """One request's receive() under its deadline and the budget; a body longer than declared (or chunked)
    takes budget as its bytes arrive. `held`: what it holds, given back by Admission when it is answered."""

    def __init__(self, admission: Admission, receive, started: float):
        self.a, self._receive, self.started = admission, receive, started
        self.held = self.seen = 0
        self.done = False

    def release(self) -> None:
        """Give the held bytes back to the budget (once the body is in and its files are closed; again: no-op)."""
        self.a.budget.give(self.held)
        self.held = 0

    async def receive(self):
        if self.done:  # the body is in: what follows is the wait for a disconnect, which has no deadline
            return await self._receive()
        left = self.started + self.a.body_timeout_s + BODY_GRACE_S_PER_MB * self.seen / 2**20 - time.monotonic()
        try:
            message = await asyncio.wait_for(self._receive(), max(left, 0))
        except TimeoutError:
            raise Refused(408, f"the request body did not arrive in time ({self.seen:,} bytes in "
                               f"{time.monotonic() - self.started:.0f} s; serve.py --body_timeout_s)",
                          "body_timeout") from None
        self.seen += len(message.get("body", b""))
        self.done = message["type"] != "http.request" or not message.get("more_body", False)
        if self.seen > self.a.body_limit:
            raise self.a.too_large()
        if self.seen > self.held:
            if not self.a.budget.take(self.seen - self.held):
                raise self.a.busy(self.seen)
            self.held = self.seen
        return message


def release_body(scope) -> None:
    """Tell Admission that this request's body bytes are let go (its spooled files closed): they stop counting
    against the budget before the answer (captioning can take long; the images are then the queue's to bound)."""
    scope.get(RELEASE, lambda: None)()


def idle_guarded_h11(idle_timeout_s: float, on_cut):
    """uvicorn's h11 protocol, closing a connection on which no request has begun within idle_timeout_s of its
    opening or of its last answer: a client trickling its headers (uvicorn's keep-alive timer is cancelled by its
    first byte, and armed again only after an answer) is cut off and on_cut() counts it. A connection whose
    request is under way is not touched."""
    class IdleGuardedH11(H11Protocol):
        _idle = None

        def connection_made(self, transport):
            super().connection_made(transport)
            self._arm()

        def on_response_complete(self):
            super().on_response_complete()
            self._arm()

        def connection_lost(self, exc):
            if self._idle is not None:
                self._idle.cancel()
            super().connection_lost(exc)

        def _arm(self):
            if self._idle is not None:
                self._idle.cancel()
            self._idle = self.loop.call_later(idle_timeout_s, self._check, self.cycle)

        def _check(self, cycle_then):
            idle = self.cycle is cycle_then and (self.cycle is None or self.cycle.response_complete)
            if idle and not self.transport.is_closing():
                on_cut()
                self.transport.close()
    return IdleGuardedH11
