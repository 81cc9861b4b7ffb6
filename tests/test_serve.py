"""serve.py: the HTTP API on a tiny model through FastAPI's test client (unit), the batcher on its own, and
a real serve.py process on the demo checkpoint (integration: captions equal inference.py's, every bad
request a 4xx while the server keeps serving, SIGTERM answers what is in flight, the page in Chromium)."""
import asyncio
import io
import os
import re
import signal
import socket
import subprocess
import sys
import time
from urllib.parse import urlsplit

import httpx
import pytest
import torch
from conftest import REPO, bomb_png, chromium_path, make_model, run_script
from fastapi.testclient import TestClient
from PIL import Image

import serve
from capkit.data.images import load_rgb
from capkit.serving import SERVING
from serve import Batcher, Limits, create_app


def png(color=(200, 30, 30), size=(40, 30), fmt="PNG") -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format=fmt)
    return buf.getvalue()


IMAGES = {f"im{i}.png": png(c) for i, c in enumerate([(200, 30, 30), (20, 200, 40), (30, 40, 220), (240, 240, 10)])}


def post(client, uploads, /, query="", **fields):
    return client.post("/caption" + query, files=[("files", (n, data, "image/png")) for n, data in uploads],
                       data={k: str(v) for k, v in fields.items()})


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return make_model().eval()


@pytest.fixture(scope="module")
def client(model):
    app = create_app(model, "tiny.pth", Limits(max_batch=4, max_wait_ms=5, max_upload_mb=1, max_files=4,
                                               max_megapixels=1, max_request_tokens=150))
    with TestClient(app) as c:
        yield c


def direct(model, names, **gen):
    """What model.generate says for these images (the same decoding as inference.py)."""
    pixels = torch.stack([model.preprocess(load_rgb(io.BytesIO(IMAGES[n]))) for n in names])
    return model.generate(pixel_values=pixels, **gen)


# ================================================================================================
# the API

def test_health_names_the_model_and_the_limits(client):
    h = client.get("/health").json()
    assert h["model_loaded"] is True and h["checkpoint"] == "tiny.pth" and h["model_type"] == "prefix"
    assert h["device"] == "cpu" and h["max_batch"] == 4 and h["max_files"] == 4
    assert h["defaults"]["max_new_tokens"] == 40 and h["limits"]["num_beams"] == [1, 64]


def test_captions_equal_generate_in_order_with_options_from_form_or_query(client, model):
    names = list(IMAGES)[:3]
    r = post(client, [(n, IMAGES[n]) for n in names])
    assert r.status_code == 200
    assert [e["filename"] for e in r.json()] == names
    assert [e["caption"] for e in r.json()] == direct(model, names)
    assert all(e["ms"] > 0 for e in r.json())
    opts = {"num_beams": 3, "max_new_tokens": 5}
    want = direct(model, names, **opts)
    assert want != direct(model, names)  # (so the options are seen to arrive)
    assert [e["caption"] for e in post(client, [(n, IMAGES[n]) for n in names], **opts).json()] == want
    got = post(client, [(n, IMAGES[n]) for n in names], query="?num_beams=3&max_new_tokens=5").json()
    assert [e["caption"] for e in got] == want


def test_a_seed_makes_sampling_reproducible(client, model):
    names = list(IMAGES)[:2]
    opts = {"do_sample": "true", "temperature": 5, "seed": 7, "max_new_tokens": 8}
    a = [e["caption"] for e in post(client, [(n, IMAGES[n]) for n in names], **opts).json()]
    b = [e["caption"] for e in post(client, [(n, IMAGES[n]) for n in names], **opts).json()]
    assert a == b == direct(model, names, do_sample=True, temperature=5.0, seed=7, max_new_tokens=8)
    other = [e["caption"] for e in post(client, [(n, IMAGES[n]) for n in names], **{**opts, "seed": 8}).json()]
    greedy = [e["caption"] for e in post(client, [(n, IMAGES[n]) for n in names], max_new_tokens=8).json()]
    assert other != a and greedy not in (a, other)  # do_sample and the seed reach generate(): they change the draw


def test_a_seeded_request_leaves_later_sampling_random_and_greedy_ignores_the_seed(model):
    px = torch.stack([model.preprocess(load_rgb(io.BytesIO(IMAGES["im0.png"])))])
    draws = []
    for _ in range(2):  # without the reseed, both draws would continue the sequence seed 5 started
        serve.generate(model, px, opts(do_sample=True, seed=5, max_new_tokens=2))
        draws.append(torch.rand(4))
    assert not torch.equal(*draws)
    assert serve.read_options([("seed", "3")], [])["seed"] is None  # greedy: batched with everyone else
    assert serve.read_options([("seed", "3")], [("do_sample", "on")])["seed"] == 3


def test_a_model_failure_is_a_json_500_and_the_server_goes_on(model, monkeypatch):
    app = create_app(model, "tiny.pth")
    with TestClient(app, raise_server_exceptions=False) as c:
        real = model.generate
        monkeypatch.setattr(model, "generate", lambda **kw: (_ for _ in ()).throw(RuntimeError("boom")))
        r = post(c, [("a.png", IMAGES["im0.png"])])
        assert r.status_code == 500 and "RuntimeError: boom" in r.json()["detail"]
        monkeypatch.setattr(model, "generate", real)
        assert post(c, [("a.png", IMAGES["im0.png"])]).status_code == 200


def test_mixed_good_and_bad_files_caption_the_good_ones_in_place(client, model, tmp_path):
    files = [("a.png", IMAGES["im0.png"]), ("notes.txt", b"hello"), ("empty.jpg", b""),
             ("bomb.png", bomb_png(tmp_path / "b.png").read_bytes())]
    r = post(client, files)
    assert r.status_code == 200
    good, text, empty, bomb = r.json()
    assert good["caption"] == direct(model, ["im0.png"])[0]
    assert text == {"filename": "notes.txt", "error": "unreadable image: not in any image format Pillow reads",
                    "status": 415}
    assert empty["status"] == 400 and "empty" in empty["error"]
    assert bomb["status"] == 413 and "too large" in bomb["error"]


def _too_big():
    return [("huge.png", png(size=(600, 600), fmt="BMP"))]  # ~1.05 MB > the 1 MB limit


@pytest.mark.parametrize("kind, files, fields, status, words", [
    ("not an image", [("notes.txt", b"just text")], {}, 415, ["notes.txt", "unreadable image"]),
    ("zero bytes", [("empty.png", b"")], {}, 400, ["empty.png", "empty file"]),
    ("over the size limit", "too_big", {}, 413, ["huge.png", "upload limit of 1 MB", "--max_upload_mb"]),
    ("too many files", [(f"{i}.png", IMAGES["im0.png"]) for i in range(5)], {}, 413, ["Too many files", "--max_files"]),
    ("too many pixels", [("wide.png", png(size=(2000, 600)))], {}, 413, ["wide.png", "over 1,000,000 pixels", "--max_megapixels"]),
    ("truncated", [("cut.png", png()[:60])], {}, 415, ["cut.png", "damaged or truncated"]),
    ("too much work", [("a.png", IMAGES["im0.png"])] * 2, {"num_beams": 8, "max_new_tokens": 10}, 422,
     ["160 generated tokens", "2 images x 8 beams", "--max_request_tokens"]),
    ("past the decoder's positions", [("a.png", IMAGES["im0.png"])], {"max_new_tokens": 62}, 422,
     ["max_new_tokens=62", "at most 61 tokens"]),  # the tiny Qwen3's 64 positions, less the 3-vector prefix
    ("a NaN", [("a.png", IMAGES["im0.png"])], {"temperature": "nan"}, 422, ["temperature", "finite"]),
    ("a bad option", [("a.png", IMAGES["im0.png"])], {"num_beams": 0}, 422, ["num_beams", "greater than or equal to 1"]),
    ("an unknown option", [("a.png", IMAGES["im0.png"])], {"beams": 2}, 422, ["beams", "options: max_new_tokens"]),
    ("a non-number", [("a.png", IMAGES["im0.png"])], {"temperature": "hot"}, 422, ["temperature", "number"]),
])
def test_each_bad_request_is_a_4xx_naming_the_reason_and_the_next_one_succeeds(client, kind, files, fields, status,
                                                                                words):
    files = _too_big() if files == "too_big" else files
    r = post(client, files, **fields)
    assert r.status_code == status, r.text
    assert all(w in r.json()["detail"] for w in words), r.json()
    assert post(client, [("ok.png", IMAGES["im1.png"])]).status_code == 200


def test_wrong_field_names_bodies_and_methods_are_4xx(client):
    r = client.post("/caption", files=[("file", ("a.png", IMAGES["im0.png"], "image/png"))])
    assert r.status_code == 422 and "'file'" in r.json()["detail"] and "'files'" in r.json()["detail"]
    r = client.post("/caption", json={"files": ["a.png"]})
    assert r.status_code == 415 and "multipart/form-data" in r.json()["detail"]
    r = client.post("/caption", content=b"--b--", headers={"content-type": "Multipart/Form-Data; boundary=b"})
    assert r.status_code == 422 and "no images" in r.json()["detail"]  # (media types are case-insensitive)
    r = client.post("/caption", files=[("files", ("a.png", IMAGES["im0.png"], "image/png"))], data={"seed": "1" * 2000})
    assert r.status_code == 400 and "at most 1024 bytes" in r.json()["detail"]
    r = client.post("/caption", files=[("files", ("a.png", IMAGES["im0.png"], "image/png"))],
                    data={"num_beams": "2"}, params={"num_beams": "3"})
    assert r.status_code == 422 and "given twice" in r.json()["detail"]
    r = client.post("/caption", files=[("files", (None, b"a.png"))])  # a multipart text field named files
    assert r.status_code == 422 and "'files' holds text" in r.json()["detail"]
    assert client.get("/caption").status_code == 405
    assert client.head("/health").status_code == 200 and client.head("/").status_code == 200
    assert post(client, [("ok.png", IMAGES["im1.png"])]).status_code == 200


def test_a_body_over_the_request_limit_is_refused_before_it_is_read(client):
    limit = 4 * 2**20 + 2**20  # max_files x max_upload_mb + 1 MB
    r = client.post("/caption", content=b"x" * 64, headers={"content-type": "multipart/form-data; boundary=b",
                                                            "content-length": str(limit + 1)})
    assert r.status_code == 413 and "request body over" in r.json()["detail"]
    r = client.post("/caption", content=iter([b"x" * 2**20] * 6),  # chunked: counted as it arrives
                    headers={"content-type": "multipart/form-data; boundary=b"})
    assert r.status_code == 413
    assert post(client, [("ok.png", IMAGES["im1.png"])]).status_code == 200


def test_the_page_is_self_contained_and_writes_no_markup_from_data(client):
    r = client.get("/")
    page = r.text
    assert r.status_code == 200 and "default-src 'self'" in r.headers["content-security-policy"]
    assert not re.search(r"(src|href)=[\"']?(https?:)?//", page)  # nothing from elsewhere: it works offline
    assert "innerHTML" not in page and "insertAdjacentHTML" not in page and "document.write" not in page
    assert 'id="files"' in page and "fetch(\"caption\"" in page


def test_the_openapi_docs_are_served_offline(client):
    docs = client.get("/docs").text
    js = re.search(r"src=['\"]([^'\"]+swagger-ui-bundle\.js)", docs).group(1)
    assert js.startswith("/") and client.get(js).status_code == 200
    schema = client.get("/openapi.json").json()["paths"]["/caption"]["post"]["requestBody"]["content"]
    props = schema["multipart/form-data"]["schema"]["properties"]
    assert {"files", "num_beams", "max_new_tokens", "do_sample", "temperature", "top_p", "seed"} <= set(props)


@pytest.mark.parametrize("kind", ["adapter", "merged"])
def test_git_adapter_and_merged_folders_are_served_like_a_pth(tmp_path, kind):
    """Any checkpoint the other scripts take: the git path's adapter folder, and that folder merged."""
    from capkit.models.captioner import CaptionerConfig
    from capkit.models.hf_captioner import merge_adapter
    from model import build_model, load_checkpoint
    from tools.demo_assets import HF_DIRS
    torch.manual_seed(0)
    m = build_model(CaptionerConfig(model_type="git", hf_model_name=HF_DIRS["git"], quantization_bits=16,
                                    lm_dtype="float32"))
    with torch.no_grad():  # adapters away from their identity init, so the folder is not just the base
        for p in m.trainable_parameters():
            p.add_(torch.randn_like(p) * 0.3)
    folder = tmp_path / "adapter_r-1"
    m.save_checkpoint(folder)
    if kind == "merged":
        folder = merge_adapter(folder, tmp_path / "merged_r-1")
    loaded, _, _ = load_checkpoint(folder)
    with TestClient(create_app(loaded, folder.name)) as c:
        assert c.get("/health").json()["model_type"] == "git"
        r = post(c, [(n, IMAGES[n]) for n in list(IMAGES)[:2]], max_new_tokens=6)
    assert r.status_code == 200
    captions = [e["caption"] for e in r.json()]
    assert captions == direct(loaded, list(IMAGES)[:2], max_new_tokens=6) and all(captions)


# ================================================================================================
# the batcher on its own

def fake_generate(calls, fail_on=None):
    def generate(pixels, options, stop=None):
        calls.append((len(pixels), options["num_beams"]))
        if fail_on is not None and pixels[:, 0, 0, 0].eq(fail_on).any():
            raise RuntimeError("model failed")
        return [f"caption {int(v)}" for v in pixels[:, 0, 0, 0]]
    return generate


def opts(**kw):
    return {"max_new_tokens": 40, "num_beams": 1, "do_sample": False, "temperature": 1.0, "top_p": 1.0, "top_k": 0,
            "seed": None} | kw


def images_of(*values):
    return torch.stack([torch.full((3, 2, 2), float(v)) for v in values])


async def gather_jobs(batcher, jobs):
    task = asyncio.create_task(batcher.run())
    try:
        return await asyncio.gather(*(batcher.caption(px, o) for px, o in jobs), return_exceptions=True)
    finally:
        task.cancel()
        batcher.close()


def test_concurrent_requests_share_batches_of_at_most_max_batch():
    calls = []
    out = asyncio.run(gather_jobs(Batcher(fake_generate(calls), 4, 200), [(images_of(i), opts()) for i in range(10)]))
    assert out == [[f"caption {i}"] for i in range(10)]
    assert [n for n, _ in calls] == [4, 4, 2]


def test_a_lone_request_waits_at_most_max_wait_ms():
    calls = []
    t = time.monotonic()
    assert asyncio.run(gather_jobs(Batcher(fake_generate(calls), 32, 50), [(images_of(1), opts())])) == [["caption 1"]]
    assert calls == [(1, 1)] and time.monotonic() - t < 5


def test_other_options_get_their_own_batch_and_a_seeded_request_goes_alone():
    calls = []
    jobs = [(images_of(0), opts()), (images_of(1), opts(num_beams=3)), (images_of(2), opts()),
            (images_of(3, 4), opts(seed=1)), (images_of(5), opts(seed=1)), (images_of(6), opts(num_beams=3))]
    out = asyncio.run(gather_jobs(Batcher(fake_generate(calls), 8, 100), jobs))
    assert out == [["caption 0"], ["caption 1"], ["caption 2"], ["caption 3", "caption 4"], ["caption 5"], ["caption 6"]]
    assert sorted(calls) == sorted([(2, 1), (2, 3), (2, 1), (1, 1)])


def test_a_request_larger_than_max_batch_is_split_and_reassembled_in_order():
    calls = []
    out = asyncio.run(gather_jobs(Batcher(fake_generate(calls), 3, 10), [(images_of(*range(7)), opts())]))
    assert out == [[f"caption {i}" for i in range(7)]] and [n for n, _ in calls] == [3, 3, 1]


def test_a_failing_batch_fails_only_its_own_requests():
    calls = []
    jobs = [(images_of(1), opts()), (images_of(2), opts()), (images_of(9), opts(num_beams=2))]
    out = asyncio.run(gather_jobs(Batcher(fake_generate(calls, fail_on=9), 8, 100), jobs))
    assert out[:2] == [["caption 1"], ["caption 2"]] and isinstance(out[2], RuntimeError)


# ================================================================================================
# the command line's expected failures

def test_a_port_in_use_is_one_sentence_and_exit_2(capsys):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        code = serve.main(["--checkpoint", "nowhere.pth", "--port", str(busy.getsockname()[1])])
    err = capsys.readouterr().err
    assert code == 2 and "can't listen on 127.0.0.1" in err and "--port" in err and "Traceback" not in err


def test_the_socket_takes_connections_from_the_moment_it_is_bound():
    """The "serving ... at URL" line is printed by the app's startup, before uvicorn listens: a client that
    connects on that line must wait in the backlog, not be refused."""
    with serve.listen("127.0.0.1", 0) as sock, socket.create_connection(sock.getsockname(), timeout=5) as client:
        conn, _ = sock.accept()
        client.sendall(b"x")
        assert conn.recv(1) == b"x"
        conn.close()


def test_a_missing_checkpoint_is_refused_like_everywhere_else(capsys, tmp_path):
    code = serve.main(["--checkpoint", str(tmp_path / "nope.pth"), "--port", "0"])
    err = capsys.readouterr().err
    assert code == 4 and "does not exist" in err and "nope.pth" in err and "Traceback" not in err


# ================================================================================================
# a real serve.py process on the demo checkpoint

def start(ckpt, tmp_path, *flags):
    """serve.py on a free port (its temp dir inside tmp_path) -> (process, URL)."""
    env = {**os.environ, "TMPDIR": str(tmp_path / "tmp")}
    (tmp_path / "tmp").mkdir(exist_ok=True)
    proc = subprocess.Popen([sys.executable, "serve.py", "--checkpoint", str(ckpt), "--port", "0", *flags], cwd=REPO,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in proc.stdout:
        if m := SERVING.match(line.strip()):
            return proc, m.group(1)
    pytest.fail(f"serve.py exited {proc.wait()}: {proc.stderr.read()[-2000:]}")


def stop(proc) -> tuple[int, str]:
    proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(timeout=60), proc.stderr.read()
    finally:
        proc.kill()


@pytest.fixture(scope="module")
def demo(demo_run, tmp_path_factory):
    """(checkpoint, 8 test images, inference.py's captions of them)."""
    tmp, _, metas = demo_run
    import json
    ckpt = metas[-1].parent / json.loads(metas[-1].read_text())["checkpoint"]
    images = sorted((tmp / "shapes" / "test").glob("*.png"))[:8]
    out = run_script("inference.py", "--checkpoint", str(ckpt), *map(str, images))
    return ckpt, images, dict(line.split("\t") for line in out.strip().splitlines())


@pytest.fixture(scope="module")
def server(demo, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("serve")
    proc, url = start(demo[0], tmp, "--max_upload_mb", "1", "--max_files", "4", "--max_wait_ms", "50")
    yield url, tmp
    code, err = stop(proc)
    assert code == 0 and "Traceback" not in err, err[-2000:]


def files_of(paths):
    return [("files", (p.name, p.read_bytes(), "image/png")) for p in paths]


@pytest.mark.slow
def test_served_captions_equal_inference_py_alone_and_batched(demo, server):
    _, images, expected = demo
    url, _ = server

    async def one_each():
        async with httpx.AsyncClient(timeout=120) as http:
            return await asyncio.gather(*(http.post(url + "caption", files=files_of([p])) for p in images))
    for r, p in zip(asyncio.run(one_each()), images):
        assert r.status_code == 200 and r.json()[0]["caption"] == expected[str(p)]
    r = httpx.post(url + "caption", files=files_of(images[:4]), timeout=120)
    assert [e["caption"] for e in r.json()] == [expected[str(p)] for p in images[:4]]
    assert httpx.get(url + "health").json()["served"]["batches"] < 8 + 1  # concurrent requests shared batches


@pytest.mark.slow
def test_the_real_server_refuses_each_bad_request_and_keeps_serving(demo, server, tmp_path):
    _, images, expected = demo
    url, tmp = server
    good = files_of(images[:1])
    bad = {"notes.txt": (b"not an image", 415), "empty.png": (b"", 400),
           "bomb.png": (bomb_png(tmp_path / "bomb.png").read_bytes(), 413), "huge.bmp": (png(size=(600, 600), fmt="BMP"), 413)}
    mixed = httpx.post(url + "caption", timeout=120,  # (4 files: the server's --max_files)
                       files=[("files", (n, d, "image/png")) for n, (d, _) in bad.items() if n != "empty.png"] + good)
    assert mixed.status_code == 200 and [e.get("status") for e in mixed.json()] == [415, 413, 413, None]
    assert mixed.json()[-1]["caption"] == expected[str(images[0])]
    for name, (data, status) in bad.items():
        r = httpx.post(url + "caption", files=[("files", (name, data, "image/png"))], timeout=120)
        assert r.status_code == status and name in r.json()["detail"]
        assert httpx.post(url + "caption", files=good, timeout=120).status_code == 200
    for kwargs, status in [({"files": [("file", ("a.png", b"x", "image/png"))]}, 422),
                           ({"files": good * 5}, 413), ({"files": good, "params": {"num_beams": 99}}, 422),
                           ({"json": {"files": []}}, 415)]:
        assert httpx.post(url + "caption", timeout=120, **kwargs).status_code == status
        assert httpx.post(url + "caption", files=good, timeout=120).status_code == 200
    with socket.create_connection((urlsplit(url).hostname, urlsplit(url).port)) as s:  # a client gone mid-upload
        s.sendall(b"POST /caption HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=b\r\n"
                  b"Content-Length: 100000\r\n\r\n--b\r\n" + b"x" * 3000)
    assert httpx.post(url + "caption", files=good, timeout=120).status_code == 200
    assert not list((tmp / "tmp").iterdir())  # the >1 MB upload was spooled to disk: nothing is left behind


@pytest.mark.slow
def test_sigterm_answers_the_requests_in_flight_and_cuts_off_a_stuck_upload_after_the_grace(demo, tmp_path):
    ckpt, images, expected = demo
    # the request waits 1.5 s in the batcher; the stuck upload never ends: cut off after the 4 s grace
    proc, url = start(ckpt, tmp_path, "--max_wait_ms", "1500", "--shutdown_grace_s", "4")
    stuck = socket.create_connection((urlsplit(url).hostname, urlsplit(url).port))
    stuck.sendall(b"POST /caption HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=b\r\n"
                  b"Content-Length: 100000\r\n\r\n--b\r\n")

    async def request_then_sigterm():
        async with httpx.AsyncClient(timeout=120) as http:
            pending = asyncio.create_task(http.post(url + "caption", files=files_of(images[:2])))
            await asyncio.sleep(0.5)
            proc.send_signal(signal.SIGTERM)
            return await pending
    t = time.monotonic()
    r = asyncio.run(request_then_sigterm())
    code, err = stop(proc)
    stuck.close()
    assert r.status_code == 200 and [e["caption"] for e in r.json()] == [expected[str(p)] for p in images[:2]]
    assert code == 130 and "1 request(s) in flight were cut off" in err and time.monotonic() - t < 30, err[-2000:]


@pytest.mark.slow
def test_the_load_test_runs_both_servers_and_stops_by_itself(demo):
    """(Its figures are a benchmark, in the README; here only that it works and says what it measured.)"""
    out = run_script("-m", "tools.loadtest", "--checkpoint", str(demo[0]), "--clients", "3", "--requests", "2")
    assert re.search(r"batching \(--max_batch 32\) +\d+ +\d+ +[\d.]+ +0 ", out), out
    assert re.search(r"no batching \(--max_batch 1\) +\d+ +\d+ +[\d.]+ +0 +1\.0", out), out
    assert "captions equal between the two servers: 6/6" in out and "throughput_speedup_from_batching" in out


@pytest.mark.slow
def test_the_pressure_scenarios_run_and_stop_by_themselves(demo):
    """(A small flood and pressure run: that they work and say what they measured; the figures are the README's.)"""
    out = run_script("-m", "tools.loadtest", "--checkpoint", str(demo[0]), "--scenario", "pressure", "--clients", "2",
                     "--requests", "2", "--flood_clients", "3", "--flood_files", "2", "--flood_file_mb", "1",
                     "--slow", "4", "--vanish", "3", "--body_timeout_s", "2", "--idle_timeout_s", "1")
    assert re.search(r"server RSS: idle [\d,]+ MB, peak [\d,]+ MB", out) and "answers: 200: 3" in out, out
    assert re.search(r"one-image requests during the flood: \d+, statuses \[200\]", out), out
    assert re.search(r"p95 alone \d+ ms, beside them \d+ ms", out), out
    assert "images generated beyond the normal clients': 0 (target 0)" in out, out
    assert "slow clients cut off: 4/4" in out and "server exit code 0" in out, out


@pytest.mark.slow
def test_the_page_in_headless_chromium_captions_two_images(demo, server, tmp_path):
    browser_path = chromium_path()
    sync_api = pytest.importorskip("playwright.sync_api")
    _, images, expected = demo
    url, _ = server
    odd = tmp_path / '<img src=x onerror="document.title=1">.png'  # a file name is shown as text, never as markup
    odd.write_bytes(images[1].read_bytes())
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=browser_path, headless=True, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1000, "height": 700})
        page.goto(url)
        # (locators, not wait_for_function: the page's CSP forbids the eval that one would need)
        page.locator("#model", has_text="prefix").wait_for()
        page.set_input_files("#files", [str(images[0]), str(odd)])
        page.locator("#results li[data-state=done]").nth(1).wait_for(timeout=60_000)
        captions = page.locator("#results .caption").all_text_contents()
        names = page.locator("#results .name").all_text_contents()
        loaded = page.evaluate("Array.from(document.querySelectorAll('#results img')).map(i => i.naturalWidth)")
        shot = tmp_path / "page.png"
        page.screenshot(path=str(shot))
        title = page.title()
        browser.close()
    assert captions == [expected[str(images[0])], expected[str(images[1])]]
    assert names == [images[0].name, odd.name] and title.startswith("capkit:")
    assert loaded == [64, 64]  # both thumbnails decoded in the page
    with Image.open(shot) as im:  # and drawn: the shapes' saturated colours are on the screenshot
        colours = {px for px in im.convert("RGB").resize((250, 175)).getdata() if max(px) - min(px) > 80}
    assert len(colours) > 10
