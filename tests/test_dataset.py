"""Every dataset format, bad inputs, and the Flickr30K loader on a miniature of its real format."""
import csv
import json
import zipfile

import numpy as np
import pytest
import torch
from conftest import SHARED, make_tokenizer, write_image
from PIL import Image

from capkit.data.batching import Collate
from capkit.data.folders import caption_from_filename, from_captions_csv, load_folder
from capkit.data.images import ImageDataset, SkipLog, load_rgb
from capkit.models.decoders import tokenize_captions
from dataset import PairDataset, load_flickr30k, load_splits

TO_TENSOR = lambda im: torch.tensor(np.array(im.resize((8, 8)))).permute(2, 0, 1).float()


def test_captions_csv_quoting_several_rows_and_bom(tmp_path):
    write_image(tmp_path / "a.jpg")
    write_image(tmp_path / "sub" / "b.png")
    with open(tmp_path / "captions.csv", "w", newline="", encoding="utf-8-sig") as f:
        w = csv.writer(f)
        w.writerow(["image", "caption"])
        w.writerow(["a.jpg", 'a dog, "very" happy'])
        w.writerow(["a.jpg", "a second caption\nover two lines"])
        w.writerow(["sub/b.png", "  spaced   out  "])
    skips = SkipLog()
    data = load_folder(tmp_path, skips)
    assert [p.name for p in data.images] == ["a.jpg", "b.png"]
    assert data.captions[0] == ['a dog, "very" happy', "a second caption over two lines"]
    assert data.captions[1] == ["spaced out"]
    assert len(data.pairs()) == 3 and not skips.items


def test_captions_from_filenames(tmp_path):
    write_image(tmp_path / "Brown_dog-running_02.jpg")
    write_image(tmp_path / "cat on a mat.png")
    data = load_folder(tmp_path, SkipLog())
    assert sorted(c[0] for c in data.captions) == ["brown dog running", "cat on a mat"]
    assert caption_from_filename("x/boat (3).jpg") == "boat"


def test_recursive_sidecar_txt(tmp_path):
    write_image(tmp_path / "x" / "y" / "one.jpg")
    (tmp_path / "x" / "y" / "one.txt").write_text("first caption\n\nsecond caption\n")
    write_image(tmp_path / "two.png")
    (tmp_path / "two.txt").write_text("")          # empty caption file: skipped, counted
    write_image(tmp_path / "three.png")           # no caption file: skipped, counted
    skips = SkipLog()
    data = load_folder(tmp_path, skips)
    assert [p.name for p in data.images] == ["one.jpg"]
    assert data.captions == [["first caption", "second caption"]]
    assert skips.counts == {"empty caption": 1, "image without captions": 1, "no caption file": 1}


@pytest.mark.parametrize("fmt", ["jsonl", "csv"])
def test_imagefolder_metadata(tmp_path, fmt):
    write_image(tmp_path / "train" / "0001.png")
    write_image(tmp_path / "train" / "0002.png", color=(0, 0, 255))
    rows = [{"file_name": "train/0001.png", "text": "red square"}, {"file_name": "train/0002.png", "text": "blue square"}]
    if fmt == "jsonl":
        (tmp_path / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n{broken\n")
    else:
        with open(tmp_path / "metadata.csv", "w", newline="") as f:
            w = csv.DictWriter(f, ["file_name", "text"])
            w.writeheader()
            w.writerows(rows)
    skips = SkipLog()
    data = load_folder(tmp_path, skips)
    assert data.captions == [["red square"], ["blue square"]]
    assert len(skips.items) == (1 if fmt == "jsonl" else 0)


def test_bad_inputs_are_skipped_and_counted(tmp_path):
    root = tmp_path / "data"
    write_image(root / "good.jpg")
    (root / "notes.jpg").write_text("this is not an image")
    (root / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 20)
    write_image(tmp_path / "outside.jpg")
    rows = [["good.jpg", "fine"], ["good.jpg", "   "], ["missing.jpg", "gone"], ["notes.jpg", "text file"],
            ["corrupt.png", "broken"], ["../outside.jpg", "escapes the folder"], ["", "no image name"]]
    with open(root / "captions.csv", "w", newline="") as f:
        csv.writer(f).writerows([["image", "caption"], *rows])
    skips = SkipLog()
    data = load_folder(root, skips)
    assert [p.name for p in data.images] == ["good.jpg"] and data.captions == [["fine"]]
    c = skips.counts
    assert c["missing file"] == 1 and c["unreadable image"] == 2 and c["outside dataset folder"] == 1
    assert c["empty caption"] == 1 and c["row without image name"] == 1
    assert "skipped inputs: 6" in skips.summary()
    out = tmp_path / "skipped.tsv"
    skips.write(out)
    assert len(out.read_text().splitlines()) == 6


def test_image_broken_after_indexing_is_reported_not_raised(tmp_path):
    """A file truncated mid-run becomes a counted skip in the batch, never an exception in the loop."""
    write_image(tmp_path / "a.jpg", size=(64, 64))
    write_image(tmp_path / "b.jpg", size=(64, 64))
    data = load_folder(tmp_path, SkipLog())
    raw = (tmp_path / "b.jpg").read_bytes()
    (tmp_path / "b.jpg").write_bytes(raw[: len(raw) // 2])
    tok = make_tokenizer()
    batch = Collate(lambda c, n: tokenize_captions(tok, c, n), 16)([PairDataset(data, TO_TENSOR)[i] for i in range(2)])
    assert batch["pixel_values"].shape[0] == 1 and batch["input_ids"].shape[0] == 1
    assert len(batch["skipped"]) == 1 and batch["skipped"][0][0].endswith("b.jpg")
    (tmp_path / "a.jpg").unlink()
    batch = Collate(lambda c, n: tokenize_captions(tok, c, n), 16)([ImageDataset([tmp_path / "a.jpg"], TO_TENSOR)[0]])
    assert "pixel_values" not in batch and len(batch["skipped"]) == 1


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "CMYK", "LA", "I;16"])
def test_modes_are_converted_to_rgb(tmp_path, mode):
    ext = ".jpg" if mode == "CMYK" else ".png"
    p = write_image(tmp_path / f"x{ext}", color=(10, 200, 30), mode=mode)
    im = load_rgb(p)
    assert im.mode == "RGB" and im.size == (40, 30)


def test_16_bit_and_float_grayscale_keep_their_brightness(tmp_path):
    """Pillow's own convert("RGB") clips these modes at 255: an ordinary 16-bit PNG came out white."""
    half, quarter = np.full((6, 8), 32896, dtype=np.uint16), np.full((6, 8), 0.25, dtype=np.float32)
    Image.fromarray(half).save(tmp_path / "g16.png")
    Image.fromarray(quarter).save(tmp_path / "f32.tif")
    with Image.open(tmp_path / "g16.png") as im:
        assert im.mode.startswith("I")  # (the mode the old path clipped)
    assert load_rgb(tmp_path / "g16.png").getpixel((0, 0)) == (128, 128, 128)
    assert load_rgb(tmp_path / "f32.tif").getpixel((0, 0)) == (64, 64, 64)


def test_transparent_pixels_become_white(tmp_path):
    im = Image.new("RGBA", (4, 4), (255, 0, 0, 0))
    im.save(tmp_path / "t.png")
    assert load_rgb(tmp_path / "t.png").getpixel((0, 0)) == (255, 255, 255)


def test_odd_csv_gives_clear_errors(tmp_path):
    write_image(tmp_path / "a.jpg")
    (tmp_path / "captions.csv").write_text("picture;description\na.jpg;a dog\n")
    with pytest.raises(ValueError, match="no image column"):
        load_folder(tmp_path, SkipLog())
    (tmp_path / "captions.csv").write_text("")
    with pytest.raises(ValueError, match="empty CSV"):
        load_folder(tmp_path, SkipLog())
    with pytest.raises(FileNotFoundError):
        load_folder(tmp_path / "nope", SkipLog())


def test_an_unclosed_quote_is_counted_for_every_row_it_swallows_not_read_as_one_long_caption(tmp_path):
    """Before, `b.jpg,"a dog` took the next rows in as its caption text ('a dog c.jpg,a cat d.jpg,...'): three
    captions lost without a word, one wrong caption trained on. Now that row and each swallowed row are counted
    by line (blank lines included in the numbering), and a quoted caption over two lines is still kept."""
    for n in "abcd":
        write_image(tmp_path / f"{n}.jpg")
    (tmp_path / "captions.csv").write_text('image,caption\n\na.jpg,"a red\nball"\nb.jpg,"a dog, running\n'
                                           'c.jpg,a cat\n\nd.jpg,a bird\n')
    skips = SkipLog()
    data = load_folder(tmp_path, skips)
    assert [p.name for p in data.images] == ["a.jpg"] and data.captions == [["a red ball"]]
    assert [p.rsplit(":", 1)[1] for p, _ in skips.items] == ["5", "6", "8"]
    assert skips.summary() == "skipped inputs: 3 (3 unclosed quote)"
    assert "close its quote" in skips.items[0][1] and "caption on line 5" in skips.items[2][1]
    # the image column after the caption: the swallowed rows are found by their image names all the same
    (tmp_path / "captions.csv").write_text('caption,image\n"a dog,b.jpg\na cat,c.jpg\n')
    skips = SkipLog()
    assert load_folder(tmp_path, skips).images == [] and skips.summary() == "skipped inputs: 2 (2 unclosed quote)"


def test_split_by_image_never_shares_images(tmp_path):
    for i in range(20):
        write_image(tmp_path / f"img_{i:02d}.png", color=(i * 10, 0, 0))
    hp = {"dataset": "folder", "data_dir": str(tmp_path), "split_ratio": 0.8, "val_ratio": 0.25, "seed": 1}
    s = load_splits(hp, SkipLog())
    names = {k: {p.name for p in v.images} for k, v in s.items()}
    assert sum(map(len, names.values())) == 20
    assert not (names["train"] & names["test"]) and not (names["train"] & names["val"]) and not (names["val"] & names["test"])
    assert len(names["test"]) == 4 and len(names["val"]) == 4
    assert load_splits(hp, SkipLog())["train"].images == s["train"].images  # deterministic


def test_separate_train_test_dirs(tmp_path):
    for split, n in (("train", 5), ("test", 2)):
        for i in range(n):
            write_image(tmp_path / split / f"{split}_{i}_cat.png")
    s = load_splits({"dataset": "folder", "train_dir": str(tmp_path / "train"), "test_dir": str(tmp_path / "test"),
                     "val_ratio": 0.2, "seed": 0}, SkipLog())
    assert (s["train"].num_images, s["val"].num_images, s["test"].num_images) == (4, 1, 2)


def test_tokenize_appends_eos_truncates_and_pads():
    tok = make_tokenizer()
    out = tokenize_captions(tok, ["a red dog", "the big blue ball sits on snow in grass"], max_length=5)
    ids, mask = out["input_ids"], out["attention_mask"]
    assert ids.shape[1] <= 5
    for i in range(2):
        n = int(mask[i].sum())
        assert ids[i, n - 1] == tok.eos_token_id and mask[i, :n].all() and not mask[i, n:].any()
    assert mask[1].sum() == 5  # truncated to max_length, EOS kept


def make_flickr30k_miniature(root, zip_images=True):
    """The two files of nlphuji/flickr30k in their real format, at miniature size."""
    splits = ["train"] * 4 + ["val"] * 2 + ["test"] * 3
    rows, files = [], {}
    for i, split in enumerate(splits):
        name = f"{1000 + i}.jpg"
        p = write_image(root / "src" / name, color=(i * 20, 50, 50))
        files[name] = p.read_bytes()
        rows.append({"raw": json.dumps([f"caption {k} of image {i}" for k in range(5)]), "sentids": "[]",
                     "split": split, "filename": name, "img_id": str(i)})
    with open(root / "flickr_annotations_30k.csv", "w", newline="") as f:
        w = csv.DictWriter(f, ["raw", "sentids", "split", "filename", "img_id"])
        w.writeheader()
        w.writerows(rows)
    if zip_images:
        with zipfile.ZipFile(root / "flickr30k-images.zip", "w") as z:
            for name, data in files.items():
                z.writestr(f"flickr30k-images/{name}", data)
    return splits


def test_flickr30k_miniature_from_zip(tmp_path):
    splits = make_flickr30k_miniature(tmp_path)
    for split in ("train", "val", "test"):
        skips = SkipLog()
        data = load_flickr30k(split, skips, data_dir=tmp_path)
        assert data.num_images == splits.count(split) and not skips.items
        assert all(len(c) == 5 for c in data.captions)
        assert all(p.exists() for p in data.images)
    assert (tmp_path / "flickr30k-images_extracted" / ".complete").exists()
    # second load reuses the extraction
    assert load_flickr30k("test", SkipLog(), data_dir=tmp_path).num_images == 3


def test_flickr30k_offline_without_data_dir_says_what_to_do(tmp_path, monkeypatch):
    from capkit.errors import HubUnavailableError
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    with pytest.raises(HubUnavailableError, match="data_dir"):
        load_flickr30k("test", SkipLog())


@pytest.mark.skipif(not (SHARED / "flickr8k_sample" / "captions.csv").exists(), reason="../shared/flickr8k_sample absent")
def test_real_flickr8k_photos_through_the_folder_loader():
    root = SHARED / "flickr8k_sample"
    skips = SkipLog()
    data = from_captions_csv(root / "captions.csv", root / "images", skips)
    assert data.num_images == 238 and all(len(c) == 5 for c in data.captions) and not skips.items
    im = load_rgb(data.images[0])
    assert im.mode == "RGB" and max(im.size) <= 500


def test_length_grouped_batches_cover_everything_once_and_reduce_padding():
    from capkit.data.batching import LengthGroupedBatches
    g = torch.Generator().manual_seed(0)
    lengths = [int(x) for x in torch.randint(3, 60, (1000,), generator=torch.Generator().manual_seed(1))]
    sampler = LengthGroupedBatches(lengths, 16, g, group=10)
    epoch1, epoch2 = list(sampler), list(sampler)
    assert len(epoch1) == len(sampler) == 63
    assert sorted(i for b in epoch1 for i in b) == list(range(1000))
    assert epoch1 != epoch2  # a new random order every epoch
    pad = lambda batches: sum(max(lengths[i] for i in b) * len(b) - sum(lengths[i] for i in b) for b in batches)
    rand = torch.randperm(1000, generator=torch.Generator().manual_seed(2)).tolist()
    assert pad(epoch1) < 0.2 * pad([rand[s:s + 16] for s in range(0, 1000, 16)])


@pytest.mark.parametrize("captions_file, image_dir", [("captions.txt", "Images"), ("captions.csv", "images"),
                                                      ("captions.csv", ".")])
def test_kaggle_flickr8k_layout_captions_beside_an_images_folder(tmp_path, captions_file, image_dir):
    """Kaggle's Flickr8k: captions.txt (a CSV: image,caption) beside Images/; capkit's own: captions.csv beside
    images/ or the images themselves."""
    from conftest import write_image

    from capkit.data.folders import load_folder
    from capkit.data.images import SkipLog
    for name in ("1000268201_693b08cb0e.jpg", "1001773457_577c3a7d70.jpg"):
        write_image(tmp_path / image_dir / name)
    (tmp_path / captions_file).write_text("image,caption\n1000268201_693b08cb0e.jpg,A child in a pink dress .\n"
                                          "1000268201_693b08cb0e.jpg,A girl going into a wooden building .\n"
                                          '1001773457_577c3a7d70.jpg,"A black dog and a spotted dog are fighting"\n')
    skips = SkipLog()
    data = load_folder(tmp_path, skips)
    assert data.num_images == 2 and not skips.items
    assert data.captions[0] == ["A child in a pink dress .", "A girl going into a wooden building ."]


def test_a_plain_text_captions_txt_is_still_a_sidecar_caption(tmp_path):
    """A captions.txt that is not a CSV with image and caption columns keeps its old meaning (captions.png's captions)."""
    from conftest import write_image

    from capkit.data.folders import load_folder
    from capkit.data.images import SkipLog
    write_image(tmp_path / "captions.png")
    (tmp_path / "captions.txt").write_text("a red square\n")
    data = load_folder(tmp_path, SkipLog())
    assert data.num_images == 1 and data.captions == [["a red square"]]
