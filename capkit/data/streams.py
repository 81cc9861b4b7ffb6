"""
Training on shards as a stream, in a seeded order that a resume can replay exactly.

The shards are put in groups of near-equal size, one per "slot" = (process, DataLoader worker). Each epoch every
slot takes one group (a new pairing and a new shard order each epoch), so every shard is read once per epoch by
exactly one worker of one process (one machine or many). A slot reads its shards in turn, one pair per (image,
caption), through a shuffle buffer seeded by (seed, epoch, slot), and cuts batches. Every slot stops after the
same number of batches (as many as the lightest group fills), so all processes take the same number of steps.

The whole order is a function of (seed, epoch, slot): the position in the stream is the training loop's
(epoch, batches done), and a resume replays the records up to it without decoding one image.

    stream = ShardStream(shards, counts, rank=0, processes=1, workers=2, local_batch=32, seed=42,
                         make_item=embeds_pair, buffer=1000)
    stream.set_position(epoch=1, batches_done=0)
    loader = DataLoader(stream, batch_size=None, num_workers=2, collate_fn=Collate(...))
"""
from __future__ import annotations

import heapq
import io
import random

import torch

from capkit.data.images import load_item


def shard_groups(counts: list[int], slots: int, seed: int) -> list[list[int]]:
    """The shards in `slots` groups of near-equal pairs (a seeded order, each shard to the lightest group)."""
    order = list(range(len(counts)))
    random.Random(f"{seed}/groups").shuffle(order)
    heap = [(0, g) for g in range(slots)]  # (pairs so far, group)
    out: list[list[int]] = [[] for _ in range(slots)]
    for i in order:
        load, g = heapq.heappop(heap)
        out[g].append(i)
        heapq.heappush(heap, (load + counts[i], g))
    return out


def deal_shards(groups: list[list[int]], seed: int, epoch: int) -> list[list[int]]:
    """Shard indices per slot for one epoch: each slot gets a group (a new pairing every epoch), its shards in
    a new order. The groups' loads never change, so neither does the number of batches each slot can fill."""
    slots = len(groups)
    perm = list(range(slots))
    random.Random(f"{seed}/{epoch}").shuffle(perm)
    out = []
    for slot in range(slots):
        ids = list(groups[perm[slot]])
        random.Random(f"{seed}/{epoch}/{slot}").shuffle(ids)
        out.append(ids)
    return out


def shuffled(items, size: int, rng: random.Random):
    """A shuffle buffer of `size` items: each new item goes in, a random one comes out; the rest at the end."""
    buf = []
    for x in items:
        buf.append(x)
        if len(buf) >= size:
            j = rng.randrange(len(buf))
            buf[j], buf[-1] = buf[-1], buf[j]
            yield buf.pop()
    rng.shuffle(buf)
    yield from buf


class DecodePair:
    """make_item for image records: decoded (load_rgb, as every image) and transformed in the worker.
    A class, not a closure: DataLoader workers started by spawn (macOS, Windows) receive it pickled."""

    def __init__(self, transform):
        self.transform = transform

    def __call__(self, rec: dict) -> dict:
        item = load_item(io.BytesIO(rec["image"]), self.transform, caption=rec["caption"])
        if "error" in item:  # named by its shard and key, not by a buffer
            item["error"] = (rec["key"], item["error"][1])
        return item


def embeds_pair(rec: dict) -> dict:
    """make_item for feature-shard records: the cached features, no image at all."""
    return {"image_embeds": rec["embeds"], "caption": rec["caption"]}


class ShardStream(torch.utils.data.IterableDataset):
    """Batches (lists of items for the DataLoader's collate_fn) of this process's slots; len() = the batches
    this process takes per epoch, the same on every process."""

    def __init__(self, shards, counts, *, rank: int, processes: int, workers: int, local_batch: int, seed: int,
                 make_item, buffer: int, max_batches: int | None = None, caption_transform=None):
        self.shards, self.counts, self.make_item, self.buffer = shards, list(counts), make_item, buffer
        self.caption_transform = caption_transform  # CaptionAugment or None
        self.rank, self.workers, self.local_batch, self.seed = rank, max(workers, 1), local_batch, seed
        self.slots = processes * self.workers
        self.groups = shard_groups(self.counts, self.slots, seed)
        n = min(sum(self.counts[i] for i in g) for g in self.groups) // local_batch  # the lightest group's batches
        self.per_slot = n if max_batches is None else min(n, max(1, max_batches // self.workers))
        self.epoch, self.start = 1, 0

    def __len__(self):
        return self.per_slot * self.workers

    def set_position(self, epoch: int, batches_done: int = 0) -> None:
        """Where the next iteration starts (read by the workers when the DataLoader starts them)."""
        self.epoch, self.start = epoch, batches_done

    def slot_shards(self, epoch: int, rank: int, worker: int) -> list[int]:
        return deal_shards(self.groups, self.seed, epoch)[rank * self.workers + worker]

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        w = info.id if info is not None else 0
        # the DataLoader takes batches from its workers in turn, starting at worker 0: after a resume at batch k,
        # worker 0 plays the slot whose batch is k-th, so the batches come in the uninterrupted run's order
        role = (w + self.start) % self.workers
        skip = len(range(role, self.start, self.workers))  # this slot's batches already trained
        rng = random.Random(f"{self.seed}/{self.epoch}/{self.rank * self.workers + role}")
        pairs = shuffled(self._pairs(self.slot_shards(self.epoch, self.rank, role)), self.buffer, rng)
        batch, errors, made = [], [], 0
        for p in pairs:
            if "error" in p:
                errors.append({"error": (p["key"], p["error"])})
                continue
            batch.append(p)
            if len(batch) < self.local_batch:
                continue
            if made >= skip:  # (skipped batches are replayed records, never decoded images)
                yield errors + self._items(batch, f"{self.seed}/{self.epoch}/{self.rank * self.workers + role}/{made}")
                errors = []
            batch, made = [], made + 1
            if made == self.per_slot:
                return

    def _items(self, batch: list, name: str) -> list:
        """The batch's items, with any caption or image augmentation drawn from torch's RNG seeded by the batch's
        place in the stream (and put back after): the same draws when a resume skips to it."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(random.Random(name).getrandbits(63))
            if self.caption_transform is not None:
                batch = [{**x, "caption": self.caption_transform(x["caption"])} for x in batch]
            return [self.make_item(x) for x in batch]

    def _pairs(self, shard_ids):
        for i in shard_ids:
            for rec in self.shards[i].records():
                if "error" in rec:  # a skip goes through the buffer too, but takes no place in a batch
                    yield rec
                    continue
                for c in rec["captions"]:
                    yield {**rec, "caption": c}
