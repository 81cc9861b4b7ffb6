"""Hostile and tired-user input, family by family (the rule: never a traceback, never a hang, never code run,
never a file lost outside the run). Every case asserts the exact outcome: the exit code, the sentence
naming the file or key, the counted skip, the marker file that must not appear, the victim file that
must still be there, the escaped HTML."""
import csv
import json
import os
import shutil
import signal
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from conftest import REPO, bomb_png, write_image

import eval as eval_mod
import inference
import load_model_example
import train
from capkit.data.batching import Collate
from capkit.data.folders import load_folder
from capkit.data.images import ImageDataset, SkipLog
from capkit.data.shapes import write_split
from capkit.errors import (
    EXIT_CODES,
    ConfigError,
    DataError,
    HubUnavailableError,
    NonFiniteError,
    RefusedFileError,
    SaveError,
    run_cli,
)
from capkit.evaluation import report
from dataset import PairDataset, load_flickr30k

DEMO_MODEL = ["--encoder_name=demo/clip-tiny", "--encoder_pretrained=None", "--lm_name=demo/qwen3-tiny",
              "--tokenizer_name=demo/qwen3-tiny", "--lm_dtype=float32", "--mapper_prefix_length=8",
              "--mapper_hidden_dim=512", "--device=cpu", "--log_with=None"]


@contextmanager
def no_hang(seconds=20):
    """Fail (instead of hanging the suite) if the block blocks, e.g. on a FIFO."""
    def boom(*_):
        raise TimeoutError(f"blocked for {seconds} s")
    old = signal.signal(signal.SIGALRM, boom)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def outcome(capsys, main, argv):
    """(exit code, stderr) of a script's main(); a traceback never counts as a clear error."""
    with no_hang(120):
        code = main(argv)
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return code, err


class _Evil:
    def __reduce__(self):
        return (os.system, (f"touch {os.environ['CAPKIT_MARKER']}",))


@pytest.fixture
def marker(tmp_path, monkeypatch):
    m = tmp_path / "PWNED"
    monkeypatch.setenv("CAPKIT_MARKER", str(m))
    return m


def captions_csv(folder: Path, rows, encoding="utf-8"):
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "captions.csv", "w", newline="", encoding=encoding) as f:
        csv.writer(f).writerows([["image", "caption"], *rows])
    return folder / "captions.csv"


def small_folder(tmp_path):
    """Flags for a 4-image folder dataset on the demo backbones (nothing to generate, loads in a second)."""
    write_split(tmp_path / "small", 4, 9)
    return ["--preset=demo", "--dataset=folder", f"--data_dir={tmp_path / 'small'}"]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """An (untrained) prefix checkpoint on the demo backbones + its metadata naming a small folder dataset."""
    from capkit.models.captioner import CaptionerConfig
    from model import build_model
    root = tmp_path_factory.mktemp("hostile_ckpt")
    write_split(root / "data", 6, 5)
    torch.manual_seed(0)
    model = build_model(CaptionerConfig(encoder_name="demo/clip-tiny", encoder_pretrained=None, lm_name="demo/qwen3-tiny",
                                        lm_dtype="float32", mapper_prefix_length=8, mapper_hidden_dim=64))
    path = root / "model_state_dict_h-1.pth"
    model.save_checkpoint(path)
    hp = train.resolve_hparams(DEMO_MODEL + ["--dataset=folder", f"--data_dir={root / 'data'}", "--split_ratio=0.5"])
    (root / "training_metadata_h-1.json").write_text(json.dumps({"run_id": "h", "epoch": 1, "hyperparameters": hp}))
    return path


# ================================================================================================
# 1. configuration: range-checked before anything loads; output_dir checked up front

@pytest.mark.parametrize("flags, names", [
    (["--batch_size=0"], "batch_size"),
    (["--num_epochs=0"], "num_epochs"),
    (["--learning_rate=-0.001"], "learning_rate"),
    (["--eval_batch_size=-4"], "eval_batch_size"),
    (["--max_caption_length=1"], "max_caption_length"),
    (["--split_ratio=0"], "split_ratio"),
    (["--val_ratio=1.0"], "val_ratio"),
    (["--seed=-1"], "seed"),
    (["--mapper_prefix_length=100000"], "mapper_prefix_length"),
    (["--num_workers=-2"], "num_workers"),
    (["--dataset=imagenet"], "dataset"),
    (["--lm_dtype=fp8"], "lm_dtype"),
    (["--target_modules=[]"], "target_modules"),
    (["--target_modules=[1, 2]"], "target_modules"),
    (["--optimizer_args={'lr': 0.1}"], "optimizer_args"),
    (["--optimizer_args={'betas': (2.0, 0.9)}"], "optimizer_args"),
    (["--optimizer_args={'momentum': 0.9}"], "optimizer_args"),
    (["--optimizer_args={1: 2}"], "optimizer_args"),
    (["--scheduler_args={'bogus': 1}"], "scheduler_args"),
    (["--lr_scheduler=CosineAnnealingWarmRestarts", "--scheduler_args={'T_0': 0}"], "scheduler_args"),
    (["--device=tpu"], "device"),
    (["--device=cuda:7"], "device"),
    (["--training_name=../../etc"], "training_name"),
    (["--training_name=run*"], "training_name"),
])
def test_bad_hyperparameters_exit_2_naming_the_key(capsys, tmp_path, flags, names):
    if "cuda" in flags[0] and torch.cuda.device_count() > 7:
        pytest.skip("this machine has 8 GPUs")
    code, err = outcome(capsys, train.main, [f"--output_dir={tmp_path}"] + flags)
    assert code == 2 and err.startswith("error: ") and names in err
    assert not list(tmp_path.iterdir())  # refused before anything was written


def test_non_finite_numbers_from_a_toml_config_are_refused(capsys, tmp_path):
    (tmp_path / "c.toml").write_text("learning_rate = nan\n")
    code, err = outcome(capsys, train.main, ["--config", str(tmp_path / "c.toml")])
    assert code == 2 and "learning_rate" in err and "nan" in err


def test_cuda_on_a_machine_without_one_is_refused_up_front(capsys):
    if torch.cuda.is_available():
        pytest.skip("a GPU is visible here")
    code, err = outcome(capsys, train.main, DEMO_MODEL + ["--device=cuda"])
    assert code == 2 and "no CUDA GPU" in err and "device='cpu'" in err


@pytest.mark.parametrize("make_bad", ["file", "under_a_file"])
def test_unusable_output_dir_fails_before_any_loading(capsys, tmp_path, make_bad):
    (tmp_path / "taken").write_text("a file, not a folder")
    out = tmp_path / "taken" if make_bad == "file" else tmp_path / "taken" / "runs"
    # the default config (Flickr30K + hub models, offline here) would fail differently if anything loaded
    code, err = outcome(capsys, train.main, [f"--output_dir={out}"])
    assert code == 2 and "output_dir" in err and str(out) in err and "Hub" not in err
    assert (tmp_path / "taken").read_text() == "a file, not a folder"


@pytest.mark.parametrize("content, message", [(None, "is a folder"), (b"lr = 'caf\xe9'\n", "not UTF-8"),
                                              (b"learning_rate = \n", "not valid TOML")])
def test_bad_config_files_are_one_sentence(capsys, tmp_path, content, message):
    cfg = tmp_path / "cfg.toml"
    cfg.mkdir() if content is None else cfg.write_bytes(content)
    code, err = outcome(capsys, train.main, ["--config", str(cfg)])
    assert code == 2 and message in err and str(cfg) in err


# ================================================================================================
# 2. images: bombs, budgets, FIFOs, folders, links, files that change mid-run

def test_a_decompression_bomb_is_a_counted_skip(tmp_path):
    write_image(tmp_path / "good.png")
    bomb_png(tmp_path / "bomb.png")
    captions_csv(tmp_path, [["good.png", "fine"], ["bomb.png", "boom"]])
    skips = SkipLog()
    with no_hang():
        data = load_folder(tmp_path, skips)
    assert [p.name for p in data.images] == ["good.png"]
    assert skips.items == [(str(tmp_path / "bomb.png"), f"image too large: over {2 * 89478485:,} pixels")]


def test_images_over_the_pixel_budget_are_skipped_also_mid_run(tmp_path, monkeypatch):
    from capkit.data import images
    write_image(tmp_path / "wide.png", size=(400, 100))
    write_image(tmp_path / "small.png", size=(40, 30))
    monkeypatch.setattr(images, "MAX_IMAGE_PIXELS", 10_000)
    items = [ImageDataset([tmp_path / "wide.png", tmp_path / "small.png"], lambda im: torch.zeros(3))[i] for i in (0, 1)]
    batch = Collate()(items)
    assert batch["skipped"] == [(str(tmp_path / "wide.png"), "image too large: over 10,000 pixels")]
    assert batch["image_idx"].tolist() == [1]


@pytest.mark.parametrize("kind", ["fifo", "folder", "fifo_link", "device_link"])
def test_non_regular_files_named_like_images_are_skipped_without_blocking(tmp_path, kind):
    write_image(tmp_path / "good.jpg")
    odd = tmp_path / "odd.jpg"
    if kind == "fifo":
        os.mkfifo(odd)
    elif kind == "folder":
        odd.mkdir()
    elif kind == "fifo_link":
        os.mkfifo(tmp_path / "pipe")
        odd.symlink_to(tmp_path / "pipe")
    else:
        odd.symlink_to("/dev/zero")
    captions_csv(tmp_path, [["good.jpg", "fine"], ["odd.jpg", "odd"]])
    skips = SkipLog()
    with no_hang():
        data = load_folder(tmp_path, skips)
    assert [p.name for p in data.images] == ["good.jpg"]
    (path, reason), = skips.items
    assert path == str(odd)
    assert reason == {"fifo": "not a regular file: a FIFO (named pipe)", "folder": "not a regular file: a folder",
                      "fifo_link": "not a regular file: a FIFO (named pipe)",
                      "device_link": "outside dataset folder"}[kind]


def test_an_image_replaced_by_a_fifo_mid_run_is_reported_not_waited_on(tmp_path):
    write_image(tmp_path / "a.png")
    write_image(tmp_path / "b.png")
    data = load_folder(tmp_path, SkipLog())
    (tmp_path / "b.png").unlink()
    os.mkfifo(tmp_path / "b.png")
    with no_hang():
        batch = Collate()([PairDataset(data, lambda im: torch.zeros(3))[i] for i in range(2)])
    assert batch["skipped"] == [(str(tmp_path / "b.png"), "not a regular file: a FIFO (named pipe)")]


def test_symlink_loops_and_empty_files_are_counted_skips(tmp_path):
    write_image(tmp_path / "good.png")
    (tmp_path / "loop.png").symlink_to(tmp_path / "loop.png")
    (tmp_path / "empty.png").write_bytes(b"")
    captions_csv(tmp_path, [["good.png", "a"], ["loop.png", "b"], ["empty.png", "c"]])
    skips = SkipLog()
    load_folder(tmp_path, skips)
    assert skips.counts == {"unreadable path": 1, "unreadable image": 1}


def test_inference_reports_each_bad_input_and_captions_the_rest(ckpt, tmp_path, capsys):
    write_image(tmp_path / "good.png", size=(64, 64))
    os.mkfifo(tmp_path / "pipe.png")
    (tmp_path / "text.png").write_text("not an image")
    bomb_png(tmp_path / "bomb.png")
    args = ["--checkpoint", str(ckpt), "--max_new_tokens", "3", "--output", str(tmp_path / "out.json")]
    code, err = outcome(capsys, inference.main, args + [str(tmp_path / p) for p in
                                                         ("good.png", "pipe.png", "text.png", "bomb.png", "gone.png")])
    assert code == 0
    assert [r["image"] for r in json.loads((tmp_path / "out.json").read_text())] == [str(tmp_path / "good.png")]
    for name, why in (("pipe.png", "not a regular file"), ("text.png", "unreadable image"),
                      ("bomb.png", "image too large"), ("gone.png", "missing file")):
        assert f"skipped {tmp_path / name}: {why}" in err
    assert "1 captioned, 4 skipped" in err


def test_inference_exits_1_when_no_image_can_be_read(ckpt, tmp_path, capsys):
    (tmp_path / "a.jpg").write_text("text")
    code, err = outcome(capsys, inference.main, ["--checkpoint", str(ckpt), str(tmp_path / "a.jpg"),
                                                 str(tmp_path / "missing.jpg")])
    assert code == 1 and "not one image could be read" in err and "0 captioned, 2 skipped" in err


# ================================================================================================
# 3. captions files: encodings, oversized fields, folders, malformed rows

def test_a_non_utf8_captions_csv_names_the_file_the_line_and_the_fix(tmp_path, capsys):
    write_image(tmp_path / "a.png")
    captions_csv(tmp_path, [["a.png", "a dog"], ["a.png", "un café crème"]], encoding="cp1252")
    with pytest.raises(DataError, match=r"captions.csv is not UTF-8 text \(byte 0xe9 on line 3\).*iconv"):
        load_folder(tmp_path, SkipLog())
    code, err = outcome(capsys, train.main, ["--dataset=folder", f"--data_dir={tmp_path}", f"--output_dir={tmp_path / 'o'}"])
    assert code == 2 and "captions.csv is not UTF-8" in err


def test_utf16_captions_from_a_spreadsheet_are_detected(tmp_path):
    write_image(tmp_path / "a.png")
    captions_csv(tmp_path, [["a.png", "un café crème"]], encoding="utf-16")
    assert load_folder(tmp_path, SkipLog()).captions == [["un café crème"]]


def test_a_200k_character_caption_is_a_counted_skip(tmp_path):
    write_image(tmp_path / "a.png")
    captions_csv(tmp_path, [["a.png", "word " * 40_000], ["a.png", "a short caption"]])
    skips = SkipLog()
    assert load_folder(tmp_path, skips).captions == [["a short caption"]]
    assert skips.counts == {"caption too long": 1}


@pytest.mark.parametrize("what", ["folder", "fifo", "missing"])
def test_a_captions_file_that_is_not_a_file_is_one_sentence(tmp_path, capsys, what):
    write_image(tmp_path / "data" / "a.png")
    cf = tmp_path / "caps.csv"
    cf.mkdir() if what == "folder" else os.mkfifo(cf) if what == "fifo" else None
    code, err = outcome(capsys, train.main, ["--dataset=folder", f"--data_dir={tmp_path / 'data'}",
                                             f"--captions_file={cf}", f"--output_dir={tmp_path / 'o'}"])
    assert code == 2 and str(cf) in err
    assert {"folder": "is a folder", "fifo": "FIFO", "missing": "does not exist"}[what] in err


def test_nul_bytes_in_a_captions_file_are_refused_with_the_line(tmp_path):
    write_image(tmp_path / "a.png")
    (tmp_path / "captions.csv").write_bytes(b"image,caption\na.png,fine\na.png,bro\x00ken\n")
    with pytest.raises(DataError, match=r"NUL bytes on line 3"):
        load_folder(tmp_path, SkipLog())


def test_malformed_jsonl_rows_are_counted_skips_naming_the_line(tmp_path):
    write_image(tmp_path / "a.png")
    write_image(tmp_path / "b.png")
    lines = [{"file_name": "a.png", "text": "good"}, {"file_name": "a.png", "text": {"nested": "dict"}},
             {"file_name": "b.png", "text": ["fine", 7, None]}, [1, 2], {"file_name": None, "text": "x"}, "{cut"]
    (tmp_path / "metadata.jsonl").write_text("\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines))
    skips = SkipLog()
    data = load_folder(tmp_path, skips)
    assert data.captions == [["good"], ["fine"]]
    assert sorted(r.split(":")[0] for _, r in skips.items) == [
        "bad metadata line", "bad metadata line", "caption is not text", "caption is not text", "empty caption",
        "row without image name"]
    assert f"{tmp_path / 'metadata.jsonl'}:6" in [p for p, _ in skips.items]


def test_a_non_utf8_sidecar_caption_is_a_counted_skip(tmp_path):
    write_image(tmp_path / "a.png")
    write_image(tmp_path / "b.png")
    (tmp_path / "a.txt").write_text("a red square")
    (tmp_path / "b.txt").write_bytes("caf\xe9".encode("cp1252"))
    skips = SkipLog()
    assert load_folder(tmp_path, skips).captions == [["a red square"]]
    assert skips.counts == {"unreadable caption file": 1}


def test_flickr30k_files_of_the_wrong_shape_are_one_sentence(tmp_path):
    (tmp_path / "flickr30k-images").mkdir()
    (tmp_path / "flickr_annotations_30k.csv").write_text("name,text\nx.jpg,hello\n")
    with pytest.raises(DataError, match="not the Flickr30K annotations file"):
        load_flickr30k("train", SkipLog(), data_dir=tmp_path)
    (tmp_path / "flickr30k-images").rmdir()
    (tmp_path / "flickr30k-images.zip").write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(DataError, match="not a readable zip file"):
        load_flickr30k("train", SkipLog(), data_dir=tmp_path)


# ================================================================================================
# 4. checkpoints and model folders are data, never code

def evil_pickle(path, marker_env=True):
    torch.save({"format": "capkit.clip_mlp.v1", "model_config": {}, "state_dict": _Evil()}, path)
    return path


def assert_refused_without_advice(err):
    assert "weights_only=False" not in err and "weights_only` set to `False`" not in err


@pytest.mark.parametrize("script", [eval_mod, inference, load_model_example])
def test_a_malicious_pth_is_refused_by_every_script(tmp_path, capsys, marker, script):
    path = evil_pickle(tmp_path / "model_state_dict_x-1.pth")
    argv = {eval_mod: ["--checkpoint", str(path)], inference: ["--checkpoint", str(path), str(tmp_path)],
            load_model_example: [str(path)]}[script]
    code, err = outcome(capsys, script.main, argv)
    assert code == 4 and "refused checkpoint" in err and "posix.system" in err and str(path) in err
    assert_refused_without_advice(err)
    assert not marker.exists()


def test_a_malicious_train_state_is_refused_on_resume(tmp_path, capsys, marker):
    meta = tmp_path / "training_metadata_r-1.json"
    meta.write_text(json.dumps({"run_id": "r", "hyperparameters": {}}))
    torch.save({"format": 1, "optimizer": _Evil()}, tmp_path / "train_state_r-1.pt")
    code, err = outcome(capsys, train.main, ["--resume", str(meta)])
    assert code == 4 and "train_state_r-1.pt" in err and "would run code" in err
    assert_refused_without_advice(err)
    assert not marker.exists()


def test_a_pickle_inside_a_model_folder_and_a_clip_weights_file_are_refused(tmp_path, capsys, marker):
    lm = tmp_path / "lm"
    shutil.copytree(REPO / "demo" / "qwen3-tiny", lm)
    torch.save({"w": _Evil()}, lm / "pytorch_model.bin")
    folder = small_folder(tmp_path)
    code, err = outcome(capsys, train.main, folder + [f"--lm_name={lm}", f"--output_dir={tmp_path / 'o'}"])
    assert code == 4 and "pytorch_model.bin" in err and "would run code" in err
    evil_clip = tmp_path / "ViT-B-32.pt"
    torch.save({"state_dict": _Evil()}, evil_clip)
    code, err = outcome(capsys, train.main, folder + ["--encoder_name=ViT-B-32",
                                             f"--encoder_pretrained={evil_clip}", f"--output_dir={tmp_path / 'o'}"])
    assert code == 4 and "CLIP weights file" in err and str(evil_clip) in err
    assert_refused_without_advice(err)
    assert not marker.exists()


@pytest.mark.parametrize("damage", ["truncated", "empty", "fifo", "missing", "wrong_shapes", "huge_prefix",
                                    "not_capkit"])
def test_damaged_checkpoints_name_the_file(ckpt, tmp_path, capsys, damage):
    path = tmp_path / "model_state_dict_d-1.pth"
    raw = ckpt.read_bytes()
    good = torch.load(ckpt, weights_only=True)
    if damage == "truncated":
        path.write_bytes(raw[: len(raw) // 2])
    elif damage == "empty":
        path.write_bytes(b"")
    elif damage == "fifo":
        os.mkfifo(path)
    elif damage == "wrong_shapes":
        torch.save({**good, "state_dict": {k: v[:1] for k, v in good["state_dict"].items()}}, path)
    elif damage == "huge_prefix":
        torch.save({**good, "model_config": {**good["model_config"], "mapper_prefix_length": 10**9}}, path)
    elif damage == "not_capkit":
        torch.save({"weights": torch.zeros(3)}, path)
    code, err = outcome(capsys, eval_mod.main, ["--checkpoint", str(path)])
    assert code == 4 and str(path) in err
    assert {"truncated": "damaged", "empty": "damaged", "fifo": "FIFO", "missing": "does not exist",
            "wrong_shapes": "don't fit", "huge_prefix": "mapper_prefix_length", "not_capkit": "not a capkit"}[damage] in err


@pytest.mark.parametrize("key, value, words", [("lm_name", "/etc", "not a decoder folder"),
                                               ("encoder_pretrained", "/etc/passwd", "not a PyTorch file")])
@pytest.mark.parametrize("script", ["eval", "inference", "load_model_example", "serve"])
def test_a_checkpoint_config_naming_a_system_path_is_refused_by_every_script(ckpt, tmp_path, capsys, key, value,
                                                                              words, script):
    """A .pth whose config points a backbone at /etc or /etc/passwd: exit 4, one paragraph naming the key and
    the path, in every script that loads a checkpoint and in serve.py's start-up."""
    import serve
    good = torch.load(ckpt, weights_only=True)
    extra = {"encoder_name": "ViT-B-32"} if key == "encoder_pretrained" else {}  # (an open_clip name + weights)
    path = tmp_path / "model_state_dict_s-1.pth"
    torch.save({**good, "model_config": {**good["model_config"], key: value, **extra}}, path)
    main, argv = {"eval": (eval_mod.main, ["--checkpoint", str(path)]),
                  "inference": (inference.main, ["--checkpoint", str(path), str(tmp_path)]),
                  "load_model_example": (load_model_example.main, [str(path)]),
                  "serve": (serve.main, ["--checkpoint", str(path), "--port", "0"])}[script]
    code, err = outcome(capsys, main, argv)
    assert code == 4 and key in err and value in err and words in err, err
    assert len(err.strip().splitlines()) <= 2, err      # one paragraph (and perhaps the "exit" line)


@pytest.mark.parametrize("content", [b'{"run_id": "h", "hyperpa', b"\xff\xfe garbage", b"[1, 2, 3]"])
def test_a_damaged_metadata_json_beside_a_checkpoint_is_named(ckpt, tmp_path, capsys, content):
    shutil.copy(ckpt, tmp_path / ckpt.name)
    meta = tmp_path / "training_metadata_h-1.json"
    meta.write_bytes(content)
    code, err = outcome(capsys, eval_mod.main, ["--checkpoint", str(tmp_path / ckpt.name)])
    assert code == 4 and str(meta) in err


def test_a_truncated_train_state_is_named_on_resume(tmp_path, capsys):
    meta = tmp_path / "training_metadata_r-1.json"
    meta.write_text(json.dumps({"run_id": "r", "hyperparameters": {}}))
    torch.save({"format": 1, "x": torch.zeros(100)}, tmp_path / "train_state_r-1.pt")
    raw = (tmp_path / "train_state_r-1.pt").read_bytes()
    (tmp_path / "train_state_r-1.pt").write_bytes(raw[:200])
    code, err = outcome(capsys, train.main, ["--resume", str(meta)])
    assert code == 4 and "train_state_r-1.pt is damaged" in err and "earlier checkpoint" in err


EVIL_PY = "import os\nopen(os.environ['CAPKIT_MARKER'], 'w').write('code ran')\n"


@pytest.fixture(scope="module")
def code_folders(tmp_path_factory):
    """A decoder folder, a GIT adapter folder and a merged GIT folder, each asking for custom code (auto_map)
    that would create $CAPKIT_MARKER; plus a .pth whose config names that decoder folder."""
    from transformers import AutoTokenizer

    from capkit.models.captioner import CaptionerConfig
    from capkit.models.hf_captioner import merge_adapter
    from model import build_model
    from tools.demo_assets import HF_DIRS, tiny_hf
    root = tmp_path_factory.mktemp("code_folders")
    lm = root / "lm"
    shutil.copytree(REPO / "demo" / "qwen3-tiny", lm)
    base = root / "git_base"
    model, processor = tiny_hf("git", hidden=32, layers=2, vision_layers=1, seed=1,
                               tok=AutoTokenizer.from_pretrained(HF_DIRS["git"]))
    model.save_pretrained(base)
    processor.save_pretrained(base)
    adapter = root / "adapter_evil-1"
    build_model(CaptionerConfig(model_type="git", hf_model_name=str(base), quantization_bits=16,
                                lm_dtype="float32")).save_checkpoint(adapter)
    merged = merge_adapter(adapter)
    for folder, cfg_file, key in ((lm, "config.json", "AutoModelForCausalLM"),
                                  (adapter, "processor_config.json", "AutoProcessor"),
                                  (merged, "config.json", "AutoModelForCausalLM")):
        cfg = json.loads((folder / cfg_file).read_text()) if (folder / cfg_file).exists() else {}
        cfg["auto_map"] = {key: "evil.Evil", "AutoConfig": "evil.EvilConfig"}
        (folder / cfg_file).write_text(json.dumps(cfg))
        (folder / "evil.py").write_text(EVIL_PY)
    clip_ckpt = root / "model_state_dict_evil-1.pth"
    torch.manual_seed(0)
    m = build_model(CaptionerConfig(encoder_name="demo/clip-tiny", encoder_pretrained=None, lm_name="demo/qwen3-tiny",
                                    lm_dtype="float32", mapper_prefix_length=2, mapper_hidden_dim=16))
    m.config.lm_name = m.config.lm_tokenizer_name = str(lm)
    m.save_checkpoint(clip_ckpt)
    return {"model folder": clip_ckpt, "adapter folder": adapter, "merged folder": merged}


@pytest.mark.parametrize("stdin", ["closed", "y"])
def test_folders_asking_for_custom_code_are_refused_even_with_y_on_stdin(code_folders, tmp_path, stdin):
    marker = tmp_path / "PWNED"
    script = ("import sys, load_model_example as l\n"
              "codes = [l.main([p]) for p in sys.argv[1:]]\n"
              "sys.exit(4 if codes == [4, 4, 4] else 99)")
    env = {**os.environ, "CAPKIT_MARKER": str(marker), "HF_HUB_OFFLINE": "1"}
    p = subprocess.run([sys.executable, "-c", script, *map(str, code_folders.values())], cwd=REPO, env=env,
                       input=b"y\ny\ny\ny\ny\ny\n" if stdin == "y" else None,
                       stdin=subprocess.DEVNULL if stdin == "closed" else None, capture_output=True, timeout=300)
    err = p.stderr.decode()
    assert p.returncode == 4, err[-3000:]
    assert "Traceback" not in err and "[y/N]" not in p.stdout.decode() + err
    assert err.count("asks to run Python code") == 3  # each folder refused, in one sentence
    for what, path in code_folders.items():
        assert str(path if what != "model folder" else code_folders["model folder"].parent / "lm") in err
    assert not marker.exists()


def test_a_model_folder_config_with_wrong_types_is_refused(code_folders, tmp_path, capsys):
    bad = tmp_path / "adapter_bad-1"
    shutil.copytree(code_folders["adapter folder"], bad)
    (bad / "processor_config.json").write_text("{}")
    cfg = json.loads((bad / "capkit_config.json").read_text())
    cfg["model_config"]["lora_r"] = "sixteen"
    (bad / "capkit_config.json").write_text(json.dumps(cfg))
    code, err = outcome(capsys, eval_mod.main, ["--checkpoint", str(bad)])
    assert code == 4 and "lora_r" in err and "capkit_config.json" in err


# ================================================================================================
# 5. nothing outside the run folder is deleted or overwritten

@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("small_run")
    write_split(root / "train", 16, 1)
    write_split(root / "val", 2, 2)
    argv = ["--preset=demo", "--dataset=folder", f"--train_dir={root / 'train'}", f"--val_dir={root / 'val'}",
            "--num_epochs=1", "--batch_size=8", "--training_size_limit=16", "--test_evaluation_enabled=False",
            "--evaluation_enabled=False", f"--feature_cache_dir={root / 'cache'}", "--log_with=None",
            "--save_every_n_steps=1"]
    return root, argv


def test_resume_with_the_same_flags_and_edited_metadata_never_deletes_outside_files(small_run, tmp_path, capsys):
    root, argv = small_run
    out = tmp_path / "out"
    assert train.main(argv + [f"--output_dir={out}"]) == 0
    metas = sorted(out.glob("training_metadata_*.json"), key=lambda m: m.stat().st_mtime)
    assert len(metas) == 2  # after step 1, and at the end of the epoch (step 2)
    victims = [tmp_path / "victim.pth", tmp_path / "victim_dir"]
    victims[0].write_text("precious")
    victims[1].mkdir()
    (victims[1] / "keep.txt").write_text("precious")
    old, mtime = json.loads(metas[0].read_text()), metas[0].stat().st_mtime
    old.update(checkpoint=str(victims[0]), train_state=f"../{victims[1].name}")  # an absolute and a relative escape
    metas[0].write_text(json.dumps(old))
    os.utime(metas[0], (mtime, mtime))  # still the older one: --resume takes the newest, the end of epoch 1
    capsys.readouterr()
    # the user re-runs the interrupted command with --resume appended (plus two safe changes)
    code, err = outcome(capsys, train.main, argv + [f"--output_dir={out}", "--num_epochs=2", "--keep_last_n=1",
                                                    "--resume"])
    assert code == 0, err
    assert victims[0].read_text() == "precious" and (victims[1] / "keep.txt").read_text() == "precious"
    assert len(list(out.glob("training_metadata_*.json"))) == 1 and len(list(out.glob("train_state_*.pt"))) == 1
    assert len(list(out.glob("model_state_dict_*.pth"))) == 1
    # a change that alters the model is refused by name, with the same command otherwise
    code, err = outcome(capsys, train.main, argv + [f"--output_dir={out}", "--mapper_hidden_dim=64", "--resume"])
    assert code == 2 and "mapper_hidden_dim" in err


def test_a_run_id_that_would_leave_the_folder_is_refused(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    meta = run / "training_metadata_x-1.json"
    meta.write_text(json.dumps({"run_id": "../../outside/x", "hyperparameters": {}}))
    torch.save({"format": 1}, run / "train_state_x-1.pt")
    code, err = outcome(capsys, train.main, ["--resume", str(meta)])
    assert code == 4 and "run_id" in err and "not a plain name" in err
    assert not (tmp_path.parent / "outside").exists()


def test_prune_removes_only_the_files_named_after_the_metadata(tmp_path):
    from capkit.training.resume import prune_checkpoints
    run, victim = tmp_path / "run", tmp_path / "victim.txt"
    run.mkdir()
    victim.write_text("precious")
    for i, name in enumerate(("training_metadata_r-1.json", "training_metadata_r-2.json")):
        (run / name).write_text(json.dumps({"checkpoint": str(victim), "train_state": "../victim.txt"}))
        os.utime(run / name, (i, i))
    (run / "train_state_r-1.pt").write_text("x")
    (run / "model_state_dict_r-1.pth").symlink_to(victim)  # a link goes, never what it points to
    prune_checkpoints(run, "r", 1, log=lambda *_: None)
    assert victim.read_text() == "precious"
    assert sorted(p.name for p in run.iterdir()) == ["training_metadata_r-2.json"]
    with pytest.raises(RefusedFileError):
        prune_checkpoints(run, "r*", 1)


def test_merge_never_replaces_a_folder_capkit_did_not_write(code_folders, tmp_path, capsys):
    adapter = tmp_path / "adapter_m-1"
    shutil.copytree(code_folders["adapter folder"], adapter)
    (adapter / "evil.py").unlink()  # this copy is a clean adapter
    cfg = json.loads((adapter / "processor_config.json").read_text())
    cfg.pop("auto_map")
    (adapter / "processor_config.json").write_text(json.dumps(cfg))
    home = tmp_path / "home"
    home.mkdir()
    (home / "thesis.tex").write_text("precious")
    code, err = outcome(capsys, train.main, ["--merge_weights", "--checkpoint", str(adapter), "--merged_dir", str(home)])
    assert code == 2 and "not a capkit model folder" in err
    assert (home / "thesis.tex").read_text() == "precious"


def test_the_demo_preset_never_writes_its_dataset_over_a_users_folder(tmp_path, capsys):
    photos = tmp_path / "my_photos"
    captions_csv(photos, [["me.jpg", "my own caption"]])
    before = (photos / "captions.csv").read_bytes()
    # a tired user: the demo preset (dataset="shapes") with their own data_dir
    code, err = outcome(capsys, train.main, ["--preset=demo", f"--data_dir={photos}", f"--output_dir={tmp_path / 'o'}"])
    assert code == 2 and "--dataset=folder" in err and str(photos) in err
    assert (photos / "captions.csv").read_bytes() == before and sorted(p.name for p in photos.iterdir()) == ["captions.csv"]
    from capkit.data.shapes import SPLITS, _only_shapes
    write_split(tmp_path / "partial" / "train", 2, 1)  # a demo dataset whose writing was interrupted: still its own
    assert _only_shapes(tmp_path / "partial", SPLITS) and not _only_shapes(photos, SPLITS)


# ================================================================================================
# 6. everything written to HTML is escaped

def test_every_field_of_a_hostile_predictions_file_is_escaped(tmp_path, capsys):
    img = write_image(tmp_path / 'a"onerror="alert(1).png', size=(64, 64))
    evil = "<script>alert('x')</script>"
    preds = {"checkpoint": evil, "split": evil, "loss": 1.5, "rouge_l": evil,
             "caption_metrics": {evil: evil, "CIDEr": 0.5},
             "predictions": [{"image": str(img), "caption": evil, "references": [evil, "<b>bold</b>"],
                              "rouge_l": '0"><img src=x onerror=alert(2)>', "clip_score": evil},
                             {"image": "/dev/zero", "caption": "x", "references": []}]}
    (tmp_path / "p.json").write_text(json.dumps(preds))
    code, err = outcome(capsys, report.main, [str(tmp_path / "p.json"), str(tmp_path / "r")])
    assert code == 0
    page = (tmp_path / "r" / "index.html").read_text()
    assert "<script>alert" not in page and "<img src=x" not in page and "<b>bold" not in page
    assert 'onerror="alert(1)' not in page
    import re
    values = re.findall(r'data-v="([^"]*)"', page)
    assert values and all(re.fullmatch(r"NaN|-?\d+(\.\d+)?(e-?\d+)?", v) for v in values)  # numbers only
    assert page.count("&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt;") >= 5
    assert 'data-v="NaN"' in page and "unreadable: /dev/zero" in page


@pytest.mark.parametrize("content, message", [
    ({"predictions": [{"image": "a.png"}]}, "row 0 needs 'image' and 'caption'"),
    ({"predictions": [{"image": "a.png", "caption": "x", "references": "not a list"}]}, "references"),
    ({"predictions": "nope"}, "must be a list"),
    ([1, 2], "not an eval.py predictions file"),
    (None, "does not exist"),
])
def test_malformed_report_inputs_are_one_sentence(tmp_path, capsys, content, message):
    p = tmp_path / "p.json"
    if content is not None:
        p.write_text(json.dumps(content))
    code, err = outcome(capsys, report.main, [str(p), str(tmp_path / "r")])
    assert code == 2 and message in err


# ================================================================================================
# 7. small and odd datasets

def test_ten_images_train_with_their_skips_listed_exactly_as_counted(tmp_path, capsys):
    data = tmp_path / "ten"
    write_split(data, 10, 7)
    (data / "notes.png").write_text("not an image")
    os.mkfifo(data / "pipe.png")
    with open(data / "captions.csv", "a", newline="") as f:
        csv.writer(f).writerows([["notes.png", "a note"], ["pipe.png", "a pipe"], ["", "no image"]])
    out = tmp_path / "out"
    argv = DEMO_MODEL + ["--dataset=folder", f"--data_dir={data}", "--batch_size=4", "--test_evaluation_enabled=True",
                         f"--output_dir={out}", "--feature_cache_dir=None"]
    code, err = outcome(capsys, train.main, argv)
    assert code == 0, err
    (meta_path,) = out.glob("training_metadata_*.json")
    meta = json.loads(meta_path.read_text())
    assert isinstance(meta["val_loss"], float) and meta["test"]["num_images"] == 1  # 8 train, 1 val, 1 test
    (tsv,) = out.glob("skipped_inputs_*.tsv")
    rows = [ln.split("\t") for ln in tsv.read_text().splitlines()]
    assert len(rows) == sum(meta["skipped_inputs"].values()) == 3
    assert meta["skipped_inputs"] == {"unreadable image": 1, "not a regular file": 1, "row without image name": 1}


def test_a_one_image_folder_trains_and_says_which_splits_are_skipped(tmp_path, capsys):
    data = tmp_path / "one"
    write_split(data, 1, 7)
    out = tmp_path / "out"
    argv = DEMO_MODEL + ["--dataset=folder", f"--data_dir={data}", "--test_evaluation_enabled=True",
                         f"--output_dir={out}", "--feature_cache_dir=None"]
    with no_hang(300):
        assert train.main(argv) == 0
    printed = capsys.readouterr().out
    assert "the val split has no images" in printed and "the test split has no images" in printed
    (meta_path,) = out.glob("training_metadata_*.json")
    meta = json.loads(meta_path.read_text())
    assert meta["val_loss"] is None and "test" not in meta and meta["history"][0]["train_loss"] > 0


def test_a_folder_whose_images_are_all_unreadable_is_one_sentence(tmp_path, capsys):
    for i in range(3):
        (tmp_path / f"x{i}.jpg").write_text("text")
    code, err = outcome(capsys, train.main, ["--preset=demo", "--dataset=folder", f"--data_dir={tmp_path}",
                                             f"--output_dir={tmp_path / 'o'}"])
    assert code == 2 and "the train split has no usable images" in err and "3 unreadable image" in err


def test_empty_or_unreadable_splits_score_none_not_zero(tiny_model):
    from capkit.data.folders import CaptionSet
    from capkit.evaluation.evaluator import evaluate
    res = evaluate(tiny_model, CaptionSet([Path("/nonexistent/a.png")], [["a"]]), skips=SkipLog())
    assert res == {"num_images": 0, "loss": None, "rouge_l": None, "predictions": []}
    assert evaluate(tiny_model, CaptionSet([], []), generate=False) == {"num_images": 0, "loss": None}


# ================================================================================================
# 8. one exit path: documented codes, one paragraph, tracebacks only for bugs

@pytest.mark.parametrize("exc, code", [(ConfigError("c"), 2), (DataError("d"), 2), (SaveError("s"), 3),
                                       (NonFiniteError("n"), 3), (RefusedFileError("r"), 4),
                                       (HubUnavailableError("h"), 5), (KeyboardInterrupt(), 130),
                                       (OSError(28, "No space left on device", "/data/x.pt"), 3)])
def test_each_expected_failure_has_its_documented_exit_code(capsys, exc, code):
    def main(argv):
        raise exc
    assert run_cli(main, []) == code and code in EXIT_CODES
    err = capsys.readouterr().err
    assert err.count("\n") <= 2 and "Traceback" not in err
    if isinstance(exc, OSError):
        assert "disk is full" in err and "/data/x.pt" in err


def test_a_genuine_bug_keeps_its_traceback():
    def main(argv):
        return {}["missing"]
    with pytest.raises(KeyError):
        run_cli(main, [])


def test_a_disk_that_fills_up_mid_epoch_stops_with_exit_3(tmp_path, capsys, monkeypatch):
    from datetime import datetime

    class Frozen(datetime):
        @classmethod
        def now(cls, tz=None):
            return datetime(2026, 1, 1)
    monkeypatch.setattr(train, "datetime", Frozen)
    out = tmp_path / "out"
    out.mkdir()
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    (out / "train_log_20260101_000000.jsonl").symlink_to(victim)  # planted: appending must not follow it
    code, err = outcome(capsys, train.main, small_folder(tmp_path) + [f"--output_dir={out}", "--log_with=None"])
    assert code == 3 and "train_log_20260101_000000.jsonl" in err and "last complete checkpoint is none" in err
    assert victim.read_text() == "precious"

    def full(path, line):
        raise OSError(28, "No space left on device", str(path))
    monkeypatch.setattr(train, "append_line", full)
    code, err = outcome(capsys, train.main, small_folder(tmp_path) + [f"--output_dir={tmp_path / 'o2'}",
                                                                      "--log_with=None"])
    assert code == 3 and "No space left on device" in err and "last complete checkpoint is none" in err


def test_offline_hub_models_exit_5(tmp_path, capsys):
    code, err = outcome(capsys, train.main, small_folder(tmp_path) + ["--lm_name=Qwen/Qwen3-0.6B-Base",
                                                                      f"--output_dir={tmp_path / 'o'}"])
    assert code == 5 and "Hub is unreachable" in err and "lm_name" in err


@pytest.mark.parametrize("script, argv, message", [
    (eval_mod, ["--checkpoint", "x.pth", "--batch_size", "0"], "must be >= 1"),
    (eval_mod, ["--checkpoint", "x.pth", "--num_beams", "many"], "not an integer"),
    (inference, ["--checkpoint", "x.pth", "--top_p", "2", "a.png"], "top_p"),
    (inference, ["--checkpoint", "x.pth", "--temperature", "0", "a.png"], "temperature"),
    (inference, ["--checkpoint", "x.pth", "--top_k", "-1", "a.png"], "top_k"),
])
def test_bad_script_flags_are_usage_errors(capsys, script, argv, message):
    with pytest.raises(SystemExit) as e:
        script.main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and message in err and "Traceback" not in err


def test_eval_and_inference_refuse_a_folder_as_output_and_an_absent_device(ckpt, tmp_path, capsys):
    code, err = outcome(capsys, eval_mod.main, ["--checkpoint", str(ckpt), "--output", str(tmp_path)])
    assert code == 2 and "is a folder" in err
    code, err = outcome(capsys, inference.main, ["--checkpoint", str(ckpt), "--device", "quantum", str(tmp_path)])
    assert code == 2 and "'quantum' is not a device name" in err
    code, err = outcome(capsys, load_model_example.main, [str(tmp_path / "nothing.pth")])
    assert code == 4 and "does not exist" in err
    code, err = outcome(capsys, inference.main, ["--checkpoint", str(ckpt), "--output", str(tmp_path / "no/x.jsonl"),
                                                 str(tmp_path)])
    assert code == 2 and "does not exist" in err and "no/x.jsonl" in err
    alone = tmp_path / "alone"
    alone.mkdir()
    shutil.copy(ckpt, alone / ckpt.name)  # no training metadata beside it: eval can't know the data
    code, err = outcome(capsys, eval_mod.main, ["--checkpoint", str(alone / ckpt.name)])
    assert code == 2 and "--dataset" in err


def test_predictions_in_pycocoevalcap_form_are_accepted(tmp_path, capsys):
    (tmp_path / "r.json").write_text(json.dumps({"1": ["a red circle", "a circle"], "2": ["a blue star"]}))
    (tmp_path / "p.json").write_text(json.dumps({"1": ["a red circle"], "2": ["a blue star"]}))
    code, err = outcome(capsys, eval_mod.main, ["--references", str(tmp_path / "r.json"),
                                                "--predictions", str(tmp_path / "p.json")])
    assert code == 0
    (tmp_path / "p.json").write_text(json.dumps({"1": ["two", "captions"], "2": ["a blue star"]}))
    code, err = outcome(capsys, eval_mod.main, ["--references", str(tmp_path / "r.json"),
                                                "--predictions", str(tmp_path / "p.json")])
    assert code == 2 and "'1' must be one caption" in err and "p.json" in err


# ================================================================================================
# found by a second pair of eyes: more of the same families

@pytest.mark.parametrize("flags, names", [
    (["--lr_scheduler=StepLR", "--scheduler_args={'step_size': 0}"], "scheduler_args"),
    (["--lr_scheduler=OneCycleLR", "--scheduler_args={'div_factor': 0}"], "scheduler_args"),
    (["--lr_scheduler=StepLR", "--scheduler_args={'last_epoch': 5}"], "scheduler_args"),
    (["--optimizer_args={'betas': [0.9]}"], "optimizer_args"),
    (["--num_epochs=1" + "0" * 400], "num_epochs"),
    (["--seed=1" + "0" * 400], "seed"),
    (["--output_dir="], "output_dir"),
])
def test_more_bad_hyperparameters_exit_2(capsys, flags, names):
    code, err = outcome(capsys, train.main, flags)
    assert code == 2 and names in err


def test_names_too_long_for_the_file_system(tmp_path, capsys, ckpt):
    long = tmp_path / ("x" * 300)
    code, err = outcome(capsys, train.main, [f"--output_dir={long}"])
    assert code == 2 and "output_dir" in err
    code, err = outcome(capsys, eval_mod.main, ["--checkpoint", f"{long}.pth"])
    assert code in (2, 4) and "x" * 300 in err
    write_image(tmp_path / "good.png")
    captions_csv(tmp_path, [["good.png", "fine"], ["y" * 300 + ".png", "too long a name"]])
    skips = SkipLog()
    assert len(load_folder(tmp_path, skips).images) == 1 and skips.counts == {"unreadable path": 1}
    code, err = outcome(capsys, inference.main, ["--checkpoint", str(ckpt), "--max_new_tokens", "2",
                                                 str(tmp_path / "good.png"), f"{long}.png"])
    assert code == 0 and "unreadable path" in err and "1 captioned, 1 skipped" in err


@pytest.mark.parametrize("arg", ["--resume=", "--resume=/"])
def test_an_empty_resume_path_is_one_sentence(capsys, arg):
    code, err = outcome(capsys, train.main, [arg])
    assert code == 2 and "--resume" in err


@pytest.mark.parametrize("field, value", [("rng", {}), ("batches_done", "0"), ("trainable", 5), ("history", 7),
                                          ("data_order", [1, 2]), ("data_order", torch.zeros(1, 5, dtype=torch.uint8))])
def test_an_edited_training_state_is_refused_before_loading(small_run, tmp_path, capsys, field, value):
    root, argv = small_run
    out = tmp_path / "out"
    if not out.exists():
        assert train.main(argv + [f"--output_dir={out}", "--save_every_n_steps=None"]) == 0
    (state,) = out.glob("train_state_*.pt")
    st = torch.load(state, weights_only=True)
    torch.save({**st, field: value}, state)
    code, err = outcome(capsys, train.main, ["--resume", f"--output_dir={out}", "--num_epochs=2"])
    assert code == 4 and field in err and state.name in err


@pytest.mark.parametrize("payload", ['{"predictions": [1' + "0" * 5000 + "]}", "[" * 200_000 + "]" * 200_000])
def test_json_with_absurd_numbers_or_nesting_is_one_sentence(tmp_path, capsys, payload):
    (tmp_path / "p.json").write_text(payload)
    code, err = outcome(capsys, report.main, [str(tmp_path / "p.json"), str(tmp_path / "r")])
    assert code == 2 and "can't be read as JSON" in err
    (tmp_path / "metadata.jsonl").write_text(payload + "\n" + json.dumps({"file_name": "a.png", "text": "ok"}))
    write_image(tmp_path / "a.png")
    skips = SkipLog()
    assert load_folder(tmp_path, skips).captions == [["ok"]] and skips.counts == {"bad metadata line": 1}


@pytest.mark.parametrize("refs, preds, message", [
    ({}, {}, "empty"), ({"1": ["a"], "2": ["b"]}, {"1": "a"}, "same images"), ({"1": []}, {"1": "a"}, "non-empty"),
    ({"1": ["a dog"]}, {"1": ""}, "nothing to score"), ({"2": ["x"]}, [{"image_id": 2.0, "caption": "x"}], "same images"),
])
def test_odd_reference_and_prediction_files_are_one_sentence_and_never_hang(tmp_path, capsys, refs, preds, message):
    (tmp_path / "r.json").write_text(json.dumps(refs))
    (tmp_path / "p.json").write_text(json.dumps(preds))
    code, err = outcome(capsys, eval_mod.main, ["--references", str(tmp_path / "r.json"),
                                                "--predictions", str(tmp_path / "p.json")])
    assert code == 2 and message in err


def test_odd_text_in_captions_and_file_names_is_skipped_and_listed_one_per_line(tmp_path):
    write_image(tmp_path / "a.png")
    bad = os.fsdecode(b"bad\xe9\tname\n.png")  # not UTF-8, with a tab and a newline
    (tmp_path / bad).write_text("not an image")
    lines = [{"file_name": "a.png", "text": "a \ud800 circle"}, {"file_name": "a.png", "text": "a circle"},
             {"file_name": bad, "text": "x"}]
    (tmp_path / "metadata.jsonl").write_text("\n".join(json.dumps(x) for x in lines))
    skips = SkipLog()
    assert load_folder(tmp_path, skips).captions == [["a circle"]]
    assert skips.counts == {"caption is not valid text": 1, "unreadable image": 1}
    skips.write(tmp_path / "skipped.tsv")
    assert len((tmp_path / "skipped.tsv").read_text().splitlines()) == 2


def test_report_never_writes_through_links_and_says_when_it_cant(tmp_path, capsys, ckpt):
    img = write_image(tmp_path / "a.png", size=(64, 64))
    (tmp_path / "p.json").write_text(json.dumps({"predictions": [{"image": str(img), "caption": "x"}]}))
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    (tmp_path / "r" / "thumbs").mkdir(parents=True)
    (tmp_path / "r" / "index.html").symlink_to(victim)
    (tmp_path / "r" / "thumbs" / "00000.jpg").symlink_to(victim)
    assert outcome(capsys, report.main, [str(tmp_path / "p.json"), str(tmp_path / "r")])[0] == 0
    assert victim.read_text() == "precious" and "<table" in (tmp_path / "r" / "index.html").read_text()
    (tmp_path / "r2").mkdir()
    (tmp_path / "r2" / "thumbs").write_text("a file where the thumbs folder goes")
    code, err = outcome(capsys, report.main, [str(tmp_path / "p.json"), str(tmp_path / "r2")])
    assert code == 2 and "thumbs can't be created" in err
    code, err = outcome(capsys, eval_mod.main, ["--checkpoint", str(ckpt), "--report", str(victim)])
    assert code == 2 and "can't be created" in err and victim.read_text() == "precious"


@pytest.mark.parametrize("argv, message", [(["--seed", str(2**70)], "seed"), (["--do_sample", "--temperature", "1e-300"],
                                                                              "temperature"),
                                           (["--num_beams", "1000000"], "num_beams")])
def test_sampling_flags_that_would_crash_decoding_are_usage_errors(capsys, argv, message):
    with pytest.raises(SystemExit) as e:
        inference.main(["--checkpoint", "x.pth", "a.png", *argv])
    assert e.value.code == 2 and message in capsys.readouterr().err


# ================================================================================================
# session 10: a negative learning rate by the back door, longer captions than the decoder has positions
# for, and file names that would split an output line

@pytest.mark.parametrize("flags", [
    ["--lr_scheduler=CosineAnnealingLR", "--scheduler_args={'eta_min': -1e-4}"],
    ["--lr_scheduler=StepLR", "--scheduler_args={'gamma': -0.5}"],
    ["--lr_scheduler=CyclicLR", "--warmup_steps=0", "--scheduler_args={'base_lr': [-1e-4]}"],
])
def test_scheduler_args_that_would_make_the_learning_rate_negative_are_refused(capsys, tmp_path, flags):
    # torch builds each of these schedulers without a word and then steps the learning rate below 0
    code, err = outcome(capsys, train.main, [f"--output_dir={tmp_path}"] + flags)
    assert code == 2 and "scheduler_args" in err and "below 0" in err
    assert not list(tmp_path.iterdir())


def test_a_zero_floor_for_the_learning_rate_is_still_accepted():
    hp = train.resolve_hparams(["--lr_scheduler=CosineAnnealingLR", "--scheduler_args={'eta_min': 0}"])
    assert hp["scheduler_args"] == {"eta_min": 0}


def test_max_new_tokens_beyond_the_decoders_positions_is_refused_before_any_work(ckpt, tmp_path, capsys):
    # demo/qwen3-tiny has 256 positions and the checkpoint's prefix takes 8: captions of 248 tokens at most
    write_image(tmp_path / "a.png")
    code, err = outcome(capsys, inference.main, ["--checkpoint", str(ckpt), "--max_new_tokens", "249",
                                                 str(tmp_path / "a.png")])
    assert code == 2 and "max_new_tokens=249" in err and "at most 248 tokens" in err and "captioned" not in err
    code, err = outcome(capsys, eval_mod.main, ["--checkpoint", str(ckpt), "--max_new_tokens", "249"])
    assert code == 2 and "at most 248 tokens" in err
    assert outcome(capsys, inference.main, ["--checkpoint", str(ckpt), "--max_new_tokens", "248",
                                            str(tmp_path / "a.png")])[0] == 0
    out = tmp_path / "run"
    code, err = outcome(capsys, train.main, DEMO_MODEL + ["--dataset=folder", f"--data_dir={ckpt.parent / 'data'}",
                                                          "--max_new_tokens=1000", f"--output_dir={out}"])
    assert code == 2 and "max_new_tokens=1000" in err and not list(out.glob("*.pth"))


def test_tabs_and_line_breaks_in_file_names_keep_one_output_line_per_image(ckpt, tmp_path, capsys):
    names = ["tab\there.png", "line\nbreak.png", "plain.png"]
    for n in names:
        write_image(tmp_path / n)
    jsonl = tmp_path / "caps.jsonl"
    code = inference.main(["--checkpoint", str(ckpt), "--max_new_tokens", "3", "--output", str(jsonl),
                           *[str(tmp_path / n) for n in names]])
    out = capsys.readouterr().out
    assert code == 0
    rows = [line.split("\t") for line in out.splitlines()]
    assert len(rows) == 3 and all(len(r) == 2 for r in rows)
    assert sorted(r[0].rsplit("/", 1)[-1] for r in rows) == ["line\\nbreak.png", "plain.png", "tab\\there.png"]
    exact = {json.loads(x)["image"] for x in jsonl.read_text().splitlines()}
    assert exact == {str(tmp_path / n) for n in names}  # --output keeps the names exactly


def test_inference_shows_its_progress_over_every_image_and_keeps_stdout_for_the_captions(ckpt, tmp_path, capsys):
    paths = [write_image(tmp_path / f"{i}.png", color=(40 * i, 20, 200)) for i in range(5)]
    (tmp_path / "broken.png").write_bytes(b"not an image")                 # a skip counts as done too
    code = inference.main(["--checkpoint", str(ckpt), "--max_new_tokens", "3", "--batch_size", "2",
                           *map(str, paths), str(tmp_path / "broken.png")])
    captured = capsys.readouterr()
    assert code == 0 and len(captured.out.splitlines()) == 5
    assert all(len(line.split("\t")) == 2 for line in captured.out.splitlines())   # no bar in the captions
    assert "Captioning: 100%" in captured.err and "6/6" in captured.err
