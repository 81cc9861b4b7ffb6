"""
Samples -> batches (captions tokenized and padded, images stacked, failed items dropped and reported), batches of
similar caption length, and one process's share of a job under accelerate.
"""
from __future__ import annotations

import torch
from accelerate.utils import gather_object

# ----------------------------------------------------------------------------------------------
# several processes (accelerate launch)

def run_sharded(acc, n: int, fn) -> list:
    """Split range(n) into one contiguous share per process, run fn(indices) on this process's share
    and return every process's result, in rank order, on every process (so results concatenated in
    that order follow index order). acc None or one process: just [fn(list(range(n)))]."""
    if acc is None or acc.num_processes == 1:
        return [fn(list(range(n)))]
    with acc.split_between_processes(list(range(n))) as mine:
        part = fn(list(mine))
    return gather_object([part])


def length_order(texts: list[str]) -> list[int]:
    """Indices of texts, shortest first (stable): scoring in this order, a batch padded to its longest text holds
    texts of about one length (random batches of Flickr8k captions were two-thirds padding)."""
    return sorted(range(len(texts)), key=lambda i: len(texts[i]))


class LengthGroupedBatches(torch.utils.data.Sampler):
    """Batches of similar caption length, in random order: shuffle all pairs, cut them into groups of
    `group` batches, sort each group by length, then shuffle the batches. Less padding per batch with
    the randomness kept; each epoch draws a new order from the generator."""

    def __init__(self, lengths, batch_size: int, generator: torch.Generator, group: int = 50):
        self.lengths, self.batch_size, self.generator, self.group = list(lengths), batch_size, generator, group

    def __len__(self):
        return (len(self.lengths) + self.batch_size - 1) // self.batch_size

    def __iter__(self):
        order = torch.randperm(len(self.lengths), generator=self.generator).tolist()
        span = self.batch_size * self.group
        batches = []
        for s in range(0, len(order), span):
            chunk = sorted(order[s:s + span], key=lambda i: self.lengths[i])
            batches += [chunk[b:b + self.batch_size] for b in range(0, len(chunk), self.batch_size)]
        for b in torch.randperm(len(batches), generator=self.generator).tolist():
            yield batches[b]


class CaptionDraw(torch.utils.data.Sampler):
    """Batches over a fresh draw of `per_image` captions of every image each epoch (an image's other captions come
    up in later epochs): an epoch over Flickr8k's 6,000 photos is 6,000 pairs per caption drawn, not 30,000. The
    pairs' images are `image_of`; the draw, then the batches (length-grouped when `lengths` is given, else shuffled),
    come from `generator`, so a resumed run that restores it replays both."""

    def __init__(self, image_of: list[int], per_image: int, batch_size: int, generator: torch.Generator,
                 lengths: list[int] | None = None):
        self.image_of, self.per_image, self.batch_size = list(image_of), per_image, batch_size
        self.generator, self.lengths = generator, None if lengths is None else list(lengths)
        counts = {}
        for i in self.image_of:
            counts[i] = counts.get(i, 0) + 1
        self.num_drawn = sum(min(n, per_image) for n in counts.values())  # the same every epoch

    def __len__(self):
        return (self.num_drawn + self.batch_size - 1) // self.batch_size

    def draw(self) -> list[int]:
        """This epoch's pairs: per image, the `per_image` with the smallest of one random key each."""
        keys = torch.rand(len(self.image_of), generator=self.generator).tolist()
        ranked = sorted(range(len(self.image_of)), key=lambda j: (self.image_of[j], keys[j]))
        kept, seen = [], {}
        for j in ranked:
            seen[self.image_of[j]] = seen.get(self.image_of[j], 0) + 1
            if seen[self.image_of[j]] <= self.per_image:
                kept.append(j)
        return kept

    def __iter__(self):
        kept = self.draw()                                                             # (num_drawn,) pair indices
        if self.lengths is not None:
            inner = LengthGroupedBatches([self.lengths[j] for j in kept], self.batch_size, self.generator)
            for batch in inner:
                yield [kept[b] for b in batch]
            return
        order = torch.randperm(len(kept), generator=self.generator).tolist()
        for s in range(0, len(order), self.batch_size):
            yield [kept[b] for b in order[s:s + self.batch_size]]


class Collate:
    """Stacks images and tokenizes captions with `tokenize(captions, max_length)` (a model's
    .tokenize: truncated, padded to the longest in the batch; pad positions have attention_mask 0
    and are ignored by the loss). Failed items are dropped and reported in batch['skipped']."""

    def __init__(self, tokenize=None, max_length: int = 128, pad_to_multiple_of: int | None = None, pad_id: int = 0):
        self.tokenize, self.max_length = tokenize, max_length
        self.pad_to_multiple_of, self.pad_id = pad_to_multiple_of, pad_id

    def __call__(self, items):
        skipped = [it["error"] for it in items if "error" in it]
        items = [it for it in items if "error" not in it]
        batch = {"skipped": skipped}
        if not items:
            return batch
        if "image_idx" in items[0]:
            batch["image_idx"] = torch.tensor([it["image_idx"] for it in items], dtype=torch.long)
        for key in ("pixel_values", "image_embeds"):  # (B, 3, S, S) images | (B, E) / (B, N, W) cached features
            if key in items[0]:
                batch[key] = torch.stack([it[key] for it in items])
        if self.tokenize is not None and "caption" in items[0]:
            enc = self.tokenize([it["caption"] for it in items], self.max_length)
            batch.update(pad_to_multiple(enc, self.pad_to_multiple_of, self.pad_id) if self.pad_to_multiple_of else enc)
        return batch


def pad_to_multiple(enc: dict, multiple: int, pad_id: int) -> dict:
    """Right-pad input_ids (with pad_id) and attention_mask (with 0) to a length that is a multiple of
    `multiple`: a compiled step then sees a few recurring shapes instead of one per caption length.
    The extra positions are masked out of attention and loss, so the loss is unchanged."""
    T = enc["input_ids"].shape[1]
    extra = -T % multiple
    if not extra:
        return enc
    return {**enc, "input_ids": torch.nn.functional.pad(enc["input_ids"], (0, extra), value=pad_id),
            "attention_mask": torch.nn.functional.pad(enc["attention_mask"], (0, extra), value=0)}
