"""Karpathy's split files (dataset="karpathy"): COCO's filepath/filename and Flickr's filename, captions from `raw`,
restval into train (or not), a missing image counted, a malformed file one clear message; a small
dataset_flickr8k.json built from ../shared's Flickr8k photos (Karpathy's Flickr8k split is the official one)
trains through train.py."""
import csv
import json
import shutil

import pytest
from conftest import REPO, write_image

import train
from capkit.data.images import SkipLog
from capkit.data.karpathy import load_karpathy
from capkit.errors import DataError, MissingInputError
from dataset import load_splits

FLICKR8K = REPO.parent / "shared" / "flickr8k"


def entry(filename, split, *raw, filepath=None):
    e = {"filename": filename, "split": split, "sentences": [{"raw": r, "tokens": r.lower().split()} for r in raw]}
    return {**e, "filepath": filepath} if filepath is not None else e


def coco_like(tmp_path):
    """A COCO-style file: images under train2014/ and val2014/, one restval, one missing image."""
    for folder, name, color in (("train2014", "a.jpg", (200, 0, 0)), ("val2014", "b.jpg", (0, 200, 0)),
                                ("val2014", "c.jpg", (0, 0, 200)), ("val2014", "d.jpg", (90, 90, 0))):
        write_image(tmp_path / "coco" / folder / name, color)
    images = [entry("a.jpg", "train", "A red square.", "Red.", filepath="train2014"),
              entry("b.jpg", "restval", "A green square.", filepath="val2014"),
              entry("c.jpg", "val", "A blue square.", filepath="val2014"),
              entry("d.jpg", "test", "An olive square.", "Olive.", filepath="val2014"),
              entry("gone.jpg", "test", "Nothing here.", filepath="val2014")]
    path = tmp_path / "dataset_coco.json"
    path.write_text(json.dumps({"dataset": "coco", "images": images}))
    return path, tmp_path / "coco"


def test_coco_style_splits_with_restval_in_train_and_a_missing_image_counted(tmp_path):
    path, root = coco_like(tmp_path)
    skips = SkipLog()
    s = load_karpathy(path, root, skips)
    assert [p.name for p in s["train"].images] == ["a.jpg", "b.jpg"] and s["train"].captions[0] == ["A red square.", "Red."]
    assert [p.name for p in s["val"].images] == ["c.jpg"] and [p.name for p in s["test"].images] == ["d.jpg"]
    assert skips.items == [(str(root / "val2014" / "gone.jpg"), "missing file")]
    no_restval = load_karpathy(path, root, SkipLog(), restval=False)
    assert [p.name for p in no_restval["train"].images] == ["a.jpg"]


@pytest.mark.parametrize("content, message", [
    ("[1, 2]", "an 'images' list expected"),
    ('{"images": [{"split": "train", "sentences": []}]}', r"images\[0\] has no filename"),
    ('{"images": [{"filename": "a.jpg", "split": "dev", "sentences": []}]}', "has split 'dev'"),
    ('{"images": [{"filename": "a.jpg", "split": "train", "sentences": ["a dog"]}]}', "sentences with 'raw'"),
    ("{not json", "Karpathy split file"),
])
def test_a_malformed_file_is_one_clear_message(tmp_path, content, message):
    path = tmp_path / "dataset_x.json"
    path.write_text(content)
    with pytest.raises(DataError, match=message):
        load_karpathy(path, tmp_path, SkipLog())


def test_missing_file_or_image_folder_and_missing_keys_are_said(tmp_path):
    path, root = coco_like(tmp_path)
    with pytest.raises(MissingInputError, match="does not exist"):
        load_karpathy(tmp_path / "nope.json", root, SkipLog())
    with pytest.raises(MissingInputError, match="is not a folder"):
        load_karpathy(path, tmp_path / "nowhere", SkipLog())
    with pytest.raises(DataError, match="needs captions_file"):
        load_splits({"dataset": "karpathy", "data_dir": str(root)}, SkipLog())


def test_a_json_captions_file_with_the_default_dataset_means_karpathy(tmp_path, capsys):
    path, root = coco_like(tmp_path)
    hp = train.resolve_hparams([f"--captions_file={path}", f"--data_dir={root}"])
    assert hp["dataset"] == "karpathy" and "dataset='karpathy'" in capsys.readouterr().out
    splits = load_splits(hp, SkipLog())
    assert splits["test"].num_images == 1


def flickr8k_json(tmp_path, per_split=(12, 3, 3)):
    """A small dataset_flickr8k.json over copies of ../shared's photos: train from the official train split, val and
    test (here: dev photos standing in for the test split, whose photos are not in ../shared) from dev."""
    root = tmp_path / "Flickr8k_Dataset"
    root.mkdir()
    images = []
    for split_dir, splits in (("train", ["train"] * per_split[0]), ("dev", ["val"] * per_split[1] + ["test"] * per_split[2])):
        with open(FLICKR8K / split_dir / "captions.csv", newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
        names = list(dict.fromkeys(r["image"] for r in rows))[:len(splits)]
        for name, split in zip(names, splits):
            shutil.copy(FLICKR8K / split_dir / "images" / name, root / name)
            images.append(entry(name, split, *[r["caption"] for r in rows if r["image"] == name]))
    path = tmp_path / "dataset_flickr8k.json"
    path.write_text(json.dumps({"dataset": "flickr8k", "images": images}))
    return path, root


@pytest.mark.skipif(not FLICKR8K.is_dir(), reason="../shared/flickr8k is not beside the project (a user's clone)")
def test_a_flickr8k_split_file_from_shared_photos_trains_and_scores(tmp_path):
    path, root = flickr8k_json(tmp_path)
    splits = load_splits({"dataset": "karpathy", "captions_file": str(path), "data_dir": str(root)}, SkipLog())
    assert [splits[s].num_images for s in ("train", "val", "test")] == [12, 3, 3]
    assert all(len(c) == 5 for c in splits["train"].captions)
    res = train.train(train.resolve_hparams([
        "--preset=demo", "--dataset=karpathy", f"--captions_file={path}", f"--data_dir={root}", "--num_epochs=1",
        "--batch_size=16", f"--output_dir={tmp_path / 'out'}", f"--feature_cache_dir={tmp_path / 'cache'}",
        "--log_with=None", "--ablate_image=False"]))
    assert res["test"]["num_images"] == 3 and res["hyperparameters"]["dataset"] == "karpathy"
