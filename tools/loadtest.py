"""
Load-test serve.py on this machine. --scenario throughput (the default): concurrent clients, each sending one
image per request, against the same checkpoint served twice in one run, with dynamic batching and with
--max_batch 1; prints p50 / p95 latency, images/s and the failed requests of each, and whether the two gave
the same captions. --scenario pressure: the server under pressure (tools/loadtest_pressure.py): a flood of
608 MB requests (peak RSS, answers, a small request's latency meanwhile; --scenario flood alone), and slow
and vanishing clients beside the normal load (p95 ratio, images generated for nobody, slow clients cut off;
--scenario clients alone). --scenario all: the three.

    python -m tools.loadtest --checkpoint saved_models/model_state_dict_....pth              # 32 clients x 8 requests
    python -m tools.loadtest --checkpoint CKPT --clients 64 --requests 16 --device cuda --max_batch 64
    python -m tools.loadtest --checkpoint CKPT --scenario all       # throughput, flood, pressure: the README table
    python -m tools.loadtest --real_shape --device cuda     # ViT-B-32 + Qwen3-0.6B-Base's shape, random weights (GPU)

Traffic goes to 127.0.0.1 only, to servers this script starts and stops; every client sends a fixed
number of requests (each with a timeout), so a run ends by itself. The images are rendered shapes
(shapes.py), a different one per request, the same set for both servers. --real_shape writes bench.py's
real-shape model (random weights, ~1.5 GB) as a checkpoint in a temporary folder, removed afterwards.
"""
from __future__ import annotations

import argparse
import http.client
import io
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import open_clip
import torch
from safetensors.torch import save_file
from transformers import AutoTokenizer, Qwen3ForCausalLM

from capkit.cli import int_at_least, positive_int
from capkit.data.shapes import random_attrs, render
from capkit.hub import REPO_DIR
from capkit.models.captioner import CaptionerConfig
from capkit.serving import SERVING
from model import PrefixCaptioner
from tools import loadtest_pressure as pressure
from tools.bench import real_shape_lm_config
from tools.paths import DEMO_LM_DIR

REQUEST_TIMEOUT_S = 300   # one request; a server that answers none in this long counts as failed
START_TIMEOUT_S = 600     # loading the model


def images(n: int, seed: int = 0) -> list[bytes]:
    """n distinct PNG files (bytes) of the synthetic shapes."""
    rng, out = random.Random(seed), []
    for _ in range(n):
        buf = io.BytesIO()
        render(random_attrs(rng), rng).save(buf, format="PNG")
        out.append(buf.getvalue())
    return out


def real_shape_checkpoint(folder: Path) -> str:
    """bench.py's real-shape model as a checkpoint in folder: ViT-B-32 (an open_clip folder) + a decoder with
    Qwen3-0.6B-Base's dimensions (a transformers folder), random weights, and the .pth naming them."""
    torch.manual_seed(0)
    clip_dir, lm_dir = folder / "clip", folder / "lm"
    clip_dir.mkdir(parents=True)
    clip = open_clip.create_model("ViT-B-32", pretrained=None)
    save_file({k: v.contiguous() for k, v in clip.state_dict().items()}, clip_dir / "open_clip_model.safetensors")
    (clip_dir / "open_clip_config.json").write_text(json.dumps({"model_cfg": open_clip.get_model_config("ViT-B-32"),
                                                                "preprocess_cfg": {}}))
    tok = AutoTokenizer.from_pretrained(DEMO_LM_DIR, trust_remote_code=False)  # ids index the 151,936-row table
    Qwen3ForCausalLM._from_config(real_shape_lm_config(tok), dtype=torch.bfloat16).save_pretrained(lm_dir)
    tok.save_pretrained(lm_dir)
    path = folder / "model_state_dict_realshape-1.pth"
    PrefixCaptioner.from_config(CaptionerConfig(encoder_name=f"local-dir:{clip_dir}", encoder_pretrained=None,
                                              lm_name=str(lm_dir))).save_checkpoint(path)
    return str(path)


def start_server(checkpoint: str, device: str, max_batch: int, max_wait_ms: int,
                 *flags: str) -> tuple[subprocess.Popen, str]:
    """serve.py (its default limits, but for flags) on a free port of 127.0.0.1 -> (process, its URL), once it
    answers /health."""
    cmd = [sys.executable, str(REPO_DIR / "serve.py"), "--checkpoint", checkpoint, "--port", "0",
           "--device", device, "--max_batch", str(max_batch), "--max_wait_ms", str(max_wait_ms), *flags]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    deadline = time.monotonic() + START_TIMEOUT_S
    for line in proc.stdout:
        if m := SERVING.match(line.strip()):
            url = m.group(1)
            break
        if time.monotonic() > deadline:
            break
    else:
        sys.exit(f"serve.py exited with {proc.wait()} before serving (run it by hand to see why)")
    while time.monotonic() < deadline:
        try:
            if httpx.get(url + "health", timeout=5).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            time.sleep(0.2)
    proc.kill()
    sys.exit(f"serve.py did not answer within {START_TIMEOUT_S} s")


def stop_server(proc: subprocess.Popen) -> int:
    proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()


def encode(files: list[bytes], url: str) -> list[tuple[bytes, str]]:
    """Each image as a ready multipart body (body, content type): encoded once, before the clock starts."""
    out = []
    for i, data in enumerate(files):
        request = httpx.Request("POST", url, files={"files": (f"img{i}.png", data, "image/png")})
        out.append((request.read(), request.headers["content-type"]))
    return out


def load(url: str, bodies: list[tuple[bytes, str]], clients: int, requests: int) -> dict:
    """clients x requests POSTs of one image each, the clients concurrent (a thread and a keep-alive
    connection each: http.client costs the machine ~0.4 ms a request, so the server gets the CPU)
    -> latencies, failures, captions, wall time, and the server's batches meanwhile."""
    host, port = urlsplit(url).hostname, urlsplit(url).port
    latencies, failures, captions = [], [], {}

    def client(c: int):
        conn = http.client.HTTPConnection(host, port, timeout=REQUEST_TIMEOUT_S)
        for r in range(requests):
            i = c * requests + r
            t = time.perf_counter()
            try:
                conn.request("POST", "/caption", body=bodies[i][0], headers={"Content-Type": bodies[i][1]})
                resp = conn.getresponse()
                answer = json.loads(resp.read())
            except (OSError, http.client.HTTPException, ValueError) as e:
                failures.append(f"{type(e).__name__}: {e}")
                conn.close()  # (reconnects on the next request)
                continue
            if resp.status == 200 and "caption" in answer[0]:
                captions[i] = answer[0]["caption"]
                latencies.append(time.perf_counter() - t)
            else:
                failures.append(f"{resp.status}: {str(answer)[:200]}")
        conn.close()

    before = httpx.get(url + "health").json()["served"]
    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(client, range(clients)))
    wall = time.perf_counter() - start
    after = httpx.get(url + "health").json()["served"]
    served = {k: after[k] - before[k] for k in ("images", "batches")}
    return {"latencies": latencies, "failures": failures, "captions": captions, "wall": wall, "served": served}


def run_one(args, files: list[bytes], max_batch: int) -> dict:
    proc, url = start_server(args.checkpoint, args.device, max_batch, args.max_wait_ms)
    try:
        bodies = encode(files, url + "caption")
        load(url, bodies, 1, 1)  # warm-up: first-call costs are not the server's throughput
        result = load(url, bodies, args.clients, args.requests)
    finally:
        result_rc = stop_server(proc)
    result["exit"] = result_rc
    return result


def percentile(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1] if len(values) > 1 else values[0]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    which = ap.add_mutually_exclusive_group(required=True)
    which.add_argument("--checkpoint")
    which.add_argument("--real_shape", action="store_true", help="bench.py's real-shape model, random weights")
    ap.add_argument("--clients", type=int_at_least(1, 1024), default=32)
    ap.add_argument("--requests", type=int_at_least(1, 1000), default=8, help="per client")
    ap.add_argument("--max_batch", type=positive_int, default=32, help="the batching server's --max_batch")
    ap.add_argument("--max_wait_ms", type=int_at_least(0, 10_000), default=10)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--scenario", choices=["throughput", "flood", "clients", "pressure", "all"], default="throughput",
                    help="pressure: flood + clients; all: throughput + pressure")
    ap.add_argument("--flood_clients", type=int_at_least(1, 1024), default=64)
    ap.add_argument("--flood_files", type=int_at_least(1, 1000), default=32, help="files per flood request")
    ap.add_argument("--flood_file_mb", type=float, default=19.0, help="MB per file (under serve.py's --max_upload_mb)")
    ap.add_argument("--slow", type=int_at_least(0, 2000), default=200, help="slow clients (pressure)")
    ap.add_argument("--vanish", type=int_at_least(0, 2000), default=50, help="clients that vanish (pressure)")
    ap.add_argument("--body_timeout_s", type=int_at_least(1, 3600), help="serve.py's (default: its own)")
    ap.add_argument("--idle_timeout_s", type=int_at_least(1, 3600), help="serve.py's (default: its own)")
    args = ap.parse_args(argv)
    ok = True
    with tempfile.TemporaryDirectory(prefix="capkit-loadtest-") as tmp:
        if args.real_shape:
            args.checkpoint = real_shape_checkpoint(Path(tmp))
        if args.scenario in ("throughput", "all"):
            ok = report(run_both(args), args.clients * args.requests) == 0
        if args.scenario != "throughput":
            ok = run_pressure(args) and ok
    return 0 if ok else 1


def run_pressure(args) -> bool:
    """The flood and / or pressure scenarios on one server (the batching one, default limits) -> targets met."""
    files = images(args.clients * args.requests + args.vanish + 1)
    flags = [f"--{k}={getattr(args, k)}" for k in ("body_timeout_s", "idle_timeout_s") if getattr(args, k)]
    proc, url = start_server(args.checkpoint, args.device, args.max_batch, args.max_wait_ms, *flags)
    ok = True
    try:
        bodies = encode(files, url + "caption")
        load(url, bodies, 1, 1)  # warm-up
        if args.scenario in ("flood", "pressure", "all"):
            ok = pressure.report_flood(pressure.flood(url, proc.pid, bodies[-1], args), args) and ok
        if args.scenario in ("clients", "pressure", "all"):
            n = args.clients * args.requests
            result = pressure.pressure(url, load, bodies[:n], bodies[n:n + args.vanish], args)
            ok = pressure.report_pressure(result, args, percentile) and ok
    finally:
        code = stop_server(proc)
    print(f"server exit code {code}; targets {'met' if ok else 'NOT met'}")
    return ok and code == 0


def run_both(args) -> dict:
    files = images(args.clients * args.requests)
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() and args.device != "cpu" else "no GPU"
    print(f"{args.clients} clients x {args.requests} requests of one image, {Path(args.checkpoint).name}, "
          f"device {args.device} ({gpu}), {os.cpu_count()} CPU cores")
    return {f"batching (--max_batch {args.max_batch})": run_one(args, files, args.max_batch),
            "no batching (--max_batch 1)": run_one(args, files, 1)}


def report(runs: dict, n: int) -> int:
    """The table; exit 0 only if no request failed and both servers shut down cleanly."""
    print(f"\n{'server':<28} {'p50 ms':>8} {'p95 ms':>8} {'images/s':>9} {'failed':>7} {'mean batch':>11}")
    for name, r in runs.items():
        lat = r["latencies"] or [float("nan")]
        mean_batch = r["served"]["images"] / max(r["served"]["batches"], 1)
        print(f"{name:<28} {1000 * percentile(lat, 50):>8.0f} {1000 * percentile(lat, 95):>8.0f} "
              f"{len(r['latencies']) / r['wall']:>9.1f} {len(r['failures']):>7} {mean_batch:>11.1f}")
        for failure in r["failures"][:5]:
            print(f"  failed: {failure}")
    batched, single = runs.values()
    same = sum(batched["captions"].get(i) == c for i, c in single["captions"].items())
    print(f"\ncaptions equal between the two servers: {same}/{n}")
    speedup = (len(batched["latencies"]) / batched["wall"]) / max(len(single["latencies"]) / single["wall"], 1e-9)
    print(f"throughput_speedup_from_batching: {speedup:.2f}")
    failed = sum(len(r["failures"]) for r in runs.values())
    return 0 if failed == 0 and all(r["exit"] == 0 for r in runs.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
