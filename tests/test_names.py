"""The names capkit used before (capkit/names.py) still read everywhere a user or a file gives them: train.py's
dict, a preset, a TOML file, --KEY=VALUE, a model config, a checkpoint's weights, a run's metadata, --resume. A saved
run's key this version doesn't know is refused, not defaulted."""
import json

import pytest
import torch
from conftest import REPO, copy_run_before_the_grouping

import train
from capkit.checkpoints import read_metadata
from capkit.errors import ConfigError, RefusedFileError
from capkit.models.captioner import CaptionerConfig
from capkit.names import RENAMED_KEYS, current_names, current_weights

OLD_HPARAMS = {"clip_model_name": "demo/clip-tiny", "clip_pretrained": None, "clip_features": "tokens",
               "proj_type": "transformer", "proj_prefix_length": 4, "proj_hidden_dim": 32, "proj_dropout": 0.1,
               "proj_num_layers": 1, "proj_num_heads": 4}


def test_every_old_hyperparameter_name_is_in_the_table_and_names_a_key_of_today():
    assert set(OLD_HPARAMS) <= set(RENAMED_KEYS)
    assert {RENAMED_KEYS[k] for k in OLD_HPARAMS} <= set(train.hyperparameters)
    assert not set(RENAMED_KEYS) & set(train.hyperparameters)           # the old names are gone from the dict
    config_fields = set(CaptionerConfig.__dataclass_fields__)
    assert set(RENAMED_KEYS.values()) <= config_fields | set(train.hyperparameters)


def new(hp_old: dict) -> dict:
    return {RENAMED_KEYS[k]: v for k, v in hp_old.items()}


def test_old_names_on_the_command_line_read_as_todays_and_are_said_once(capsys):
    argv = [f"--{k}={'None' if v is None else v}" for k, v in OLD_HPARAMS.items()]
    hp = train.resolve_hparams(argv)
    assert {k: hp[k] for k in new(OLD_HPARAMS)} == new(OLD_HPARAMS)
    out = capsys.readouterr().out
    assert out.count("--proj_type is mapper_type") == 1 and "--clip_model_name is encoder_name" in out


def test_old_names_in_a_toml_file_a_preset_and_the_dict_read_as_todays(tmp_path, monkeypatch, capsys):
    toml = tmp_path / "run.toml"
    toml.write_text("proj_type = 'resampler'\nclip_features = 'tokens'\nproj_num_heads = 2\n")
    hp = train.resolve_hparams([f"--config={toml}"])
    assert (hp["mapper_type"], hp["encoder_features"], hp["mapper_num_heads"]) == ("resampler", "tokens", 2)
    monkeypatch.setitem(train.PRESETS, "mine", {"proj_hidden_dim": 64, "clip_model_name": "demo/clip-tiny"})
    hp = train.resolve_hparams(["--preset=mine"])
    assert hp["mapper_hidden_dim"] == 64 and hp["encoder_name"] == "demo/clip-tiny"
    edited = {k: v for k, v in train.hyperparameters.items() if k != "mapper_prefix_length"}
    monkeypatch.setattr(train, "hyperparameters", {**edited, "proj_prefix_length": 3})  # a dict edited with an old name
    assert train.resolve_hparams([])["mapper_prefix_length"] == 3
    assert "train.py's hyperparameters: proj_prefix_length is mapper_prefix_length" in capsys.readouterr().out


def test_a_file_giving_a_key_under_both_names_with_different_values_is_refused(tmp_path):
    toml = tmp_path / "both.toml"
    toml.write_text("proj_type = 'mlp'\nmapper_type = 'resampler'\n")
    with pytest.raises(ConfigError, match="mapper_type twice, under two names, with different values"):
        train.resolve_hparams([f"--config={toml}"])
    with pytest.raises(ValueError, match="both proj_type='mlp' and mapper_type='linear'"):
        CaptionerConfig.from_dict({"proj_type": "mlp", "mapper_type": "linear"})
    assert current_names({"proj_type": "mlp", "mapper_type": "mlp"})[0] == {"mapper_type": "mlp"}  # agreeing: fine


def test_a_model_config_and_weights_with_old_names_read_as_todays():
    cfg = CaptionerConfig.from_dict({"model_type": "clip_mlp", "clip_embed_dim": 128, "clip_token_dim": 64,
                                     "clip_image_size": 96, "clip_normalize": False, "proj_type": "linear"})
    assert (cfg.model_type, cfg.encoder_embed_dim, cfg.encoder_token_dim, cfg.encoder_image_size,
            cfg.encoder_normalize, cfg.mapper_type) == ("prefix", 128, 64, 96, False, "linear")
    w = torch.zeros(2)
    assert current_weights({"projector.net.0.weight": w, "other.projector.x": w}) == \
        {"mapper.net.0.weight": w, "other.projector.x": w}


def test_a_saved_runs_metadata_reads_with_todays_names(tmp_path):
    meta = read_metadata(copy_run_before_the_grouping(tmp_path))
    assert meta["hyperparameters"]["mapper_type"] == "transformer" and "proj_type" not in meta["hyperparameters"]
    assert meta["model_config"]["encoder_token_dim"] == 128 and "clip_token_dim" not in meta["model_config"]


def test_resume_repeating_the_runs_command_with_its_old_names_is_accepted(tmp_path, monkeypatch):
    copy_run_before_the_grouping(tmp_path)
    monkeypatch.chdir(tmp_path)
    hp, _ = train.resolve_resume(["--resume", "--output_dir=run", "--proj_type=transformer", "--proj_num_heads=4",
                                  "--clip_features=tokens"])
    assert (hp["mapper_type"], hp["mapper_num_heads"], hp["encoder_features"]) == ("transformer", 4, "tokens")
    with pytest.raises(ConfigError, match="can't change mapper_num_heads"):
        train.resolve_resume(["--resume", "--output_dir=run", "--proj_num_heads=2"])


def test_resume_refuses_a_saved_key_this_version_does_not_know(tmp_path, monkeypatch):
    meta_path = copy_run_before_the_grouping(tmp_path)
    meta = json.loads(meta_path.read_text())
    meta["hyperparameters"]["encoder_pooling"] = "gem"  # a key from another capkit that would shape the model
    meta_path.write_text(json.dumps(meta))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match="doesn't know: encoder_pooling.*resume it with the capkit version"):
        train.resolve_resume(["--resume", "--output_dir=run"])
    meta["hyperparameters"]["mapper_type"] = "mlp"  # both names (it holds proj_type="transformer"), different values: which one is meant?
    del meta["hyperparameters"]["encoder_pooling"]
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(RefusedFileError, match="both"):
        read_metadata(meta_path)


def test_resume_accepts_the_old_model_type_value_from_flags_and_toml(tmp_path, monkeypatch):
    copy_run_before_the_grouping(tmp_path)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "old.toml").write_text('model_type = "clip_mlp"\nproj_type = "transformer"\n')
    for extra in (["--model_type=clip_mlp"], ["--config=old.toml"]):
        hp, _ = train.resolve_resume(["--resume", "--output_dir=run", *extra])
        assert hp["model_type"] == "prefix"


def test_python_code_written_for_the_old_names_still_runs(tmp_path):
    from capkit.training.config import model_config_from_hparams
    from model import ClipCaptioner, PrefixCaptioner, load_captioner
    assert ClipCaptioner is PrefixCaptioner
    assert model_config_from_hparams({**train.hyperparameters, "clip_model_name": "demo/clip-tiny",
                                      "encoder_name": "demo/clip-tiny"}).encoder_name == "demo/clip-tiny"
    hp = {k: v for k, v in train.hyperparameters.items() if k != "encoder_name"}
    assert model_config_from_hparams({**hp, "clip_model_name": "demo/clip-tiny"}).encoder_name == "demo/clip-tiny"
    meta = copy_run_before_the_grouping(tmp_path)
    pth = next(meta.parent.glob("model_state_dict_*.pth"))
    model = load_captioner(pth, clip_model_name=str(REPO / "demo" / "clip-tiny"))  # an override by its old name
    assert model.config.encoder_name.endswith("clip-tiny") and model.projector is model.mapper


def test_old_names_of_fields_that_were_never_hyperparameters_are_not_offered_on_the_command_line(capsys):
    for flag in ("--clip_image_size=224", "--clip_normalize=false", "--no-clip_normalize"):
        with pytest.raises(ConfigError) as e:
            train.resolve_hparams([flag])
        assert "unknown hyperparameter '" in str(e.value) and "clip_" in str(e.value).splitlines()[0]
        assert "encoder_normalize" not in str(e.value)
        assert "encoder_image_size" not in str(e.value)


def test_an_unused_preset_with_old_names_says_nothing(monkeypatch, capsys):
    monkeypatch.setitem(train.PRESETS, "mine", {"proj_hidden_dim": 64})
    train.resolve_hparams(["--preset=demo"])
    assert "proj_hidden_dim" not in capsys.readouterr().out


def test_an_adapter_folders_config_of_the_old_format_reads_with_todays_names(tmp_path):
    from capkit.checkpoints import read_folder_config
    (tmp_path / "capkit_config.json").write_text(json.dumps(
        {"format": "capkit.hf.v1", "model_config": {"model_type": "git", "clip_image_size": 96}}))
    assert read_folder_config(tmp_path) == {"model_type": "git", "encoder_image_size": 96}
    (tmp_path / "capkit_config.json").write_text(json.dumps({"format": "capkit.hf.v9", "model_config": {}}))
    with pytest.raises(RefusedFileError, match="capkit.hf.v2 expected"):
        read_folder_config(tmp_path)
