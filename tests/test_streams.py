"""Data in shards: 🤗 datasets (parquet, save_to_disk, imagefolder) and WebDataset tar shards read as the folder
loader reads the same folder; bad members counted; shards split across processes and workers, each read once;
training streamed, with an exact resume after SIGKILL; an unreachable hub dataset is one paragraph, exit 5."""
import hashlib
import json
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import REPO

import train
from capkit.data.folders import load_folder
from capkit.data.images import SkipLog
from capkit.data.shapes import write_split
from capkit.data.shards import open_hf, tar_shards
from capkit.data.streams import ShardStream, deal_shards, shard_groups
from capkit.errors import RunStopped
from dataset import load_splits
from tools.convert import write_parquet, write_webdataset


def digest(data: bytes) -> str:
    return hashlib.sha1(data).hexdigest()


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("streams")
    for split, n, seed in (("train", 24, 1), ("test", 6, 3)):
        write_split(root / split, n, seed)
    return root


def expected(root) -> dict:
    """What the folder loader gives: image bytes -> sorted captions."""
    data = load_folder(root, SkipLog())
    return {digest(p.read_bytes()): sorted(c) for p, c in zip(data.images, data.captions)}


def read_all(shards, skips=None) -> dict:
    got = {}
    for s in shards:
        for rec in s.records():
            if "error" in rec:
                skips.add(rec["key"], rec["error"])
            else:
                got[digest(rec["image"])] = sorted(rec["captions"])
    return got


def hf_parts(path, **hp) -> dict:
    from dataset import _shard_parts
    return _shard_parts({"dataset": "hf", "hf_dataset": str(path), "seed": 0, **hp})


def hf_train_shards(path, **hp):
    return hf_parts(path, **hp)["train"]


@pytest.fixture(scope="module")
def formats(folder, tmp_path_factory):
    """The train folder as tar shards, parquet files, a save_to_disk folder and an imagefolder."""
    import datasets
    out = tmp_path_factory.mktemp("formats")
    data = load_folder(folder / "train", SkipLog())
    write_webdataset(data.images, data.captions, str(out / "wds" / "train"), per_shard=6)   # 4 shards
    write_parquet(data.images, data.captions, str(out / "parquet"), "train", per_shard=10)  # 3 files
    datasets.load_dataset(str(out / "parquet")).save_to_disk(str(out / "saved"))
    imf = out / "imagefolder"
    imf.mkdir()
    with open(imf / "metadata.jsonl", "w") as f:
        for p, caps in zip(data.images, data.captions):
            (imf / p.name).write_bytes(p.read_bytes())
            f.write(json.dumps({"file_name": p.name, "captions": caps}) + "\n")
    return out


@pytest.mark.parametrize("fmt", ["wds", "parquet", "saved", "imagefolder"])
def test_every_format_gives_what_the_folder_loader_gives(folder, formats, fmt):
    shards = tar_shards(str(formats / "wds" / "train-{00000..00003}.tar")) if fmt == "wds" else \
        hf_train_shards(formats / fmt, caption_column="captions", split_ratio=1.0, val_ratio=0)  # all of train
    skips = SkipLog()
    assert read_all(shards, skips) == expected(folder / "train") and not skips.items
    assert len(shards) == (4 if fmt == "wds" else 24)  # a small local 🤗 dataset: one shard per row (<= 64)


def test_streaming_parquet_and_split_names(formats):
    d = open_hf(str(formats / "parquet"), streaming=True)
    assert list(d) == ["train"] and d["train"].num_shards == 3
    shards = hf_train_shards(formats / "parquet", streaming=True, split_ratio=1.0, val_ratio=0)  # nothing held out
    assert len(shards) == 3 and sum(1 for s in shards for _ in s.records()) == 24  # caption column found by name
    # no validation / test split: whole files held out (split_ratio, then val_ratio), as tar shards are
    parts = hf_parts(formats / "parquet", streaming=True)
    assert sorted(len(v) for v in parts.values()) == [1, 1, 1]
    ids = {k: {s.ident() for s in v} for k, v in parts.items()}
    assert not (ids["train"] & ids["val"]) and not (ids["train"] & ids["test"]) and not (ids["val"] & ids["test"])
    with pytest.raises(train.DataError, match="no split 'training'"):
        hf_train_shards(formats / "parquet", hf_splits={"train": "training"})
    with pytest.raises(train.DataError, match="no column 'text'"):
        hf_train_shards(formats / "parquet", caption_column="text")


def test_truncated_shard_corrupt_member_and_missing_caption_are_counted(folder, tmp_path):
    import webdataset as wds
    data = load_folder(folder / "train", SkipLog())
    write_webdataset(data.images[:6], data.captions[:6], str(tmp_path / "good"), per_shard=6)
    with wds.TarWriter(str(tmp_path / "bad-00000.tar")) as sink:
        sink.write({"__key__": "a", "png": data.images[0].read_bytes(), "txt": "a fine one"})
        sink.write({"__key__": "b", "png": b"not an image at all", "txt": "a corrupt image"})
        sink.write({"__key__": "c", "png": data.images[1].read_bytes()})             # no caption
        sink.write({"__key__": "d", "txt": "no image"})
        sink.write({"__key__": "e", "png": data.images[2].read_bytes(), "txt": "   "})  # an empty caption
    whole = (tmp_path / "good-00000.tar").read_bytes()
    (tmp_path / "good-00000.tar").write_bytes(whole[:len(whole) // 2])                 # truncated mid-member
    skips = SkipLog()
    got = read_all(tar_shards([str(tmp_path / "good-00000.tar"), str(tmp_path / "bad-00000.tar")]), skips)
    assert 1 <= len(got) - 2 < 6            # the samples before the cut, plus a and b (b fails when decoded)
    reasons = sorted(r.split(":")[0] for _, r in skips.items)
    assert reasons == ["empty caption", "no caption", "no image in the sample (.jpg / .png / .webp)",
                       "truncated or corrupt tar shard"], reasons
    with pytest.raises(train.DataError, match="not found"):
        tar_shards(str(tmp_path / "good-{00000..00002}.tar"))


def test_image_cells_naming_paths_read_only_regular_files(folder, tmp_path):
    """A 🤗 row whose image cell is a path: a regular image file is read; a FIFO or a device is refused without
    blocking, a text file is an unreadable image, a missing one is counted: each a skip, no traceback, no hang."""
    import io
    import os

    import datasets
    os.mkfifo(tmp_path / "fifo")
    good = load_folder(folder / "train", SkipLog()).images[0]
    cells = [str(good), str(tmp_path / "fifo"), "/dev/zero", "/etc/passwd", str(tmp_path / "gone.png")]
    datasets.Dataset.from_dict({"image": cells, "caption": [f"row {i}" for i in range(5)]}).to_parquet(
        str(tmp_path / "pq" / "train-00000-of-00001.parquet"))
    skips = SkipLog()
    got = read_all(hf_train_shards(tmp_path / "pq", image_column="image", split_ratio=1, val_ratio=0), skips)
    passwd = open("/etc/passwd", "rb").read()
    assert sorted(got) == sorted([digest(good.read_bytes()), digest(passwd)])
    reasons = [r.split(":")[0] for _, r in skips.items]
    assert reasons == ["unreadable image", "unreadable image", "missing file"], skips.items
    from capkit.data.images import load_item
    assert "error" in load_item(io.BytesIO(passwd), None)              # read, then refused by the decoder


def test_a_full_disk_while_writing_feature_shards_stops_in_one_paragraph(folder, tmp_path, monkeypatch):
    import errno

    from conftest import make_model

    import capkit.data.shard_features as sf
    data = load_folder(folder / "train", SkipLog())
    write_webdataset(data.images[:4], data.captions[:4], str(tmp_path / "s"), per_shard=2)          # 2 shards
    real, calls = sf.atomic_write, []

    def full_after_one(path, fn):
        calls.append(path)
        if len(calls) > 1:
            raise OSError(errno.ENOSPC, "No space left on device")
        real(path, fn)
    monkeypatch.setattr(sf, "atomic_write", full_after_one)
    model = make_model()
    with pytest.raises(RunStopped, match="No space left on device.*feature_cache_dir") as e:
        sf.extract_shard_features(model, tar_shards(str(tmp_path / "s-{00000..00001}.tar")), tmp_path / "c", SkipLog())
    assert e.value.exit_code == 3 and "\n" not in str(e.value)
    monkeypatch.setattr(sf, "atomic_write", real)                     # space again: only the missing shard is made
    calls.clear()
    shards = sf.extract_shard_features(model, tar_shards(str(tmp_path / "s-{00000..00001}.tar")), tmp_path / "c",
                                       SkipLog())
    assert [s.images for s in shards] == [2, 2]


@pytest.mark.parametrize("features", ["pooled", "tokens"])
def test_feature_shards_hold_every_readable_image_once_and_count_the_rest(folder, tmp_path, features, capsys):
    """One feature shard per data shard, pooled or token features; a corrupt image is counted when decoded;
    a second call finds them all and extracts nothing."""
    import webdataset as wds
    from conftest import make_model

    from capkit.data.shard_features import extract_shard_features
    data = load_folder(folder / "train", SkipLog())
    write_webdataset(data.images[:5], data.captions[:5], str(tmp_path / "s"), per_shard=3)          # 2 shards
    with wds.TarWriter(str(tmp_path / "s-00002.tar")) as sink:
        sink.write({"__key__": "bad", "png": b"\x89PNG but not really", "txt": "a corrupt image"})
    model = make_model(encoder_features=features, **({"mapper_type": "transformer", "mapper_num_layers": 1,
                                                  "mapper_num_heads": 2} if features == "tokens" else {}))
    skips = SkipLog()
    shards = extract_shard_features(model, tar_shards(str(tmp_path / "s-{00000..00002}.tar")), tmp_path / "c", skips)
    assert "feature cache: 6 images x" in capsys.readouterr().out   # the size, said before extracting
    assert [s.images for s in shards] == [3, 2, 0] and [s.pairs for s in shards] == [15, 10, 0]
    assert [r for _, r in skips.items] == ["unreadable image: not in any image format Pillow reads"]
    recs = list(shards[0].records())
    want = model.encode_images(torch.stack([model.preprocess(__import__("PIL.Image").Image.open(p).convert("RGB"))
                                            for p in data.images[:3]]))
    assert torch.allclose(torch.stack([r["embeds"] for r in recs]).float(), want, atol=2e-3)
    assert tuple(recs[0]["embeds"].shape) == tuple(model.feature_shape)
    again = extract_shard_features(model, tar_shards(str(tmp_path / "s-{00000..00002}.tar")), tmp_path / "c", SkipLog())
    assert again == shards and "extracting" not in capsys.readouterr().out


@pytest.mark.parametrize("processes,workers", [(2, 1), (2, 2), (3, 2)])
def test_shards_are_dealt_once_per_epoch_and_every_reader_takes_the_same_batches(processes, workers):
    counts = [7, 3, 12, 5, 5, 9, 1, 8, 6, 10]
    groups = shard_groups(counts, processes * workers, seed=3)
    loads = [sum(counts[i] for i in g) for g in groups]
    assert max(loads) - min(loads) <= max(counts)                                # near-equal groups
    for epoch in (1, 2):
        dealt = sorted(i for ids in deal_shards(groups, 3, epoch) for i in ids)
        assert dealt == list(range(len(counts)))                                 # everything, once
    assert deal_shards(groups, 3, 1) != deal_shards(groups, 3, 2)                # a new deal each epoch

    class Fake:
        def __init__(self, i, n):
            self.i, self.n = i, n

        def records(self):
            return ({"key": f"{self.i}/{j}", "image": b"", "captions": ["c"]} for j in range(self.n))
    shards = [Fake(i, n) for i, n in enumerate(counts)]
    seen, lengths = [], set()
    for rank in range(processes):
        s = ShardStream(shards, counts, rank=rank, processes=processes, workers=workers, local_batch=2, seed=3,
                        make_item=lambda r: r["key"], buffer=4)
        lengths.add(len(s))
        for w in range(workers):  # what worker w of this process reads
            keys = [k for b in _worker_batches(s, w) for k in b]
            assert len(keys) == s.per_slot * 2
            seen += keys
    assert len(lengths) == 1                                                      # equal steps on every process
    assert len(seen) == len(set(seen))                                            # no pair read twice


def _worker_batches(stream, w):
    """Iterate a ShardStream as DataLoader worker w would."""
    import torch.utils.data as tud
    real = tud.get_worker_info
    tud.get_worker_info = lambda: type("I", (), {"id": w, "num_workers": stream.workers})()
    try:
        return list(stream)
    finally:
        tud.get_worker_info = real


def final_weights(out):
    metas = [json.loads(m.read_text()) for m in out.glob("training_metadata_*.json")]
    last = max(metas, key=lambda m: m["step"])
    return torch.load(out / last["checkpoint"], weights_only=True)["state_dict"], last


def steps(out):
    logs = list(out.glob("train_log_*.jsonl"))
    return [json.loads(x) for x in logs[0].read_text().splitlines()] if logs else []


@pytest.mark.parametrize("features", ["cached", "images"])
def test_sigkill_mid_epoch_then_resume_gives_the_same_weights(formats, folder, tmp_path, features, capsys):
    """2 DataLoader workers (each its own shards), killed mid-epoch: the resumed run replays the stream to the
    same batch and ends with the uninterrupted run's weights, bit for bit (images: with image and caption
    augmentation)."""
    tar = tmp_path / "tar"
    tar.mkdir()
    for p in (formats / "wds").glob("*.tar"):
        (tar / p.name).write_bytes(p.read_bytes())
    extra = ["--num_workers=2", "--save_every_n_steps=3", "--val_ratio=0"] + \
        (["--feature_cache_dir=None", "--augment_images=True", "--shuffle_captions=True", "--caption_dropout=0.3"]
         if features == "images" else [])  # augmentation: drawn per batch, so a resume draws the same
    args = ["--preset=demo", "--dataset=webdataset", f"--train_dir={tar}", "--num_epochs=2", "--batch_size=8",
            "--shuffle_buffer=16", "--evaluation_enabled=False", "--test_evaluation_enabled=False", "--log_with=None",
            f"--feature_cache_dir={tmp_path / 'cache'}", f"--data_cache_dir={tmp_path / 'data'}", *extra]
    ref, out = tmp_path / "ref", tmp_path / "run"
    assert train.main([*args, f"--output_dir={ref}"]) == 0  # the uninterrupted run, in this process
    p = subprocess.Popen([sys.executable, "train.py", *args, f"--output_dir={out}"], cwd=REPO,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    t = time.time()
    while len(steps(out)) < 5 and p.poll() is None and time.time() - t < 300:  # past the step-3 checkpoint
        time.sleep(0.01)
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert p.returncode == -signal.SIGKILL and 5 <= len(steps(out)) < len(steps(ref))
    assert train.main(["--resume", f"--output_dir={out}", "--num_workers=1"]) == 2  # another order: refused
    assert "read its shards with 2 readers" in capsys.readouterr().err
    assert train.main(["--resume", f"--output_dir={out}"]) == 0
    (w_ref, m_ref), (w_run, m_run) = final_weights(ref), final_weights(out)
    assert [s["loss"] for s in steps(out)] == [s["loss"] for s in steps(ref)]
    assert all(torch.equal(w_ref[k], w_run[k]) for k in w_ref)
    assert m_run["step"] == m_ref["step"] == 28  # 2 epochs x 14 batches


def test_streamed_training_learns_and_evaluates_like_folders(formats, folder, tmp_path):
    out = tmp_path / "run"
    meta = train.train(train.resolve_hparams([
        "--preset=demo", "--dataset=hf", f"--hf_dataset={formats / 'parquet'}", "--num_epochs=2", "--batch_size=8",
        f"--output_dir={out}", f"--feature_cache_dir={tmp_path / 'cache'}", f"--data_cache_dir={tmp_path / 'data'}",
        "--log_with=None", "--ablate_image=False", "--split_ratio=0.75"]))
    losses = [s["loss"] for s in steps(out)]
    assert losses[-1] < losses[0] * 0.7
    assert meta["test"]["num_images"] == 6 and meta["history"][-1]["val_loss"] is not None  # carved from train
    skips = SkipLog()
    test = load_splits({**meta["hyperparameters"], "data_cache_dir": str(tmp_path / "data")}, skips, ("test",))["test"]
    assert test.num_images == 6 and all(p.is_file() for p in test.images)  # eval.py reads the same 6 images
    streamed = train.train(train.resolve_hparams([  # streaming: the parquet files are the shards
        "--preset=demo", "--dataset=hf", f"--hf_dataset={formats / 'parquet'}", "--streaming=True", "--num_epochs=1",
        "--batch_size=8", f"--output_dir={tmp_path / 'streamed'}", f"--feature_cache_dir={tmp_path / 'cache'}",
        "--log_with=None", "--test_evaluation_enabled=False"]))
    # the stream is split by file, as tar shards are: of the 3 (10, 10 and 4 images) 1 for test (split_ratio), 1 for
    # validation; training keeps a 10-image file: 50 pairs, 6 steps of 8
    assert streamed["step"] == 6 and streamed["history"][-1]["val_loss"] is not None


def test_a_training_size_limit_caps_a_streamed_epoch_and_says_so(formats, tmp_path, capsys):
    meta = train.train(train.resolve_hparams([
        "--preset=demo", "--dataset=webdataset", f"--train_dir={formats / 'wds'}", "--val_ratio=0",
        "--training_size_limit=40", "--num_epochs=1", "--batch_size=8", "--evaluation_enabled=False",
        "--test_evaluation_enabled=False", "--log_with=None", f"--output_dir={tmp_path / 'out'}",
        f"--feature_cache_dir={tmp_path / 'cache'}"]))
    assert meta["step"] == 5  # 40 of the 120 pairs, 8 a step
    assert "training_size_limit=40 trains on 40 pairs per epoch of the 120 there are" in capsys.readouterr().out


def test_an_unreachable_hub_dataset_is_one_paragraph_exit_5(tmp_path, capsys):
    t = time.time()
    code = train.main(["--preset=demo", "--dataset=hf", "--hf_dataset=someone/captions-3m",
                       f"--output_dir={tmp_path}"])
    err = capsys.readouterr().err
    assert code == 5 and "hf_dataset" in err and "Traceback" not in err and time.time() - t < 30, err


def test_two_machines_on_loopback_read_disjoint_shards_that_cover_all(formats, tmp_path):
    """`accelerate launch --num_machines 2 --machine_rank 0|1` (one process each, gloo on 127.0.0.1): both
    finish, each reads its own shards, together every shard once, with the same number of steps."""
    from test_distributed import free_port
    port, procs = str(free_port()), []
    for rank in (0, 1):
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_machines", "2",
               "--machine_rank", str(rank), "--num_processes", "2", "--main_process_ip", "127.0.0.1",
               "--main_process_port", port, "train.py", "--preset=demo", "--dataset=webdataset",
               f"--train_dir={formats / 'wds'}", "--val_ratio=0", "--num_epochs=1", "--batch_size=8",
               "--evaluation_enabled=False", "--test_evaluation_enabled=False", "--log_with=None", "--device=cpu",
               f"--output_dir={tmp_path / f'out{rank}'}", f"--feature_cache_dir={tmp_path / 'cache'}"]
        procs.append(subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    logs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], logs[0][-6000:] + "\n=====\n" + logs[1][-6000:]
    read = []
    for rank, log in enumerate(logs):
        (line,) = [x for x in log.splitlines() if x.startswith(f"process {rank} of 2:")]
        read.append(json.loads(line.split("shards ")[-1]))
        assert "15 batches per epoch" in line   # 120 pairs / 2 processes / 4 each (a global batch of 8)
    assert not set(read[0]) & set(read[1]) and sorted(read[0] + read[1]) == [0, 1, 2, 3]
    assert len(steps(tmp_path / "out0")) == 15 and not list((tmp_path / "out1").glob("*.pth"))  # the main one saves


def test_damaged_or_foreign_local_datasets_and_lists_are_one_paragraph(formats, tmp_path, capsys):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "train-00000-of-00001.parquet").write_bytes(b"PAR1 this is not parquet at all PAR1")
    assert train.main(["--preset=demo", "--dataset=hf", f"--hf_dataset={bad}", f"--output_dir={tmp_path / 'o'}"]) == 2
    err = capsys.readouterr().err
    assert "hf_dataset" in err and "can't load it" in err and "Traceback" not in err, err
    assert train.main(["--preset=demo", "--dataset=folder", f"--train_dir={['a/', 'b/']}",
                       f"--output_dir={tmp_path / 'o'}"]) == 2
    assert "a list of paths is for dataset='webdataset'" in capsys.readouterr().err
    wds_dir = formats / "wds"  # a list of patterns, as a TOML file or --KEY=[...] gives it
    shards = load_splits({"dataset": "webdataset", "train_dir": [str(wds_dir / "train-0000{0..1}.tar"),
                                                                 str(wds_dir / "train-00003.tar")], "val_ratio": 0},
                         SkipLog(), ("train",))["train"].shards
    assert [s.path.rsplit("/", 1)[1] for s in shards] == ["train-00000.tar", "train-00001.tar", "train-00003.tar"]
