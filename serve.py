"""
Serve a trained captioner over HTTP: a JSON API with dynamic batching, and a web page to try it.

    python serve.py --checkpoint saved_models/model_state_dict_....pth      # then open http://127.0.0.1:8000/
    python serve.py --checkpoint saved_models/adapter_<run>-<epoch> --port 8080   # git / blip: the same API
    curl -F files=@photo.jpg -F files=@dog.png http://127.0.0.1:8000/caption
    curl -F files=@photo.jpg -F num_beams=3 "http://127.0.0.1:8000/caption?max_new_tokens=20"

    GET  /          the web page: pick or drop images, see each caption as it arrives
    POST /caption   multipart field `files` (one or more images) -> [{"filename", "caption", "ms"}, ...];
                    decoding options (num_beams, max_new_tokens, do_sample, temperature, top_p, top_k, seed,
                    min_new_tokens, no_repeat_ngram_size, repetition_penalty, length_penalty)
                    as query or form fields
    GET  /health    model loaded, device, checkpoint name, model type, limits
    GET  /metrics   Prometheus text format: requests by status, images, batch sizes, latency, queue, bytes in flight
    GET  /docs      the OpenAPI docs (served from a local copy: they work offline)

Concurrent requests are gathered into one batched model.generate call (the KV-cache path inference.py
uses): up to --max_batch images, waiting at most --max_wait_ms after the first for more. Requests with
other options wait for a batch of their own; a sampling request with a seed is decoded alone, in one
call, so it is reproducible whatever else arrives. Images are decoded (from Starlette's spooled uploads)
before they join a batch, so a bad file fails only its own entry. It binds to 127.0.0.1: pass --host 0.0.0.0
only on a network you trust (there is no authentication).

One request can't hold the model for long: it may ask for at most --max_request_tokens (images x
num_beams x max_new_tokens), and images over --max_megapixels are refused before they are decoded.
Under load it stays up and answers: request bodies in flight are held to --max_inflight_mb (a request that
would pass it gets 503 + Retry-After before its body is read; uploads are spooled to disk and decoded one file
at a time), queued work to --max_queue_tokens and --max_queue_s (503 + Retry-After), a body must arrive
within --body_timeout_s (408) and a connection must begin a request within --idle_timeout_s (closed). A
client that leaves has its queued images dropped; a batch whose clients have all left stops after the current
decoding step.

Exit codes (errors.py): 0 after Ctrl-C or SIGTERM once every request in flight is answered; 130 if
some were cut off (a second Ctrl-C, or still running --shutdown_grace_s seconds later); 2 for a bad
flag or a port in use; 4 / 5 when the checkpoint is missing or refused, or its backbones can't be
had offline, as for every script.
"""
from __future__ import annotations

import argparse
import asyncio
import io
import os
import signal
import socket
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, asynccontextmanager
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path

import torch
import uvicorn
from fastapi import Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from fastapi_offline import FastAPIOffline
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect

from capkit.cli import int_at_least, positive_int
from capkit.data.images import image_problem, load_rgb
from capkit.errors import ConfigError, run_cli
from capkit.models.captioner import GENERATION_LIMITS, Generation
from capkit.runtime import pick_device
from capkit.serving.admission import Admission, Budget, idle_guarded_h11, release_body, retry_after_s
from capkit.serving.batcher import Batcher, Busy, work_of
from capkit.serving.metrics import ServerMetrics
from model import load_checkpoint

PAGE = Path(__file__).with_name("serve.html")  # the web page at /: plain HTML + JS, nothing fetched from elsewhere
FILES_FIELD = "files"                           # the multipart field the images come in
MAX_FIELD_BYTES = 1024                          # an option's value is a number: anything longer is refused
_LIM, _DEF = GENERATION_LIMITS, Generation()


# ----------------------------------------------------------------------------------------------
# what a request may ask for: Generation's fields, in GENERATION_LIMITS' ranges

class CaptionOptions(BaseModel):
    """Decoding options of POST /caption (query or form fields); the defaults are every script's."""
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    max_new_tokens: int = Field(_DEF.max_new_tokens, ge=_LIM["max_new_tokens"][0], le=_LIM["max_new_tokens"][1])
    num_beams: int = Field(_DEF.num_beams, ge=_LIM["num_beams"][0], le=_LIM["num_beams"][1])
    do_sample: bool = _DEF.do_sample
    temperature: float = Field(_DEF.temperature, ge=_LIM["temperature"][0], le=_LIM["temperature"][1])
    top_p: float = Field(_DEF.top_p, gt=_LIM["top_p"][0], le=_LIM["top_p"][1])
    top_k: int = Field(_DEF.top_k, ge=_LIM["top_k"][0], le=_LIM["top_k"][1])
    seed: int | None = Field(_DEF.seed, ge=_LIM["seed"][0], le=_LIM["seed"][1])
    min_new_tokens: int = Field(_DEF.min_new_tokens, ge=_LIM["min_new_tokens"][0], le=_LIM["min_new_tokens"][1])
    no_repeat_ngram_size: int = Field(_DEF.no_repeat_ngram_size, ge=_LIM["no_repeat_ngram_size"][0],
                                      le=_LIM["no_repeat_ngram_size"][1])
    repetition_penalty: float = Field(_DEF.repetition_penalty, ge=_LIM["repetition_penalty"][0],
                                      le=_LIM["repetition_penalty"][1])
    length_penalty: float = Field(_DEF.length_penalty, ge=_LIM["length_penalty"][0], le=_LIM["length_penalty"][1])


PAGE_CSP = ("default-src 'self'; img-src 'self' blob: data:; style-src 'unsafe-inline'; "
            "script-src 'unsafe-inline'; connect-src 'self'")
# POST /caption reads its own body (for the clear 4xx answers above): its request schema is declared here
CAPTION_OPENAPI = {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
    "type": "object", "required": [FILES_FIELD],
    "properties": {FILES_FIELD: {"type": "array", "items": {"type": "string", "format": "binary"}},
                   **CaptionOptions.model_json_schema()["properties"]}}}}}}


class BadRequest(Exception):
    """A request refused as a whole: status + one sentence (+ the per-file errors, when files were the cause)."""
    def __init__(self, status: int, detail: str, errors: list | None = None, headers: dict | None = None):
        super().__init__(detail)
        self.status, self.detail, self.errors, self.headers = status, detail, errors or [], headers

    def response(self) -> JSONResponse:
        body = {"detail": self.detail} | ({"errors": self.errors} if self.errors else {})
        return JSONResponse(body, status_code=self.status, headers=self.headers)


class ClientGone(BadRequest):
    """The client disconnected before its answer: nobody reads this (499, nginx's code for it, in /metrics)."""
    def __init__(self):
        super().__init__(499, "the client left before its answer")


async def bad_request(request: Request, e: BadRequest) -> JSONResponse:
    return e.response()


async def server_error(request: Request, e: Exception) -> JSONResponse:
    """Anything unexpected (a bug, or the model failing): still a JSON answer; uvicorn logs the traceback."""
    return JSONResponse({"detail": f"the server failed on this request ({type(e).__name__}: {e}); "
                                   "see the server's log"}, status_code=500)


def read_options(query: list[tuple[str, str]], form: list[tuple[str, str]]) -> dict:
    """Query and form fields -> Generation keyword arguments. An empty value means "not given"; a name given
    twice, an unknown name or a value out of range is a 422 naming it."""
    given = {}
    for name, value in query + form:
        if value == "":
            continue
        if name in given:
            raise BadRequest(422, f"option {name!r} is given twice")
        given[name] = value
    try:
        options = CaptionOptions(**given).model_dump()
    except ValidationError as e:
        problems = [f"{'.'.join(map(str, err['loc'])) or 'options'}: {err['msg']}" for err in e.errors()]
        known = ", ".join(CaptionOptions.model_fields)
        raise BadRequest(422, "bad option: " + "; ".join(problems) + f" (options: {known})") from None
    if not options["do_sample"]:
        options["seed"] = None  # greedy and beam search don't draw random numbers: such requests batch as usual
    return options


# ----------------------------------------------------------------------------------------------
# reading uploads: one verdict per file

@dataclass
class FileResult:
    filename: str
    pixels: torch.Tensor | None = None   # (3, S, S) when the file is a usable image
    error: str | None = None
    status: int = 200                    # the 4xx of the error

    def entry(self, caption: str | None, ms: float) -> dict:
        if self.error is not None:
            return {"filename": self.filename, "error": self.error, "status": self.status}
        return {"filename": self.filename, "caption": caption, "ms": round(ms, 1)}


def check_upload(name: str, size: int, max_bytes: int) -> FileResult | None:
    """Why a file is refused before it is read (empty: 400, over the size limit: 413), or None."""
    if size == 0:
        return FileResult(name, error="empty file (0 bytes)", status=400)
    if size > max_bytes:
        return FileResult(name, error=f"{size:,} bytes: over the upload limit of {max_bytes / 2**20:g} MB "
                                      f"({max_bytes:,} bytes; serve.py --max_upload_mb)", status=413)
    return None


def decode_image(name: str, data, preprocess, max_pixels: int) -> FileResult:
    """(In a worker thread.) An upload (bytes, or its spooled file, read from the start) -> the model's input
    tensor, or the reason the file is refused (more pixels than --max_megapixels: 413, not an image: 415)."""
    try:
        if isinstance(data, bytes):
            data = io.BytesIO(data)
        data.seek(0)
        pixels = preprocess(load_rgb(data, max_pixels))
    except Exception as e:  # whatever decoding a stranger's bytes raises: this file is refused, the others go on
        reason = image_problem(e)  # (which failures mean "too large" is dataset's to say)
        if reason.startswith("image too large"):
            return FileResult(name, error=reason + " (serve.py --max_megapixels)", status=413)
        return FileResult(name, error=reason, status=415)
    return FileResult(name, pixels=pixels)


# ----------------------------------------------------------------------------------------------
# the app

@dataclass
class Limits:
    """What the server accepts; serve.py's flags of the same names."""
    max_batch: int = 32                 # images per generate call
    max_wait_ms: float = 10.0           # how long a batch's first image waits for others
    max_upload_mb: float = 20.0         # per file
    max_files: int = 32                 # per request
    max_megapixels: float = 50.0        # per image, read from the header before decoding (50 MP decodes in ~1 s)
    max_request_tokens: int = 16384     # per request: images x num_beams x max_new_tokens, the worst-case decoding work
    max_inflight_mb: float | None = None  # request bodies held at once (None: from the RAM, default_inflight_mb())
    max_queue_tokens: int = 32768       # work queued across requests (2 requests of the largest size)
    max_queue_s: float = 120.0          # a request not in a batch this long after joining the queue gets a 503
    body_timeout_s: float = 30.0        # a body must arrive within this (+ 1 s per MB received: slow links finish)
    idle_timeout_s: float = 10.0        # a connection that begins no request this long after opening is closed

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * 2**20)

    @property
    def body_limit(self) -> int:
        """The largest request body: max_files full-size files + 1 MB for the multipart framing and options."""
        return self.max_files * self.max_upload_bytes + 2**20

    @property
    def inflight_bytes(self) -> int:
        if self.max_inflight_mb is None:  # the default always holds one full request
            return max(default_inflight_mb() * 2**20, self.body_limit)
        return int(self.max_inflight_mb * 2**20)

    def checked(self) -> Limits:
        if self.inflight_bytes < self.body_limit:
            raise ConfigError(f"--max_inflight_mb {self.inflight_bytes / 2**20:g} is less than one full request "
                              f"({self.body_limit / 2**20:g} MB = --max_files x --max_upload_mb + 1): raise it, or "
                              "lower --max_files / --max_upload_mb")
        return self

    @property
    def max_pixels(self) -> int:
        return int(self.max_megapixels * 1_000_000)


def default_inflight_mb() -> int:
    """A quarter of this machine's memory (or of its container's limit), at most 4 GB: several full-size
    requests at once, room for the rest (Limits raises it to one full request on a small machine)."""
    try:
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):  # (not on Linux / macOS)
        ram = 8 * 2**30
    try:  # cgroup v2: a container's memory limit ("max" when there is none)
        ram = min(ram, int(Path("/sys/fs/cgroup/memory.max").read_text().strip()))
    except (OSError, ValueError):
        pass
    return int(min(ram / 4, 4 * 2**30) // 2**20)


def create_app(model, checkpoint: str, limits: Limits | None = None, metadata: dict | None = None,
               announce: str | None = None):
    """The FastAPI app serving `model` (a loaded Captioner in eval mode); `announce` is printed once it serves.
    app.state.dropped counts the requests cut off by a shutdown (after uvicorn's grace period)."""
    limits = (limits or Limits()).checked()
    # uploads are decoded on as many threads as there are cores: more only fight over the GIL (and, on a
    # CPU, with generation) and made the CPU load test ~15% slower than with these
    decoder = ThreadPoolExecutor(os.cpu_count() or 2, thread_name_prefix="capkit-decode")
    metrics, budget = ServerMetrics(), Budget(limits.inflight_bytes)
    batcher = Batcher(partial(generate, model), limits.max_batch, limits.max_wait_ms, limits.max_queue_tokens,
                      limits.max_queue_s, metrics)
    metrics.watch(queue_images=lambda: batcher.queued_images, queue_tokens=lambda: batcher.queued_tokens,
                  inflight_bytes=lambda: budget.used)

    @asynccontextmanager
    async def lifespan(app):
        task = asyncio.create_task(batcher.run())
        if announce:
            print(announce, flush=True)
        yield
        task.cancel()  # (uvicorn has answered, or after its grace period dropped, every request before this)
        await asyncio.gather(task, return_exceptions=True)
        batcher.close()
        decoder.shutdown()

    app = FastAPIOffline(title="capkit captioner", lifespan=lifespan, redoc_url=None,
                         description=f"Captions images with `{checkpoint}`. The web page is at `/`.")
    app.state.dropped, app.state.metrics = 0, metrics
    app.add_middleware(Admission, budget=budget, body_limit=limits.body_limit, body_timeout_s=limits.body_timeout_s,
                       metrics=metrics)
    app.add_exception_handler(BadRequest, bad_request)
    app.add_exception_handler(Exception, server_error)
    health = {"status": "ok", "model_loaded": True, "checkpoint": checkpoint, "model_type": model.config.model_type,
              "model": model_names(model.config), "device": str(model.device),
              "epoch": (metadata or {}).get("epoch"), **asdict(limits),
              "max_inflight_mb": limits.inflight_bytes / 2**20, "defaults": asdict(_DEF),
              "limits": GENERATION_LIMITS}

    @app.api_route("/", methods=["GET", "HEAD"], response_class=HTMLResponse, include_in_schema=False)
    async def page():
        # the page builds everything it shows with textContent: a file name or caption is never markup
        return HTMLResponse(PAGE.read_text(encoding="utf-8"), headers={"Content-Security-Policy": PAGE_CSP})

    @app.head("/health", include_in_schema=False)  # (curl -I, load balancers' checks)
    @app.get("/health")
    async def get_health() -> dict:
        """Whether the model is loaded, what it is, where it runs, the server's limits and counters."""
        return health | {"served": dict(batcher.stats)}

    @app.get("/metrics", include_in_schema=False)
    async def get_metrics() -> Response:
        """The counters, histograms and gauges of ServerMetrics, in the Prometheus text format."""
        body, content_type = metrics.exposition()
        return Response(body, media_type=content_type)

    @app.post("/caption", openapi_extra=CAPTION_OPENAPI)
    async def caption(request: Request) -> list[dict]:
        """Caption the images of multipart field `files`, in order. A file that is not a usable image gets
        {"filename", "error", "status"} in its place; if none is usable, the request fails with the first
        file's 4xx."""
        try:
            return await caption_request(request, model, limits, batcher, decoder, metrics)
        except asyncio.CancelledError:  # a shutdown's grace period ran out (or the server was killed)
            app.state.dropped += 1
            raise

    return app


def generate(model, pixels: torch.Tensor, options: dict, stop=None) -> list[str]:
    """(In the batcher's thread.) model.generate, ending after the current step once stop() is True; a seed is
    the request's own: the random numbers of later unseeded sampling are drawn afresh, not from the sequence
    that seed started."""
    try:
        return model.generate(pixel_values=pixels, stop=stop, **options)
    finally:
        if options["seed"] is not None:
            torch.seed()


async def caption_request(request: Request, model, limits: Limits, batcher: Batcher, decoder, metrics) -> list[dict]:
    """POST /caption: read, refuse what can't be used, reserve the work in the queue (503 before any decoding),
    decode one file at a time, caption through the batcher, answer in order. From the moment the body is in, a
    client that disconnects has its work dropped."""
    started, gone = time.perf_counter(), None
    try:
        with ExitStack() as held:
            async with open_request(request, limits) as (uploads, options):
                usable = check_work(model, uploads, options, limits)
                held.enter_context(batcher.reserved(usable, options))
                gone = asyncio.ensure_future(client_gone(request.receive))
                results = await decode_all(uploads, model.preprocess, limits.max_pixels, decoder, gone)
            release_body(request.scope)  # the spooled files are closed: the bytes leave the upload budget
            good = [r for r in results if r.error is None]
            if not good:
                raise BadRequest(results[0].status, "; ".join(f"{r.filename}: {r.error}" for r in results),
                                 [r.entry(None, 0) for r in results])
            captions = iter(await caption_unless_gone(batcher, torch.stack([r.pixels for r in good]), options, gone))
    except ClientGone:
        metrics.client_left()
        raise
    except Busy as e:
        metrics.refused(e.reason)
        raise BadRequest(503, e.detail, headers={"Retry-After": str(retry_after_s(e.wait_s))}) from None
    except torch.OutOfMemoryError:
        raise BadRequest(503, f"out of {model.device.type} memory for this batch: try fewer images, fewer beams, "
                              "or restart the server with a smaller --max_batch",
                         headers={"Retry-After": "5"}) from None
    finally:
        if gone is not None:
            gone.cancel()
    ms = (time.perf_counter() - started) * 1000
    return [r.entry(None if r.error else next(captions), ms) for r in results]


def check_work(model, uploads: list, options: dict, limits: Limits) -> int:
    """-> the images to decode; 422 for a max_new_tokens beyond the decoder's positions, or more work than
    --max_request_tokens."""
    try:
        model.generation(options)
    except ConfigError as e:
        raise BadRequest(422, str(e)) from None
    usable = sum(not isinstance(u, FileResult) for u in uploads)
    work = work_of(usable, options)
    if work > limits.max_request_tokens:
        raise BadRequest(422, f"this request asks for up to {work:,} generated tokens ({usable} images x "
                              f"{options['num_beams']} beams x max_new_tokens {options['max_new_tokens']}); this "
                              f"server allows {limits.max_request_tokens:,} a request (serve.py --max_request_tokens)."
                              " Send fewer images, beams or tokens")
    return usable


async def client_gone(receive) -> None:
    """Returns when the client disconnects (the body is already in: the next ASGI message is the disconnect)."""
    while (await receive())["type"] != "http.disconnect":
        pass


async def decode_all(uploads: list, preprocess, max_pixels: int, decoder, gone) -> list[FileResult]:
    """Each upload decoded in turn on the decoder threads (one file of this request at a time: a big request
    neither holds its files in memory at once nor makes the others wait behind all of its files)."""
    loop, results = asyncio.get_running_loop(), []
    for upload in uploads:
        if gone.done():
            raise ClientGone
        results.append(upload if isinstance(upload, FileResult) else
                       await loop.run_in_executor(decoder, decode_image, *upload, preprocess, max_pixels))
    return results


async def caption_unless_gone(batcher: Batcher, pixels: torch.Tensor, options: dict, gone) -> list[str]:
    """The batcher's captions; if the client leaves first, its request is cancelled (its queued images are
    dropped; a batch of only such requests stops) and ClientGone raised."""
    await asyncio.sleep(0)  # (a disconnect that came with the body is seen before the images join the queue)
    if gone.done():
        raise ClientGone
    task = asyncio.ensure_future(batcher.caption(pixels, options))
    try:
        await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
        if not task.done():
            raise ClientGone
        return task.result()
    finally:  # (the client left, or this handler was cancelled: a shutdown's grace ran out)
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)


@asynccontextmanager
async def open_request(request: Request, limits: Limits):
    """-> (for each file of field `files`: (filename, its spooled file), or the FileResult refusing it unread;
    the decoding options), while the form is open. A request that can't be read is a BadRequest. Starlette
    spools each file past 1 MB to an anonymous temp file, which vanishes when the form is closed here."""
    if request.headers.get("content-type", "").split(";")[0].strip().lower() != "multipart/form-data":
        raise BadRequest(415, f"send the images as multipart/form-data in field {FILES_FIELD!r} "
                              f"(curl -F {FILES_FIELD}=@photo.jpg ...)")
    try:
        form = await request.form(max_files=limits.max_files, max_fields=64, max_part_size=MAX_FIELD_BYTES)
    except HTTPException as e:  # malformed multipart, too many files, an overlong field: Starlette's sentence
        if "Too many files" in str(e.detail):
            raise BadRequest(413, f"{e.detail} (serve.py --max_files)") from None
        raise BadRequest(400, f"unreadable multipart body: {e.detail} (a text field may hold at most "
                              f"{MAX_FIELD_BYTES} bytes)") from None
    except ClientDisconnect:  # (nobody is left to read the answer; it keeps the log free of tracebacks)
        raise ClientGone from None
    try:
        yield sort_form(form.multi_items(), request, limits)
    finally:
        await form.close()


def sort_form(items: list, request: Request, limits: Limits) -> tuple[list, dict]:
    """The form's items -> (uploads, options), or the 4xx for files in the wrong place or none."""
    uploads = []
    for i, f in enumerate(v for k, v in items if k == FILES_FIELD and isinstance(v, UploadFile)):
        name = f.filename or f"file {i + 1}"
        uploads.append(check_upload(name, f.size or 0, limits.max_upload_bytes) or (name, f.file))
    elsewhere = sorted({k for k, v in items if k != FILES_FIELD and isinstance(v, UploadFile)})
    if elsewhere:
        raise BadRequest(422, f"files in field(s) {', '.join(map(repr, elsewhere))}: send every image in "
                              f"multipart field {FILES_FIELD!r} (curl -F {FILES_FIELD}=@photo.jpg)")
    fields = [(k, v) for k, v in items if not isinstance(v, UploadFile)]
    if any(k == FILES_FIELD for k, _ in fields):
        raise BadRequest(422, f"field {FILES_FIELD!r} holds text, not a file: send it as {FILES_FIELD}=@photo.jpg")
    if not uploads:
        raise BadRequest(422, f"no images: send each one in multipart field {FILES_FIELD!r} "
                              f"(curl -F {FILES_FIELD}=@photo.jpg)")
    return uploads, read_options(list(request.query_params.multi_items()), fields)


def model_names(cfg) -> str:
    """What the checkpoint is built on, for /health and the page."""
    if cfg.model_type == "prefix":
        return f"{cfg.encoder_name} -> {cfg.mapper_type} -> {cfg.lm_name}"
    return f"{cfg.hf_model_name} ({cfg.model_type}, {cfg.peft_module or 'merged'})"


# ----------------------------------------------------------------------------------------------
# command line

def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", required=True, help="a .pth, an adapter_* folder or a merged_* folder")
    ap.add_argument("--host", default="127.0.0.1", help="address to listen on (default: this machine only)")
    ap.add_argument("--port", type=int_at_least(0, 65535), default=8000, help="0: any free port")
    ap.add_argument("--max_batch", type=positive_int, default=Limits.max_batch, help="images per generate call")
    ap.add_argument("--max_wait_ms", type=int_at_least(0, 10_000), default=Limits.max_wait_ms,
                    help="how long the first request of a batch waits for others")
    ap.add_argument("--max_upload_mb", type=int_at_least(1, 1024), default=Limits.max_upload_mb)
    ap.add_argument("--max_files", type=int_at_least(1, 1000), default=Limits.max_files, help="images per request")
    ap.add_argument("--max_megapixels", type=int_at_least(1, 179), default=Limits.max_megapixels,
                    help="pixels per image, checked before decoding")
    ap.add_argument("--max_request_tokens", type=positive_int, default=Limits.max_request_tokens,
                    help="images x num_beams x max_new_tokens a request may ask for (one request can't hold the "
                         "model for long)")
    ap.add_argument("--max_inflight_mb", type=positive_int, default=None,
                    help="request-body MB held at once; a request that would pass it gets 503 + Retry-After "
                         "before its body is read (default: a quarter of the RAM, at most 4096; here "
                         f"{default_inflight_mb()})")
    ap.add_argument("--max_queue_tokens", type=positive_int, default=Limits.max_queue_tokens,
                    help="work queued across requests (images x num_beams x max_new_tokens); past it, 503 + "
                         "Retry-After")
    ap.add_argument("--max_queue_s", type=int_at_least(1, 3600), default=Limits.max_queue_s,
                    help="a request none of whose images is in a batch this long after it joined the queue gets "
                         "503 + Retry-After")
    ap.add_argument("--body_timeout_s", type=int_at_least(1, 3600), default=Limits.body_timeout_s,
                    help="a request body must arrive within this (plus 1 s per MB received), else 408")
    ap.add_argument("--idle_timeout_s", type=int_at_least(1, 3600), default=Limits.idle_timeout_s,
                    help="a connection that begins no request this long after it opened (or after its last "
                         "answer) is closed: slow headers (slowloris) included")
    ap.add_argument("--shutdown_grace_s", type=int_at_least(1, 3600), default=60,
                    help="on Ctrl-C / SIGTERM, how long requests in flight may take to finish")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--datastore", metavar="DIR_OR_FILE", help="a model trained with retrieval_k: retrieve from these "
                    "captioned images instead of its training set (a folder, or a saved datastore_*.safetensors)")
    ap.add_argument("--threads", type=positive_int, default=None,
                    help="torch threads on a CPU (default: the cores less one, which the HTTP side uses)")
    return ap.parse_args(argv)


def listen(host: str, port: int) -> socket.socket:
    """The listening socket, bound before the model loads: a port in use is said at once. Connections that
    come before the server runs wait in its backlog."""
    try:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        # listening now, not when uvicorn starts: the "serving ... at URL" line comes from the app's startup,
        # before uvicorn listens, and a client that connected on that line was refused (seen in the tests)
        sock.listen(2048)
    except OSError as e:
        raise ConfigError(f"can't listen on {host}:{port}: {e.strerror or e}. Pick another --port "
                          "(or --port 0 for any free one), or stop what is using it.") from None
    sock.set_inheritable(True)
    return sock


def server_config(app, limits: Limits, shutdown_grace_s: int, log_level: str = "info") -> uvicorn.Config:
    """uvicorn's settings: its h11 protocol with the idle-connection limit (counted in /metrics)."""
    return uvicorn.Config(app, log_level=log_level, timeout_graceful_shutdown=shutdown_grace_s,
                          http=idle_guarded_h11(limits.idle_timeout_s, app.state.metrics.idle_connection_cut),
                          timeout_keep_alive=min(5, limits.idle_timeout_s))


def run(argv=None) -> int:
    args = parse_args(argv)
    limits = Limits(args.max_batch, args.max_wait_ms, args.max_upload_mb, args.max_files, args.max_megapixels,
                    args.max_request_tokens, args.max_inflight_mb, args.max_queue_tokens, args.max_queue_s,
                    args.body_timeout_s, args.idle_timeout_s).checked()
    sock = listen(args.host, args.port)
    device = pick_device(args.device)
    if device.type == "cpu":  # generation's threads leave a core to the HTTP side (decoding uploads, answering)
        torch.set_num_threads(args.threads or max(1, (os.cpu_count() or 2) - 1))
    model, metadata, _ = load_checkpoint(args.checkpoint, device, datastore=args.datastore)
    host, port = sock.getsockname()[:2]
    url = f"http://{f'[{host}]' if ':' in host else host}:{port}/"
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"warning: listening on {args.host}: anyone who can reach this machine can use the model "
              "(no authentication)", file=sys.stderr)
    app = create_app(model, Path(args.checkpoint).name, limits, metadata,
                     announce=f"serving {args.checkpoint} ({model.config.model_type}, {model.device}"
                     + (f", {torch.get_num_threads()} threads" if device.type == "cpu" else "") + f") at {url}")
    stopped = []
    for sig in (signal.SIGINT, signal.SIGTERM):  # uvicorn re-raises the signal after its graceful shutdown
        signal.signal(sig, lambda s, frame: stopped.append(signal.Signals(s).name))
    server = uvicorn.Server(server_config(app, limits, args.shutdown_grace_s))
    server.run(sockets=[sock])
    how = f" ({stopped[0]})" if stopped else ""
    if server.force_exit or app.state.dropped:  # a second Ctrl-C, or requests still running after the grace period
        print(f"stopped{how}: {app.state.dropped} request(s) in flight were cut off", file=sys.stderr)
        return 130
    print(f"stopped{how}: every request in flight was answered", file=sys.stderr)
    return 0


def main(argv=None) -> int:
    """The command line: expected failures end in one paragraph and their exit code (errors.py)."""
    return run_cli(run, argv)


if __name__ == "__main__":
    sys.exit(main())
