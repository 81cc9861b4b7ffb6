"""
loadtest.py's pressure scenarios (run through it: python -m tools.loadtest --scenario flood|clients|pressure ...;
pressure is both, all adds the throughput scenario).

flood:    --flood_clients clients at once, each with one request of --flood_files files x --flood_file_mb MB
          (a noise PNG: incompressible, a real decode), sent with Expect: 100-continue as curl sends large bodies;
          a one-image request every second meanwhile. Prints the server's idle and peak RSS (sampled every 20 ms),
          how each request was answered, the one-image latencies, and whether /health answered throughout.
clients:  the normal load (--clients x --requests of one image) alone, then again beside --slow clients that
          trickle their headers or body at one byte a second and --vanish clients that send a request and
          leave. Prints both p95 latencies and their ratio, the images generated beyond the normal clients' (for
          the vanished: 0 expected), and how many slow clients the server cut off.

All traffic goes to 127.0.0.1, to a serve.py this script starts and stops; every client ends by itself.
"""
from __future__ import annotations

import io
import random
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import urlsplit

import httpx
import numpy as np
import psutil
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

REPLY_TIMEOUT_S = 300     # one flood request, from its first byte to the answer
SLOW_LIMIT_S = 60         # slow clients give up (the server should have cut them off long before)


def noise_png(mb: float, seed: int = 0) -> bytes:
    """A PNG of random pixels, about `mb` MB (noise doesn't compress: the size is the pixels')."""
    side = int((mb * 2**20 / 3) ** 0.5)
    pixels = np.random.default_rng(seed).integers(0, 256, (side, side, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def multipart(files: list[bytes]) -> tuple[list[bytes], str, int]:
    """-> (the body as parts, sent one after another without joining them; content type; length)."""
    boundary = "capkitloadtest" + "%016x" % random.getrandbits(64)
    parts = []
    for i, data in enumerate(files):
        parts += [f'--{boundary}\r\nContent-Disposition: form-data; name="files"; filename="f{i}.png"\r\n'
                  "Content-Type: image/png\r\n\r\n".encode(), data, b"\r\n"]
    parts.append(f"--{boundary}--\r\n".encode())
    return parts, f"multipart/form-data; boundary={boundary}", sum(map(len, parts))


def read_reply(f) -> tuple[int, dict, bytes]:
    """One HTTP response from a socket's file: (status, headers, body)."""
    status = int(f.readline().split()[1])
    headers = {}
    while (line := f.readline()) not in (b"\r\n", b"\n", b""):
        name, _, value = line.partition(b":")
        headers[name.strip().lower().decode()] = value.strip().decode()
    return status, headers, f.read(int(headers.get("content-length", 0)))


def post_expecting(url: str, parts: list[bytes], content_type: str, length: int) -> tuple[int | str, float]:
    """POST /caption with Expect: 100-continue: the body goes only after the server's 100 Continue.
    -> (status, or the error's name; seconds)."""
    t = time.perf_counter()
    host, port = urlsplit(url).hostname, urlsplit(url).port
    try:
        with socket.create_connection((host, port), timeout=REPLY_TIMEOUT_S) as s, s.makefile("rb") as f:
            s.sendall(f"POST /caption HTTP/1.1\r\nHost: {host}\r\nContent-Type: {content_type}\r\n"
                      f"Content-Length: {length}\r\nExpect: 100-continue\r\n\r\n".encode())
            status, _, _ = read_reply(f)
            if status == 100:
                for part in parts:
                    s.sendall(part)
                status, _, _ = read_reply(f)
            return status, time.perf_counter() - t
    except (OSError, ValueError, IndexError) as e:
        return type(e).__name__, time.perf_counter() - t


class RssSampler:
    """The peak resident memory of a process, sampled every 20 ms on a thread until stop()."""

    def __init__(self, pid: int):
        self.proc, self.peak, self.running = psutil.Process(pid), 0, True
        self.thread = threading.Thread(target=self.sample, daemon=True)
        self.thread.start()

    def now(self) -> int:
        return self.proc.memory_info().rss

    def sample(self):
        while self.running:
            try:
                self.peak = max(self.peak, self.now())
            except psutil.Error:
                return
            time.sleep(0.02)

    def stop(self) -> int:
        self.running = False
        self.thread.join()
        return self.peak


def flood(url: str, pid: int, one_image: tuple[bytes, str], args) -> dict:
    """The flood scenario on a running server (pid: its process)."""
    big = noise_png(args.flood_file_mb)
    parts, ctype, length = multipart([big] * args.flood_files)
    idle = psutil.Process(pid).memory_info().rss
    sampler, stop = RssSampler(pid), threading.Event()
    probes, health = [], []

    def probe():  # a small request 0.25 s into the flood, then one a second, and /health, while it lasts
        stop.wait(0.25)
        with httpx.Client(timeout=REPLY_TIMEOUT_S) as http:
            while True:
                t = time.perf_counter()
                r = http.post(url + "caption", content=one_image[0], headers={"content-type": one_image[1]})
                probes.append((r.status_code, time.perf_counter() - t))
                health.append(http.get(url + "health", timeout=10).status_code)
                if stop.wait(1.0):
                    return
    prober = threading.Thread(target=probe, daemon=True)
    prober.start()
    t = time.perf_counter()
    with ThreadPoolExecutor(args.flood_clients) as pool:
        answers = list(pool.map(lambda _: post_expecting(url, parts, ctype, length), range(args.flood_clients)))
    wall = time.perf_counter() - t
    stop.set()
    prober.join()
    return {"idle": idle, "peak": sampler.stop(), "answers": answers, "probes": probes, "health": health,
            "wall": wall, "request_mb": length / 2**20}


def report_flood(r: dict, args) -> bool:
    statuses = {}
    for status, _ in r["answers"]:
        statuses[status] = statuses.get(status, 0) + 1
    grow = (r["peak"] - r["idle"]) / 2**30
    probe_s = [s for _, s in r["probes"]]
    print(f"\nflood: {args.flood_clients} clients x one request of {args.flood_files} files x "
          f"{args.flood_file_mb:g} MB ({r['request_mb']:.0f} MB), {r['wall']:.1f} s")
    print(f"  server RSS: idle {r['idle'] / 2**20:,.0f} MB, peak {r['peak'] / 2**20:,.0f} MB: +{grow:.2f} GB "
          "(target <= +1.5 GB)")
    print(f"  answers: {', '.join(f'{k}: {v}' for k, v in sorted(statuses.items(), key=str))}")
    print(f"  one-image requests during the flood: {len(probe_s)}, statuses "
          f"{sorted({s for s, _ in r['probes']})}, slowest {max(probe_s, default=float('nan')):.2f} s "
          f"(target < 2 s); /health: {sorted(set(r['health']))}")
    answered = all(s in (200, 503) for s, _ in r["answers"])
    return grow <= 1.5 and answered and probe_s != [] and max(probe_s) < 2 and set(r["health"]) == {200}


def slow_clients(url: str, n: int, stop: threading.Event, cut: list) -> threading.Thread:
    """n connections, half trickling their headers and half their body at one byte a second, on one thread;
    `cut` collects the seconds after which the server closed each."""
    host, port = urlsplit(url).hostname, urlsplit(url).port

    def run():
        socks, t0 = [], time.monotonic()
        for i in range(n):
            s = socket.create_connection((host, port), timeout=5)
            s.setblocking(False)
            head = b"POST /caption HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=b\r\n"
            s.send(head if i % 2 else head + b"Content-Length: 100000\r\n\r\n--b\r\n")
            socks.append(s)
        while socks and not stop.is_set() and time.monotonic() - t0 < SLOW_LIMIT_S:
            for s in list(socks):
                try:
                    s.send(b"X")
                    if s.recv(65536) == b"":
                        raise ConnectionResetError
                except BlockingIOError:
                    continue
                except OSError:  # closed by the server (after its answer, if it sent one)
                    cut.append(time.monotonic() - t0)
                    socks.remove(s)
                    s.close()
            stop.wait(1.0)
        for s in socks:
            s.close()
    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def vanishing_clients(url: str, bodies: list[tuple[bytes, str]], spread_s: float) -> threading.Thread:
    """Each body sent as a whole request at a random moment within spread_s, then the connection closed at once."""
    host, port = urlsplit(url).hostname, urlsplit(url).port

    t0 = time.monotonic()

    def run():
        rng = random.Random(1)
        for delay, (data, ctype) in sorted((rng.uniform(0, spread_s), b) for b in bodies):
            time.sleep(max(0.0, delay - (time.monotonic() - t0)))
            with socket.create_connection((host, port), timeout=5) as s:
                s.sendall(f"POST /caption HTTP/1.1\r\nHost: x\r\nContent-Type: {ctype}\r\n"
                          f"Content-Length: {len(data)}\r\n\r\n".encode() + data)
    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def metric(url: str, name: str, **labels: str) -> float:
    """The sample of the server's /metrics with this name and exactly these labels (0 when absent)."""
    for family in text_string_to_metric_families(httpx.get(url + "metrics", timeout=30).text):
        for sample in family.samples:
            if sample.name == name and sample.labels == labels:
                return sample.value
    return 0.0


def pressure(url: str, load, bodies: list, vanish_bodies: list, args) -> dict:
    """The normal load alone, then beside slow and vanishing clients (load: loadtest.load)."""
    base = load(url, bodies, args.clients, args.requests)
    images_before = metric(url, "capkit_images_captioned_total")
    stop, cut = threading.Event(), []
    slow = slow_clients(url, args.slow, stop, cut)
    time.sleep(1.0)  # (connected before the load starts)
    vanish = vanishing_clients(url, vanish_bodies, spread_s=max(base["wall"], 1.0))
    loaded = load(url, bodies, args.clients, args.requests)
    vanish.join()
    time.sleep(1.0)  # the last vanished request's images had their chance to be (wrongly) generated
    generated = metric(url, "capkit_images_captioned_total") - images_before
    slow.join(SLOW_LIMIT_S + 5)  # until the server has cut them all off, or SLOW_LIMIT_S
    stop.set()
    return {"base": base, "loaded": loaded, "extra_images": generated - len(loaded["latencies"]),
            "vanished": metric(url, "capkit_vanished_requests_total"), "cut": cut,
            "idle_cut": metric(url, "capkit_idle_connections_cut_total")}


def report_pressure(r: dict, args, percentile) -> bool:
    p95 = [1000 * percentile(r[k]["latencies"] or [float("nan")], 95) for k in ("base", "loaded")]
    failed = len(r["base"]["failures"]) + len(r["loaded"]["failures"])
    cut = sorted(r["cut"])
    print(f"\npressure: {args.clients} clients x {args.requests} requests of one image, then the same beside "
          f"{args.slow} slow clients (1 byte/s) and {args.vanish} that vanish")
    print(f"  p95 alone {p95[0]:.0f} ms, beside them {p95[1]:.0f} ms: x{p95[1] / p95[0]:.2f} (target <= 1.5); "
          f"failed requests: {failed}")
    print(f"  images generated beyond the normal clients': {r['extra_images']:.0f} (target 0); requests seen to "
          f"vanish: {r['vanished']:.0f}/{args.vanish}")
    print(f"  slow clients cut off: {len(cut)}/{args.slow} (idle, headers: {r['idle_cut']:.0f}), the last after "
          f"{cut[-1] if cut else float('nan'):.0f} s")
    return p95[1] <= 1.5 * p95[0] and failed == 0 and r["extra_images"] == 0 and len(cut) == args.slow
