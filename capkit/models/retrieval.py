"""
Retrieval over a datastore of captioned images, by the frozen encoder's features: the kNN baseline every
evaluation reports, and retrieval-augmented captioning (SmallCap's idea, Ramos et al. 2023: the captions of
the nearest training images become a text prompt the frozen decoder reads before the image prefix).

    from capkit.models.retrieval import Datastore
    store = Datastore.build(train_features, train_set.images, train_set.captions, fingerprint)
    store.save("saved_models/datastore_<run>.safetensors"); store = Datastore.load(path)
    idx = store.neighbours(test_features, k=4)          # (B, 4) rows of the datastore, nearest first

Keys are the features the captioner is fed, reduced to one unit vector per image: the pooled embedding, or the
mean of the tokens (a CNN's tokens average to its pooled vector). An image identical to the query (cosine
> 0.9999) is never its own neighbour: in training every image is in the datastore it retrieves from.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save

from capkit.data.features import encoder_fingerprint, image_features
from capkit.data.folders import load_folder
from capkit.data.images import SkipLog
from capkit.errors import MissingInputError, NothingReadable, RefusedFileError
from capkit.files import atomic_write

DATASTORE_FORMAT = "capkit.datastore.v1"
SELF_MATCH = 0.9999   # cosine above which a datastore image is the query itself
RETRIEVAL_K_MAX = 16            # retrieved captions in a prompt at most
# (inclusive) retrieval_k: 0 is no retrieval; retrieval_pool: in training the k are drawn among this many nearest
RETRIEVAL_BOUNDS = {"retrieval_k": (0, RETRIEVAL_K_MAX), "retrieval_pool": (0, 4 * RETRIEVAL_K_MAX)}
RETRIEVAL_CAPTION_TOKENS = 24   # each retrieved caption is cut to this many tokens in the prompt
# the prompt around the retrieved captions: (head, separator, tail). "smallcap": SmallCap's src/template.txt with its
# captions joined by blank lines (Ramos et al. 2023); "capkit": the one line capkit used first (older checkpoints)
RETRIEVAL_TEMPLATES = {"capkit": ("Similar images show: ", " | ", ". This image shows:"),
                       "smallcap": ("Similar images show\n\n", "\n\n", ".\n\nThis image shows")}


def retrieval_keys(feats: torch.Tensor) -> torch.Tensor:
    """Image features (N, E) or tokens (N, T, W) -> (N, D) float32 unit vectors."""
    x = feats.float()
    return F.normalize(x.mean(1) if x.ndim == 3 else x, dim=-1)


@dataclass
class Datastore:
    keys: torch.Tensor            # (M, D) float32 unit vectors
    captions: list[list[str]]     # each datastore image's captions
    images: list[str]             # where each came from (for the record)
    fingerprint: str              # features.encoder_fingerprint of the encoder that made the keys

    @classmethod
    def build(cls, feats: torch.Tensor, images, captions, fingerprint: str) -> "Datastore":
        if len(feats) != len(captions) or len(feats) == 0:
            raise ValueError(f"a datastore needs one feature row per captioned image ({len(feats)} vs {len(captions)})")
        return cls(retrieval_keys(feats).cpu(), [list(c) for c in captions], [str(p) for p in images], fingerprint)

    def __len__(self) -> int:
        return len(self.captions)

    @torch.no_grad()
    def neighbours(self, feats: torch.Tensor, k: int) -> torch.Tensor:
        """(B, k) datastore rows nearest to each query image (cosine, nearest first), the query itself excluded."""
        q = retrieval_keys(feats).to(self.keys.device)                                 # (B, D)
        sims = q @ self.keys.T                                                          # (B, M)
        sims = sims.masked_fill(sims > SELF_MATCH, -2.0)
        return sims.topk(min(k, len(self)), dim=-1).indices

    def save(self, path) -> None:
        meta = {"format": DATASTORE_FORMAT, "fingerprint": self.fingerprint,
                "captions": json.dumps(self.captions), "images": json.dumps(self.images)}
        blob = save({"keys": self.keys.half().contiguous()}, metadata=meta)
        atomic_write(Path(path), lambda f: f.write(blob))

    @classmethod
    def load(cls, path) -> "Datastore":
        """A saved datastore (safetensors: tensors and JSON text only, nothing that runs)."""
        try:
            with safe_open(str(path), "pt") as f:
                meta, keys = f.metadata() or {}, f.get_tensor("keys").float()
            captions, images = json.loads(meta["captions"]), json.loads(meta["images"])
        except Exception as e:  # not safetensors, truncated, no keys, bad JSON
            raise RefusedFileError(f"{path}: not a readable capkit datastore ({type(e).__name__}: {e})") from None
        ok = (meta.get("format") == DATASTORE_FORMAT and keys.ndim == 2 and len(keys) == len(captions) == len(images)
              and all(isinstance(c, list) and c and all(isinstance(s, str) for s in c) for c in captions))
        if not ok:
            raise RefusedFileError(f"{path}: a damaged capkit datastore (format, keys and captions don't agree)")
        return cls(keys, captions, images, str(meta.get("fingerprint", "")))


def open_datastore(model, source, cache_dir=None) -> Datastore:
    """A datastore for `model`: a saved file (its keys must come from this model's encoder), or a folder of
    captioned images in any layout dataset.load_folder reads, encoded now (features cached in cache_dir)."""
    path = Path(source)
    if path.is_dir():
        skips = SkipLog()
        data = load_folder(path, skips)
        feats, ok = image_features(model, data.images, cache_dir, skips=skips)
        if not ok:
            raise NothingReadable(f"datastore folder {path}: none of its images could be read ({skips.summary()})")
        data = data.subset(ok)
        print(f"datastore: {data.num_images} captioned images from {path} ({skips.summary()})")
        return Datastore.build(feats, data.images, data.captions, encoder_fingerprint(model))
    if not path.is_file():
        raise MissingInputError(f"datastore {path}: no such file or folder (give a saved datastore_*.safetensors or "
                                "a folder of captioned images)")
    store = Datastore.load(path)
    if store.fingerprint != encoder_fingerprint(model):
        raise RefusedFileError(f"{path}: its keys come from another image encoder (or other features) than this "
                               "model's; rebuild it with --datastore DIR (a folder of captioned images)")
    return store
