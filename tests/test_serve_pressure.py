"""serve.py under pressure, on a live uvicorn (a thread of this process, the tiny model): uploads over the
memory budget get 503 + Retry-After before their body is read; the bound on queued work and on waiting; a
slow body hits its deadline and a slowloris connection is cut; a vanished client's images are not generated
and a batch of only vanished clients stops; /metrics parses and moves."""
import io
import socket
import threading
import time
from contextlib import contextmanager
from urllib.parse import urlsplit

import httpx
import pytest
import torch
import uvicorn
from conftest import make_model
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

import serve
from serve import Limits, create_app
from tools.loadtest_pressure import metric

SMALL = dict(max_batch=4, max_wait_ms=5, max_upload_mb=1, max_files=2, max_megapixels=1, max_request_tokens=400)


def png(color=(200, 30, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (40, 30), color).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return make_model().eval()


@contextmanager
def live(model, generate=None, **limits):
    """serve.py's app on a free port of 127.0.0.1, run by uvicorn with serve.py's settings -> (base URL, app)."""
    if generate is not None:
        real, serve.generate = serve.generate, generate
    try:
        lim = Limits(**(SMALL | limits))
        app = create_app(model, "tiny.pth", lim)
    finally:
        if generate is not None:
            serve.generate = real
    sock = serve.listen("127.0.0.1", 0)
    server = uvicorn.Server(serve.server_config(app, lim, 5, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}/", app
    finally:
        server.should_exit = True
        thread.join(30)


def body(n_files=1, pad=0) -> tuple[bytes, str]:
    files = [("files", (f"im{i}.png", png((40 * i, 90, 90)) + b"\0" * pad, "image/png")) for i in range(n_files)]
    request = httpx.Request("POST", "http://x/caption", files=files)
    return request.read(), request.headers["content-type"]


def raw(url, head: bytes) -> socket.socket:
    s = socket.create_connection((urlsplit(url).hostname, urlsplit(url).port), timeout=10)
    s.sendall(head)
    return s


def head(content_type: str, length: int | None, expect=False) -> bytes:
    lines = ["POST /caption HTTP/1.1", "Host: x", f"Content-Type: {content_type}"]
    lines += [f"Content-Length: {length}"] if length is not None else ["Transfer-Encoding: chunked"]
    lines += ["Expect: 100-continue"] if expect else []
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def answer(s: socket.socket) -> bytes:
    """Everything the server sends until it closes or 5 s pass."""
    out = b""
    s.settimeout(5)
    try:
        while chunk := s.recv(65536):
            out += chunk
    except (TimeoutError, ConnectionResetError):
        pass
    return out


def until(predicate, timeout=10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return False


def test_uploads_past_the_memory_budget_get_503_and_retry_after_before_their_body_is_read(model):
    with live(model, max_inflight_mb=4) as (url, app):
        data, ctype = body()
        holder = raw(url, head(ctype, 3 * 2**20) + data[:1000])             # 3 MB declared, held, never finished
        assert until(lambda: metric(url, "capkit_inflight_bytes") == 3 * 2**20)
        t = time.monotonic()
        second = raw(url, head(ctype, 2 * 2**20, expect=True))             # 2 MB more would pass the 4 MB
        reply = answer(second)
        assert reply.startswith(b"HTTP/1.1 503") and b"100 Continue" not in reply, reply[:300]
        assert b"retry-after: " in reply.lower() and b"--max_inflight_mb" in reply and time.monotonic() - t < 3
        big, big_type = body(pad=2**21)
        chunked = raw(url, head(big_type, None))                            # no size: refused as its bytes pass it
        try:
            for i in range(0, len(big), 2**18):
                chunked.sendall(b"%x\r\n%s\r\n" % (len(big[i:i + 2**18]), big[i:i + 2**18]))
        except (BrokenPipeError, ConnectionResetError):
            pass
        assert answer(chunked).startswith(b"HTTP/1.1 503")
        assert httpx.get(url + "health").status_code == 200                 # /health needs no budget
        assert httpx.post(url + "caption", content=data, headers={"content-type": ctype}).status_code == 200
        holder.close()
        assert until(lambda: metric(url, "capkit_inflight_bytes") == 0)    # the held bytes are given back
        assert metric(url, "capkit_refused_total", reason="memory_budget") == 2


def blocking_generate(calls, release, steps=None):
    """serve.generate's stand-in: records each call's image count, holds the first until `release` is set,
    and (steps) decodes in steps of 10 ms, asking stop() before each, as transformers does."""
    def generate(model, pixels, options, stop=None):
        calls.append(len(pixels))
        if len(calls) == 1:
            release.wait(30)
            return [f"caption {i}" for i in range(len(pixels))]
        for i in range(steps or 0):
            if stop is not None and stop():
                steps_done.append(i)
                break
            time.sleep(0.01)
        return [f"caption {i}" for i in range(len(pixels))]
    steps_done = []
    generate.steps_done = steps_done
    return generate


def test_the_queue_bound_and_the_wait_bound_answer_503_with_retry_after(model, monkeypatch):
    calls, release, decoded = [], threading.Event(), []
    real_decode = serve.decode_image
    monkeypatch.setattr(serve, "decode_image", lambda *a: decoded.append(1) or real_decode(*a))
    data, ctype = body()
    post = dict(content=data, headers={"content-type": ctype}, params={"max_new_tokens": 40}, timeout=30)
    with live(model, blocking_generate(calls, release), max_queue_tokens=80, max_queue_s=2) as (url, app):
        with httpx.Client() as http:
            first = threading.Thread(target=http.post, args=(url + "caption",), kwargs=post)
            first.start()                                                   # 40 tokens, generating (held)
            assert until(lambda: calls == [1])
            assert metric(url, "capkit_inflight_bytes") == 0               # its upload, decoded, is let go
            second = []
            t2 = threading.Thread(target=lambda: second.append(http.post(url + "caption", **post)))
            t2.start()                                                      # 80 of 80 queued
            assert until(lambda: metric(url, "capkit_queue_tokens") == 80)
            r = http.post(url + "caption", **post)                          # past the bound: at once
            assert r.status_code == 503 and int(r.headers["retry-after"]) >= 1 and "--max_queue_tokens" in r.text
            assert len(decoded) == 2                                        # (refused before its image was decoded)
            t2.join(10)
            assert second[0].status_code == 503 and "--max_queue_s" in second[0].text  # 2 s unstarted
            release.set()
            first.join(10)
        assert metric(url, "capkit_refused_total", reason="queue_full") == 1
        assert metric(url, "capkit_refused_total", reason="queue_timeout") == 1
        assert until(lambda: metric(url, "capkit_queue_tokens") == 0)


def test_a_slow_body_hits_its_deadline_and_a_slowloris_connection_is_cut(model):
    with live(model, body_timeout_s=1, idle_timeout_s=1) as (url, app):
        data, ctype = body()
        t = time.monotonic()
        slow = raw(url, head(ctype, len(data)) + data[:100])                 # and nothing more
        reply = answer(slow)
        assert reply.startswith(b"HTTP/1.1 408") and b"--body_timeout_s" in reply and time.monotonic() - t < 4
        loris = raw(url, b"POST /caption HTTP/1.1\r\nHost: x\r\n")
        t = time.monotonic()
        closed = False
        while time.monotonic() - t < 5:                                      # one header byte every 0.2 s
            try:
                loris.sendall(b"X")
                loris.settimeout(0.2)
                if loris.recv(1) == b"":
                    closed = True
                    break
            except TimeoutError:
                continue
            except (BrokenPipeError, ConnectionResetError):
                closed = True
                break
        assert closed and time.monotonic() - t < 3
        assert metric(url, "capkit_refused_total", reason="body_timeout") == 1
        assert metric(url, "capkit_idle_connections_cut_total") == 1
        assert httpx.post(url + "caption", content=data, headers={"content-type": ctype}).status_code == 200


def test_a_vanished_clients_images_are_not_generated_and_a_batch_of_vanished_clients_stops(model):
    calls, release = [], threading.Event()
    generate = blocking_generate(calls, release, steps=300)
    data, ctype = body()
    with live(model, generate) as (url, app):
        with httpx.Client() as http:
            first = threading.Thread(target=http.post, args=(url + "caption",),
                                     kwargs=dict(content=data, headers={"content-type": ctype}, timeout=30))
            first.start()
            assert until(lambda: calls == [1])                              # generating, held
            gone = raw(url, head(ctype, len(data)) + data)                  # queued behind it, then leaves
            assert until(lambda: metric(url, "capkit_queue_images") == 2)
            gone.close()
            assert until(lambda: metric(url, "capkit_vanished_requests_total") == 1)
            release.set()
            first.join(30)
            time.sleep(0.5)                                                 # (time for a wrong batch to start)
            assert calls == [1]                                             # the vanished image: never generated
            running = raw(url, head(ctype, len(data)) + data)                # alone in its batch, then leaves
            assert until(lambda: calls == [1, 1])
            running.close()
            assert until(lambda: metric(url, "capkit_batches_stopped_total") == 1)
        assert generate.steps_done and generate.steps_done[-1] < 300       # stopped at a step, not run out
        assert metric(url, "capkit_requests_total", path="/caption", status="499") == 2


def test_a_model_failure_is_counted_as_a_500(model):
    def failing(model, pixels, options, stop=None):
        raise RuntimeError("the model failed")
    with live(model, failing) as (url, app):
        data, ctype = body()
        assert httpx.post(url + "caption", content=data, headers={"content-type": ctype}).status_code == 500
        assert metric(url, "capkit_requests_total", path="/caption", status="500") == 1
        assert metric(url, "capkit_requests_total", path="/caption", status="499") == 0


def test_metrics_parse_and_move_with_the_traffic(model):
    with live(model) as (url, app):
        before = {n: metric(url, n) for n in ("capkit_images_captioned_total", "capkit_batch_images_count",
                                              "capkit_caption_seconds_count")}
        data, ctype = body(n_files=2)
        assert httpx.post(url + "caption", content=data, headers={"content-type": ctype}).status_code == 200
        assert httpx.post(url + "caption", content=b"x", headers={"content-type": "text/plain"}).status_code == 415
        text = httpx.get(url + "metrics")
        assert text.headers["content-type"].startswith("text/plain")
        names = {f.name for f in text_string_to_metric_families(text.text)}
        assert {"capkit_requests", "capkit_images_captioned", "capkit_batch_images", "capkit_caption_seconds",
                "capkit_queue_images", "capkit_inflight_bytes", "capkit_refused"} <= names
        assert metric(url, "capkit_images_captioned_total") == before["capkit_images_captioned_total"] + 2
        assert metric(url, "capkit_batch_images_count") == before["capkit_batch_images_count"] + 1
        assert metric(url, "capkit_caption_seconds_count") == before["capkit_caption_seconds_count"] + 1  # 200s only
        assert metric(url, "capkit_requests_total", path="/caption", status="200") == 1
        assert metric(url, "capkit_requests_total", path="/caption", status="415") == 1
