"""LoRA on the prefix model's frozen decoder (lm_lora_r > 0): the base weights stay bit-identical, the adapters learn
with the mapper, go into the checkpoint and back, and merge into the decoder to the same logits (tiny backbones)."""
import pytest
import torch
from conftest import make_model, save_backbones

from capkit.checkpoints import read_checkpoint
from capkit.errors import ConfigError, RefusedFileError
from capkit.models.captioner import CaptionerConfig
from capkit.models.decoders import is_lora, tokenize_captions
from model import PrefixCaptioner, load_captioner, merge_decoder_lora

CAPTIONS = ["a red dog runs on grass", "the small cat sits in snow", "a big blue ball", "the green dog"]


def batch(model):
    tok = tokenize_captions(model.tokenizer, CAPTIONS, 32)
    pixels = torch.randn(len(CAPTIONS), 3, 32, 32, generator=torch.Generator().manual_seed(1))
    return tok["input_ids"], tok["attention_mask"], pixels


def lora_model(tmp_path=None, r=4, **kw):
    if tmp_path is None:
        return make_model(lm_lora_r=r, lora_alpha=8, lora_dropout=0.0, **kw)
    cdir, ldir = save_backbones(tmp_path)
    cfg = CaptionerConfig(encoder_name=str(cdir), encoder_pretrained=None, lm_name=str(ldir), mapper_prefix_length=3,
                          mapper_hidden_dim=64, lm_dtype="float32", lm_lora_r=r, lora_alpha=8, lora_dropout=0.0, **kw)
    return PrefixCaptioner.from_config(cfg)


def train_steps(model, steps=30, lr=0.01):
    ids, mask, px = batch(model)
    opt = torch.optim.AdamW(model.trainable_parameters(), lr=lr)
    model.train()
    losses = []
    for _ in range(steps):
        _, loss = model(ids, mask, pixel_values=px)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return model.eval(), losses


def test_adapters_start_as_the_frozen_decoder_and_only_they_and_the_mapper_train():
    plain, lora = make_model(), lora_model()
    ids, mask, px = batch(plain)
    assert torch.equal(plain(ids, mask, pixel_values=px)[0], lora(ids, mask, pixel_values=px)[0])  # lora_B = 0
    names = [n for n, p in lora.named_parameters() if p.requires_grad]
    assert names and all(n.startswith("mapper.") or is_lora(n) for n in names)
    adapters = [n for n in names if is_lora(n)]
    assert len(adapters) == 2 * 2 * 4  # 2 layers x q, k, v, o x (A, B)
    assert len(lora.trainable_parameters()) == len(names)


def test_base_weights_stay_bit_identical_while_the_adapters_lower_the_loss():
    model = lora_model()
    base = {n: p.detach().clone() for n, p in model.lm.named_parameters() if not is_lora(n)}
    encoder = {n: p.detach().clone() for n, p in model.image_encoder.named_parameters()}
    adapters = {n: p.detach().clone() for n, p in model.lm.named_parameters() if is_lora(n)}
    model, losses = train_steps(model)
    assert losses[-1] < 0.5 * losses[0]
    after = dict(model.lm.named_parameters())
    assert all(torch.equal(after[n], v) for n, v in base.items())
    assert all(torch.equal(p, encoder[n]) for n, p in model.image_encoder.named_parameters())
    assert sum(not torch.equal(after[n], v) for n, v in adapters.items()) == len(adapters)  # every adapter moved


def test_the_adapters_lower_the_loss_further_than_the_mapper_alone():
    _, plain = train_steps(make_model())
    _, lora = train_steps(lora_model())
    assert lora[-1] < plain[-1]


def test_checkpoint_round_trip_gives_identical_logits_and_captions(tmp_path):
    model, _ = train_steps(lora_model(tmp_path))
    ids, mask, px = batch(model)
    ref = model(ids, mask, pixel_values=px)[0]
    path = tmp_path / "model_state_dict_run-1.pth"
    model.save_checkpoint(path)
    saved = read_checkpoint(path)["state_dict"]
    assert {k for k in saved if k.startswith("lm.")} == {f"lm.{n}" for n, _ in model.lm.named_parameters() if is_lora(n)}
    assert not any(k.startswith("lm.") and not is_lora(k) for k in saved)  # never the frozen weights
    back = load_captioner(path)
    assert torch.equal(back(ids, mask, pixel_values=px)[0], ref)
    assert back.generate(pixel_values=px, max_new_tokens=8) == model.generate(pixel_values=px, max_new_tokens=8)


def test_a_checkpoint_without_its_adapters_is_refused(tmp_path):
    model = lora_model(tmp_path)
    path = tmp_path / "model_state_dict_run-1.pth"
    model.save_checkpoint(path)
    ckpt = torch.load(path, weights_only=True)
    ckpt["state_dict"] = {k: v for k, v in ckpt["state_dict"].items() if not k.startswith("lm.")}
    torch.save(ckpt, path)
    with pytest.raises(RefusedFileError, match="decoder adapters: 0 saved, 16 expected"):
        load_captioner(path)


def test_merged_decoder_gives_the_same_logits_without_adapters(tmp_path):
    model, _ = train_steps(lora_model(tmp_path))
    ids, mask, px = batch(model)
    ref = model(ids, mask, pixel_values=px)[0]
    path = tmp_path / "model_state_dict_run-1.pth"
    model.save_checkpoint(path)
    import train
    assert train.main(["--merge_weights", "--checkpoint", str(path)]) == 0
    merged = load_captioner(tmp_path / "merged_run-1" / path.name)
    assert merged.config.lm_lora_r == 0 and not any(is_lora(n) for n, _ in merged.lm.named_parameters())
    torch.testing.assert_close(merged(ids, mask, pixel_values=px)[0], ref, rtol=1e-4, atol=1e-4)
    assert merged.generate(pixel_values=px, max_new_tokens=8) == model.generate(pixel_values=px, max_new_tokens=8)
    half = load_captioner(merge_decoder_lora(path, tmp_path / "half", wise_alpha=0.0) / path.name)
    plain = make_model()  # wise_alpha 0: the untouched decoder (with the trained mapper)
    plain.mapper.load_state_dict(model.mapper.state_dict())
    torch.testing.assert_close(half(ids, mask, pixel_values=px)[0], plain(ids, mask, pixel_values=px)[0])


def test_merging_a_checkpoint_without_adapters_is_refused(tmp_path):
    cdir, ldir = save_backbones(tmp_path)
    model = PrefixCaptioner.from_config(CaptionerConfig(encoder_name=str(cdir), encoder_pretrained=None,
                                                        lm_name=str(ldir), mapper_prefix_length=3, mapper_hidden_dim=64,
                                                        lm_dtype="float32"))
    model.save_checkpoint(tmp_path / "model_state_dict_run-1.pth")
    with pytest.raises(ConfigError, match="nothing to merge"):
        merge_decoder_lora(tmp_path / "model_state_dict_run-1.pth")


def test_unknown_target_modules_are_one_clear_error():
    with pytest.raises(ConfigError, match="no layers named"):
        lora_model(target_modules=["no_such_proj"])


def test_capkits_decoding_loop_equals_generate_with_adapters():
    model, _ = train_steps(lora_model())
    _, _, px = batch(model)
    fast = model.generate(pixel_values=px, max_new_tokens=10, num_beams=3)
    model.fast_decoding = False
    assert fast == model.generate(pixel_values=px, max_new_tokens=10, num_beams=3)


def test_adapters_train_in_float32_on_a_bfloat16_decoder():
    """AdamW's small steps on bf16 adapter weights would round away: the adapters are float32 whatever the decoder."""
    from conftest import make_backbones
    clip, lm, tok, preprocess = make_backbones()
    cfg = CaptionerConfig(encoder_name="tiny", encoder_pretrained=None, lm_name="tiny", mapper_prefix_length=3,
                          mapper_hidden_dim=64, lm_dtype="bfloat16", lm_lora_r=4, lora_alpha=8, lora_dropout=0.0)
    model = PrefixCaptioner(cfg, clip.visual, lm.to(torch.bfloat16), tok, preprocess)
    dtypes = {n: p.dtype for n, p in model.lm.named_parameters()}
    assert {d for n, d in dtypes.items() if is_lora(n)} == {torch.float32}
    assert {d for n, d in dtypes.items() if not is_lora(n)} == {torch.bfloat16}
    ids, mask, px = batch(model)
    logits, loss = model(ids, mask, pixel_values=px)
    loss.backward()
    assert logits.dtype == torch.bfloat16 and all(p.grad is not None for p in model.trainable_parameters())


def test_init_from_takes_a_mapper_trained_without_adapters_and_refuses_another_decoder(tmp_path):
    import train
    plain = lora_model(tmp_path, r=0)
    plain.save_checkpoint(tmp_path / "model_state_dict_a-1.pth")
    run = type("Run", (), {"log": staticmethod(lambda *a: None)})()
    model = PrefixCaptioner.from_config(CaptionerConfig(**{**plain.config.__dict__, "lm_lora_r": 4}))
    train.start_from(run, model, tmp_path / "model_state_dict_a-1.pth")  # adapters stay fresh (lora_B = 0)
    ids, mask, px = batch(model)
    assert torch.equal(model(ids, mask, pixel_values=px)[0], plain(ids, mask, pixel_values=px)[0])
    import shutil
    shutil.copytree(tmp_path / "lm", tmp_path / "other_lm")  # the same widths: only the name tells them apart
    other = PrefixCaptioner.from_config(CaptionerConfig(**{**plain.config.__dict__, "lm_name": str(tmp_path / "other_lm"),
                                                           "lm_tokenizer_name": None}))
    with pytest.raises(ConfigError, match=r"differs from this run's in \['lm_name'\]"):
        train.start_from(run, other, tmp_path / "model_state_dict_a-1.pth")
