"""
serve.py's dynamic batching: concurrent requests share one generate call, under a bound on the work queued.

    batcher = Batcher(generate, max_batch=32, max_wait_ms=10, max_queue_tokens=32768, max_queue_s=120)
    asyncio.create_task(batcher.run())                      # the loop, for the server's life
    with batcher.reserved(n, options):                      # Busy at once when the queue is full
        captions = await batcher.caption(pixels, options)   # (n, 3, S, S) -> n captions; or Busy

A request's work is images x num_beams x max_new_tokens (the worst case of decoding it). It is reserved before
its images are decoded; past max_queue_tokens of work reserved, reserved() raises Busy at once. A request none
of whose images is in a batch max_queue_s after it joined the queue raises Busy too, so nothing waits forever.
A request cancelled while queued (its client left) is dropped before its batch; a batch whose requests have
all been cancelled stops after the decoding step under way (generate's `stop`).
"""
from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch


class Busy(Exception):
    """The queue is full, or a request waited past max_queue_s: a 503, retry after `retry_after` seconds."""

    def __init__(self, detail: str, reason: str, wait_s: float):
        super().__init__(detail)
        self.detail, self.reason, self.wait_s = detail, reason, wait_s


@dataclass(eq=False)  # jobs are compared by identity (their tensors have no single truth value)
class Job:
    pixels: torch.Tensor                 # (n, 3, S, S): one request's images (or a max_batch slice of them)
    options: dict                        # Generation keyword arguments
    key: tuple                           # jobs with equal keys may share a generate call
    future: asyncio.Future
    arrived: float = field(default_factory=time.monotonic)
    started: bool = False                # taken into a batch


def work_of(images: int, options: dict) -> int:
    """The most tokens decoding these images can take: images x num_beams x max_new_tokens."""
    return images * options["num_beams"] * options["max_new_tokens"]


class Batcher:
    """One worker thread runs generate(pixels, options, stop) -> captions on batches gathered from the queue: up
    to max_batch images with equal options, waiting at most max_wait_ms after the oldest job arrived."""

    def __init__(self, generate, max_batch: int, max_wait_ms: float, max_queue_tokens: int | None = None,
                 max_queue_s: float | None = None, metrics=None):
        self.generate, self.max_batch, self.max_wait = generate, max_batch, max_wait_ms / 1000
        self.max_queue_tokens, self.max_queue_s, self.metrics = max_queue_tokens, max_queue_s, metrics
        self.queue: asyncio.Queue[Job] = asyncio.Queue()
        self.waiting: list[Job] = []     # taken from the queue, not yet batched (other options, or no room)
        self.worker = ThreadPoolExecutor(1, thread_name_prefix="capkit-generate")
        self.stats = {"requests": 0, "images": 0, "batches": 0, "largest_batch": 0}
        self.queued_tokens = self.queued_images = 0   # reserved: requests admitted and not yet answered
        self.tokens_per_s = None                      # measured on the batches so far (Busy's Retry-After)

    def wait_estimate_s(self, extra_tokens: int = 0) -> float:
        return (self.queued_tokens + extra_tokens) / self.tokens_per_s if self.tokens_per_s else 1.0

    @contextmanager
    def reserved(self, images: int, options: dict):
        """Holds this request's work against max_queue_tokens until it is answered; Busy if it would pass it
        (a request is always admitted to an empty queue: --max_request_tokens bounds it alone)."""
        work = work_of(images, options)
        if self.max_queue_tokens is not None and self.queued_tokens and \
                self.queued_tokens + work > self.max_queue_tokens:
            raise Busy(f"the queue holds {self.queued_tokens:,} tokens of work and this request's {work:,} would "
                       f"pass its bound of {self.max_queue_tokens:,} (serve.py --max_queue_tokens): retry after "
                       "the Retry-After seconds", "queue_full", self.wait_estimate_s())
        self.queued_tokens, self.queued_images = self.queued_tokens + work, self.queued_images + images
        try:
            yield
        finally:
            self.queued_tokens, self.queued_images = self.queued_tokens - work, self.queued_images - images

    async def caption(self, pixels: torch.Tensor, options: dict) -> list[str]:
        """pixels (n, 3, S, S) -> n captions, decoded in whichever batches they land in; Busy when none of them
        is in a batch max_queue_s after joining the queue."""
        jobs = self.enqueue(pixels, options)
        gathered = asyncio.gather(*(job.future for job in jobs))
        try:  # (cancelled here, e.g. its client left: the finally cancels its jobs, which are then dropped)
            done, _ = await asyncio.wait({gathered}, timeout=self.max_queue_s)
            if not done and not any(job.started for job in jobs):
                raise Busy(f"not started within {self.max_queue_s:g} s of joining the queue (serve.py "
                           "--max_queue_s): the server is overloaded; retry after the Retry-After seconds",
                           "queue_timeout", self.wait_estimate_s())
            parts = await gathered
        finally:
            for job in jobs:  # (also when one part failed: the others are not generated for nobody)
                job.future.cancel()
            gathered.cancel()
        self.stats["requests"] += 1
        return [c for captions in parts for c in captions]

    def enqueue(self, pixels: torch.Tensor, options: dict) -> list[Job]:
        loop, options_key = asyncio.get_running_loop(), tuple(sorted(options.items()))
        # a seeded request is decoded alone, in one call: what its seed gives can't depend on the traffic
        parts = [pixels] if options["seed"] is not None else list(pixels.split(self.max_batch))
        jobs = []
        for part in parts:
            future = loop.create_future()
            key = (options_key, id(future)) if options["seed"] is not None else options_key
            jobs.append(Job(part, options, key, future))
            self.queue.put_nowait(jobs[-1])
        return jobs

    async def run(self) -> None:
        """The batching loop (a task for the server's life)."""
        loop = asyncio.get_running_loop()
        while True:
            batch = []
            try:
                batch = await self.next_batch()
                started = time.monotonic()
                captions = await loop.run_in_executor(self.worker, self.generate_batch, batch)
                self.measured(batch, time.monotonic() - started)
            except Exception as e:  # the model failed (out of memory, a bug): this batch's requests fail, not the loop
                for job in batch or self.waiting:
                    if not job.future.done():
                        job.future.set_exception(e)
                continue
            for job in batch:
                mine, captions = captions[:len(job.pixels)], captions[len(job.pixels):]
                if not job.future.done():  # (its client may have gone)
                    job.future.set_result(mine)

    def measured(self, batch: list[Job], seconds: float) -> None:
        tokens = sum(work_of(len(job.pixels), job.options) for job in batch)
        rate = tokens / max(seconds, 1e-3)
        self.tokens_per_s = rate if self.tokens_per_s is None else 0.8 * self.tokens_per_s + 0.2 * rate

    async def next_batch(self) -> list[Job]:
        """The oldest waiting job and those that may join it, once there are max_batch images or its wait is over.
        Jobs whose requests were cancelled (their clients left) are dropped here, unbatched."""
        while True:
            self.waiting = [job for job in self.waiting if not job.future.done()]
            if not self.waiting:
                self.waiting.append(await self.queue.get())
            first = self.waiting[0]
            deadline = first.arrived + self.max_wait
            while True:
                while not self.queue.empty():  # everything that arrived meanwhile (e.g. during the last batch)
                    self.waiting.append(self.queue.get_nowait())
                left = deadline - time.monotonic()
                if self.images_like(first.key) >= self.max_batch or left <= 0:
                    break
                try:
                    self.waiting.append(await asyncio.wait_for(self.queue.get(), left))
                except TimeoutError:
                    break
            batch, room = [], self.max_batch
            for job in list(self.waiting):
                if job.key == first.key and not job.future.done() and (not batch or len(job.pixels) <= room):
                    job.started = True
                    batch.append(job)
                    room -= len(job.pixels)
                    self.waiting.remove(job)
            if batch:
                return batch

    def images_like(self, key: tuple) -> int:
        return sum(len(job.pixels) for job in self.waiting if job.key == key and not job.future.done())

    def generate_batch(self, batch: list[Job]) -> list[str]:
        """(In the worker thread.) One generate call for the whole batch; it stops after the current step once
        every request in it has been cancelled."""
        pixels = torch.cat([job.pixels for job in batch])  # (B, 3, S, S)
        self.stats["batches"] += 1
        self.stats["images"] += len(pixels)
        self.stats["largest_batch"] = max(self.stats["largest_batch"], len(pixels))
        if self.metrics is not None:
            self.metrics.batch_done(len(pixels))

        stopped = []

        def everyone_left() -> bool:  # (read from this thread: a future's state is one attribute)
            if all(job.future.cancelled() for job in batch):
                stopped.append(True)
            return bool(stopped)
        captions = self.generate(pixels, batch[0].options, everyone_left)
        if stopped and self.metrics is not None:
            self.metrics.batch_stopped()
        return captions

    def close(self) -> None:
        for job in self.waiting:
            job.future.cancel()
        self.worker.shutdown(wait=True)
