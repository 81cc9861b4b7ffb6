"""The captioner itself: shapes, masking, freezing, generation, checkpoints."""
import os
import pickle

import pytest
import torch
import torch.nn.functional as F
from conftest import MAPPERS, REPO, as_generation_sees, make_model, save_backbones

from capkit.checkpoints import read_checkpoint
from capkit.models.captioner import CaptionerConfig
from capkit.models.decoders import tokenize_captions
from capkit.models.mappers import MAPPER_INPUTS, build_mapper
from model import PrefixCaptioner, load_captioner


@pytest.fixture(params=list(MAPPERS))
def tiny_model(request):
    """Every test below that takes tiny_model runs once per mapper."""
    return make_model(**MAPPERS[request.param])


def batch(model, captions, B=None):
    tok = tokenize_captions(model.tokenizer, captions, 32)
    pixels = torch.randn(len(captions), 3, 32, 32, generator=torch.Generator().manual_seed(1))
    return tok["input_ids"], tok["attention_mask"], pixels


def test_mapper_dims_come_from_backbones(tiny_model):
    cfg = tiny_model.config
    assert (cfg.encoder_embed_dim, cfg.lm_hidden_size) == (32, 32)
    feats = tiny_model.encode_images(torch.randn(5, 3, 32, 32))
    # pooled: the CLIP embedding (5, E); tokens: ViT-32px/16 -> 2 x 2 patch tokens of width 32
    assert feats.shape == ((5, 32) if cfg.encoder_features == "pooled" else (5, 4, 32))
    assert cfg.encoder_token_dim == (32 if cfg.encoder_features == "tokens" else None)
    out = tiny_model.prefix_embeds(feats)
    assert out.shape == (5, cfg.mapper_prefix_length, 32)
    # each image's prefix depends on that image only (no mixing across the batch, e.g. by a wrong batch_first)
    alone = tiny_model.prefix_embeds(feats[2:3])
    assert torch.allclose(out[2:3], alone, atol=1e-5)


def test_build_mapper_types():
    cfg = CaptionerConfig(encoder_embed_dim=8, lm_hidden_size=4, mapper_prefix_length=3, mapper_hidden_dim=16,
                          mapper_num_layers=1, mapper_num_heads=2)
    assert build_mapper(cfg)(torch.randn(2, 8)).shape == (2, 12)
    cfg.mapper_type = "linear"
    assert isinstance(build_mapper(cfg), torch.nn.Linear)
    cfg.mapper_type = "transformer"
    assert build_mapper(cfg)(torch.randn(2, 8)).shape == (2, 3, 4)
    cfg.encoder_features, cfg.encoder_token_dim = "tokens", 6
    assert build_mapper(cfg)(torch.randn(2, 7, 6)).shape == (2, 3, 4)
    cfg.mapper_type = "resampler"
    assert build_mapper(cfg)(torch.randn(2, 5, 6)).shape == (2, 3, 4)   # any number of tokens
    cfg.mapper_num_heads = 3
    from capkit.errors import ConfigError
    with pytest.raises(ConfigError, match="must divide"):   # one sentence and exit 2 from train.py, not a traceback
        build_mapper(cfg)
    cfg.mapper_type = "perceiver"
    with pytest.raises(ValueError, match="unknown mapper_type"):
        build_mapper(cfg)


@pytest.mark.parametrize("mapper_type", list(MAPPER_INPUTS))
def test_each_mapper_takes_only_its_features(mapper_type):
    for features in ("pooled", "tokens"):
        if features in MAPPER_INPUTS[mapper_type]:
            CaptionerConfig(mapper_type=mapper_type, encoder_features=features)
        else:
            with pytest.raises(ValueError, match="takes encoder_features"):
                CaptionerConfig(mapper_type=mapper_type, encoder_features=features)


def test_tokens_need_a_vit_encoder():
    """A ResNet CLIP has no patch tokens: said when the model is built, naming the setting."""
    import open_clip
    from conftest import make_backbones

    from capkit.errors import ConfigError
    _, lm, tok, _ = make_backbones()
    resnet = open_clip.CLIP(embed_dim=32, vision_cfg={"image_size": 32, "layers": [1, 1, 1, 1], "width": 16},
                            text_cfg={"context_length": 8, "vocab_size": 64, "width": 32, "heads": 2, "layers": 1})
    cfg = CaptionerConfig(encoder_name="RN-tiny", lm_name="tiny", mapper_type="resampler", encoder_features="tokens")
    with pytest.raises(ConfigError, match="needs a ViT image encoder.*encoder_features='pooled'"):
        PrefixCaptioner(cfg, resnet.visual, lm, tok)


def test_forward_shapes_and_loss_matches_manual_ce(tiny_model):
    ids, mask, px = batch(tiny_model, ["a red dog", "the big blue ball sits on snow"])
    logits, loss = tiny_model(ids, mask, pixel_values=px)
    assert logits.shape == (2, ids.shape[1], len(tiny_model.tokenizer))
    assert mask[0].sum() < mask.shape[1]  # the short caption is padded
    keep = mask.bool()                    # caption tokens + EOS, no padding, no prefix
    manual = F.cross_entropy(logits[keep], ids[keep])
    assert torch.allclose(loss, manual, atol=1e-6)
    # EOS is a target: the last real position of each caption is the EOS id
    eos = tiny_model.tokenizer.eos_token_id
    assert all(ids[i, mask[i].sum() - 1] == eos for i in range(2))


def test_padding_is_ignored(tiny_model):
    ids, mask, px = batch(tiny_model, ["a red dog", "the big blue ball sits on snow"])
    _, loss = tiny_model(ids, mask, pixel_values=px)
    garbage = ids.clone()
    garbage[mask == 0] = 7  # whatever sits in padded positions must not matter
    _, loss2 = tiny_model(garbage, mask, pixel_values=px)
    assert torch.equal(loss, loss2)
    # and the short caption alone gives the same logits as inside the padded batch
    ids1, mask1, _ = batch(tiny_model, ["a red dog"])
    l1, _ = tiny_model(ids1, mask1, pixel_values=px[:1])
    lb, _ = tiny_model(ids, mask, pixel_values=px)
    n = int(mask1.sum())
    assert torch.allclose(l1[0, :n], lb[0, :n], atol=1e-5)


def test_padding_to_a_multiple_keeps_the_loss(tiny_model):
    """compile=True pads captions to a multiple of 8 (static shapes): same loss, same real-position logits."""
    from capkit.data.batching import Collate, pad_to_multiple
    ids, mask, px = batch(tiny_model, ["a red dog", "the big blue ball sits on snow"])
    pad = tiny_model.tokenizer.pad_token_id
    padded = pad_to_multiple({"input_ids": ids, "attention_mask": mask}, 16, pad)
    T = ids.shape[1]
    assert padded["input_ids"].shape[1] == -(-T // 16) * 16 > T
    assert (padded["attention_mask"][:, T:] == 0).all() and (padded["input_ids"][:, T:] == pad).all()
    lg, loss = tiny_model(ids, mask, pixel_values=px)
    lg8, loss8 = tiny_model(padded["input_ids"], padded["attention_mask"], pixel_values=px)
    assert torch.allclose(loss, loss8, atol=1e-6)
    assert torch.allclose(lg, lg8[:, :T], atol=1e-5)
    assert pad_to_multiple(padded, 16, pad) is padded  # already a multiple: untouched
    out = Collate(tiny_model.tokenize, 32, pad_to_multiple_of=8, pad_id=pad)(
        [{"image_idx": 0, "caption": "a red dog"}, {"image_idx": 1, "caption": "the big blue ball"}])
    assert out["input_ids"].shape[1] % 8 == 0


def test_prefix_positions_carry_no_label(tiny_model):
    """Changing the image changes the logits (the prefix is used) but the loss is only over caption tokens."""
    ids, mask, px = batch(tiny_model, ["a red dog"])
    logits_a, _ = tiny_model(ids, mask, pixel_values=px)
    logits_b, _ = tiny_model(ids, mask, pixel_values=px + 1.0)
    assert not torch.allclose(logits_a, logits_b)
    assert logits_a.shape[1] == ids.shape[1]  # no logits for the P prefix positions


def test_only_the_mapper_trains_and_backbones_stay_bit_identical(tiny_model):
    before = {k: v.clone() for k, v in tiny_model.state_dict().items() if not k.startswith("mapper.")}
    proj_before = {k: v.clone() for k, v in tiny_model.mapper.state_dict().items()}
    trainable = [n for n, p in tiny_model.named_parameters() if p.requires_grad]
    assert trainable and all(n.startswith("mapper.") for n in trainable)
    opt = torch.optim.AdamW([p for p in tiny_model.parameters() if p.requires_grad], lr=1e-2)
    tiny_model.train()
    assert not tiny_model.image_encoder.training and not tiny_model.lm.training
    ids, mask, px = batch(tiny_model, ["a red dog", "the cat sits in grass"])
    for _ in range(3):
        _, loss = tiny_model(ids, mask, pixel_values=px)
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = tiny_model.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in before.items())
    assert any(not torch.equal(v, tiny_model.mapper.state_dict()[k]) for k, v in proj_before.items())


def test_greedy_generation_equals_teacher_forced_argmax(tiny_model):
    torch.manual_seed(3)
    for p in tiny_model.mapper.parameters():  # a non-trivial prefix
        p.data.normal_(0, 0.5)
    px = torch.randn(3, 3, 32, 32)
    gen = tiny_model.generate_ids(pixel_values=px, max_new_tokens=8)
    eos = tiny_model.tokenizer.eos_token_id
    mask = torch.ones_like(gen)
    for i in range(len(gen)):  # tokens after the first EOS are padding
        hit = (gen[i] == eos).nonzero()
        if len(hit):
            mask[i, hit[0, 0] + 1:] = 0
    logits, _ = tiny_model(gen, mask, pixel_values=px)
    argmax = as_generation_sees(logits, tiny_model.tokenizer).argmax(-1)  # (the first step: no EOS, no blank)
    assert torch.equal(argmax[mask.bool()], gen[mask.bool()])


@pytest.mark.parametrize("beams", [1, 3])
def test_generation_stops_after_the_step_at_which_stop_turns_true(tiny_model, beams):
    """serve.py's `stop` (every client of a batch gone): decoding ends after the step under way; a stop that
    never fires changes nothing."""
    for p in tiny_model.mapper.parameters():  # a non-trivial prefix: no early EOS
        p.data.normal_(0, 0.5)
    px = torch.randn(2, 3, 32, 32)
    full = tiny_model.generate_ids(pixel_values=px, max_new_tokens=12, num_beams=beams)
    asked = []

    def after_three():
        asked.append(1)
        return len(asked) >= 3
    assert torch.equal(tiny_model.generate_ids(pixel_values=px, max_new_tokens=12, num_beams=beams,
                                               stop=lambda: False), full)
    cut = tiny_model.generate_ids(pixel_values=px, max_new_tokens=12, num_beams=beams, stop=after_three)
    assert full.shape[1] == 12 and cut.shape[1] == 3 and len(asked) == 3


def test_a_decoder_that_would_end_at_once_still_writes_words(tiny_model):
    """A frozen LM whose likeliest first tokens are EOS and a line break (as SmolLM2's were) gives no empty
    caption: those are ruled out at the first step, greedy, beams and sampling alike."""
    tok, lm = tiny_model.tokenizer, tiny_model.lm
    newline = tok("\n", add_special_tokens=False)["input_ids"][0]
    with torch.no_grad():  # rig the output layer: EOS first, then the line break, by a wide margin
        head = lm.get_output_embeddings()
        head.weight[tok.eos_token_id] = lm.model.norm.weight.sign() * 50
        head.weight[newline] = lm.model.norm.weight.sign() * 40
    px = torch.randn(4, 3, 32, 32)
    ids = tiny_model.generate_ids(pixel_values=px, max_new_tokens=6)
    assert (ids[:, 0] != tok.eos_token_id).all() and (ids[:, 0] != newline).all()
    for kw in ({}, {"num_beams": 3}, {"do_sample": True, "seed": 1}):
        caps = tiny_model.generate(pixel_values=px, max_new_tokens=6, **kw)
        assert all(c.strip() for c in caps), (kw, caps)


def test_sampling_really_samples_and_a_seed_repeats_it(tiny_model):
    """Each option must take effect: if do_sample or the seed were dropped on the way to generate(), two seeds at
    a high temperature would agree with each other and with greedy decoding."""
    px = torch.randn(2, 3, 32, 32)
    beams = tiny_model.generate(pixel_values=px, max_new_tokens=5, num_beams=3)
    assert len(beams) == 2 and all(isinstance(c, str) and c.strip() for c in beams)
    greedy = tiny_model.generate(pixel_values=px, max_new_tokens=6)
    hot = [tiny_model.generate(pixel_values=px, max_new_tokens=6, do_sample=True, temperature=5.0, seed=s)
           for s in (1, 2, 1)]
    assert hot[0] == hot[2]                       # the seed repeats a draw
    assert hot[0] != hot[1] and greedy not in hot  # and different seeds draw differently from greedy


@pytest.mark.parametrize("mapper", list(MAPPERS))
def test_checkpoint_round_trip_identical_logits(tmp_path, mapper):
    cdir, ldir = save_backbones(tmp_path)
    cfg = CaptionerConfig(encoder_name=str(cdir), encoder_pretrained=None, lm_name=str(ldir),
                          mapper_prefix_length=3, mapper_hidden_dim=64, lm_dtype="float32", **MAPPERS[mapper])
    model = PrefixCaptioner.from_config(cfg)
    torch.manual_seed(0)
    for p in model.mapper.parameters():
        p.data.normal_(0, 0.2)
    ids, mask, px = batch(model, ["a red dog", "the cat sits"])
    ref, _ = model(ids, mask, pixel_values=px)
    path = tmp_path / "model_state_dict_x-1.pth"
    model.save_checkpoint(path)
    ckpt = read_checkpoint(path)
    assert set(ckpt["state_dict"]) == {f"mapper.{k}" for k in model.mapper.state_dict()}  # only the mapper
    loaded = load_captioner(path)
    assert type(loaded.mapper) is type(model.mapper) and loaded.config == model.config
    out, _ = loaded(ids, mask, pixel_values=px)
    assert torch.equal(ref, out)
    assert torch.equal(model.generate_ids(pixel_values=px, max_new_tokens=5),
                       loaded.generate_ids(pixel_values=px, max_new_tokens=5))


class _Evil:
    def __reduce__(self):
        return (os.system, (f"touch {os.environ['CAPKIT_PWNED']}",))


def test_malicious_pickle_is_refused(tmp_path, monkeypatch):
    from model import load_checkpoint
    marker = tmp_path / "pwned"
    monkeypatch.setenv("CAPKIT_PWNED", str(marker))
    path = tmp_path / "model_state_dict_evil-1.pth"
    with open(path, "wb") as f:
        pickle.dump({"format": "capkit.clip_mlp.v1", "model_config": {}, "state_dict": _Evil()}, f)
    torch.save({"format": "capkit.clip_mlp.v1", "model_config": {}, "state_dict": _Evil()}, tmp_path / "evil2.pth")
    for p in (path, tmp_path / "evil2.pth"):
        with pytest.raises(ValueError, match="weights_only"):
            load_checkpoint(p)
    assert not marker.exists()


def test_offline_hub_id_fails_fast_with_clear_message():
    import time

    from capkit.errors import HubUnavailableError
    t = time.time()
    with pytest.raises(HubUnavailableError) as e:
        PrefixCaptioner.from_config(CaptionerConfig(lm_name="Qwen/does-not-exist-capkit", lm_tokenizer_name=None))
    msg = str(e.value)
    assert time.time() - t < 15
    assert "encoder_pretrained" in msg and "lm_name" in msg and "unreachable" in msg


def test_batched_kv_cache_generation_equals_one_at_a_time_without_cache(tiny_model):
    """Batched decoding with the KV cache gives exactly the captions of a naive loop: one image at a
    time, the whole sequence re-run through the decoder for every new token."""
    torch.manual_seed(4)
    for p in tiny_model.mapper.parameters():
        p.data.normal_(0, 0.5)
    px = torch.randn(6, 3, 32, 32)
    batched = tiny_model.generate_ids(pixel_values=px, max_new_tokens=10)
    eos = tiny_model.tokenizer.eos_token_id
    emb = tiny_model.lm.get_input_embeddings()
    for i in range(len(px)):
        seq = tiny_model.prefix_embeds(tiny_model.encode_images(px[i:i + 1]))   # (1, P, H)
        naive = []
        with torch.no_grad():
            for _ in range(10):
                nxt = int(tiny_model.lm(inputs_embeds=seq, use_cache=False).logits[0, -1].argmax())
                naive.append(nxt)
                if nxt == eos:
                    break
                seq = torch.cat([seq, emb(torch.tensor([[nxt]]))], dim=1)
        assert batched[i, :len(naive)].tolist() == naive
        assert tiny_model.generate_ids(pixel_values=px[i:i + 1], max_new_tokens=10)[0, :len(naive)].tolist() == naive


def test_lm_dtype_auto_follows_the_device_the_decoder_runs_on(monkeypatch, tmp_path):
    """On a machine with a bf16 GPU, `--device cpu` must not load the decoder in bf16 (a CPU bf16 step without
    AMX takes minutes): "auto" is resolved for the run's device, not for whether a GPU exists."""
    from capkit.models.decoders import resolve_dtype
    from model import build_model
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert resolve_dtype("auto", "cpu") == resolve_dtype("auto", torch.device("cpu")) == torch.float32
    assert resolve_dtype("auto", "cuda") == resolve_dtype("auto", "cuda:1") == torch.bfloat16
    assert resolve_dtype("auto") == torch.bfloat16          # no device named: the GPU if there is one
    assert resolve_dtype("bfloat16", "cpu") == torch.bfloat16  # an explicit choice is kept
    clip_dir, lm_dir = save_backbones(tmp_path)
    cfg = CaptionerConfig(encoder_name=str(clip_dir), encoder_pretrained=None, lm_name=str(lm_dir),
                          mapper_prefix_length=3, mapper_hidden_dim=64, lm_dtype="auto")
    model = build_model(cfg, "cpu")
    assert next(model.lm.parameters()).dtype == torch.float32
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_dtype("auto") == torch.float32


def assert_as_saved(model, data, images_dir):
    """The captions, logits and loss a checkpoint gave when it was written (data/expected*.json, .safetensors), to
    float rounding: another CPU's kernels round differently (2.9e-6 at most on an Intel Xeon, against the AMD EPYC
    that wrote them; a wrongly mapped weight moves them by whole units)."""
    import json

    from safetensors.torch import load_file

    from capkit.data.images import load_rgb
    expected = json.loads((data / "expected.json").read_text())
    px = torch.stack([model.preprocess(load_rgb(images_dir / n)) for n in expected["images"]])
    assert model.generate(pixel_values=px, max_new_tokens=20) == expected["captions"]
    enc = model.tokenize(["a small red circle on a white background"] * len(px), 32)
    with torch.no_grad():
        logits, loss = model(enc["input_ids"], enc["attention_mask"], pixel_values=px)
    torch.testing.assert_close(logits, load_file(data / "expected_logits.safetensors")["logits"], rtol=1e-5, atol=1e-5)
    assert loss.item() == pytest.approx(expected["loss"], rel=1e-6)


def test_a_checkpoint_written_before_the_package_move_loads_with_identical_logits_and_captions():
    """tests/data/checkpoint_before_the_move: a demo-backbone checkpoint written by capkit as of 2026-12-03 (flat
    layout, model_type "clip_mlp", format capkit.clip_mlp.v1), with the logits and greedy captions that code gave
    for four rendered shapes. Today's code must load it as a "prefix" model and give the same."""
    from model import load_checkpoint
    data = REPO / "tests" / "data" / "checkpoint_before_the_move"
    (pth,) = data.glob("model_state_dict_*.pth")
    assert read_checkpoint(pth)["format"] == "capkit.clip_mlp.v1"
    model, meta, hp = load_checkpoint(pth)
    assert model.config.model_type == "prefix" and hp["model_type"] == "prefix"  # metadata read with today's names
    assert_as_saved(model, data, data / "images")


def test_a_checkpoint_written_before_the_grouping_loads_with_identical_logits_and_captions(tmp_path):
    """tests/data/run_before_the_grouping (see test_resume): its step-7 checkpoint, written by capkit as of 406ec5b
    (format capkit.prefix.v1: the old key names clip_*, proj_* and weights projector.*) with a transformer mapper,
    with the logits and greedy captions that code gave for the four validation images (write_split(val, 4, seed 2)).
    Today's code must give the same."""
    from capkit.data.shapes import write_split
    from model import load_checkpoint
    data = REPO / "tests" / "data" / "run_before_the_grouping"
    write_split(tmp_path / "val", 4, 2)
    (pth,) = data.glob("model_state_dict_*.pth")
    assert read_checkpoint(pth)["format"] == "capkit.prefix.v1"
    model, meta, hp = load_checkpoint(pth)
    assert model.config.mapper_type == "transformer" and hp["mapper_num_heads"] == 4
    assert_as_saved(model, data, tmp_path / "val")
