"""Any causal LM as the frozen decoder: tiny random GPT-2, Llama (SmolLM2's family) and Qwen3 configs, each
loaded from a save_pretrained folder the way a user's model is, train a step (only the mapper moves), generate
(greedy = teacher-forced argmax, EOS ends it) and survive a checkpoint round trip. Nothing may assume Qwen:
GPT-2 has learned positions, no pad token and untied-by-config heads; Llama has a BOS token its tokenizer adds
by default; all three take inputs_embeds and logits_to_keep."""
import pytest
import torch
from conftest import TINY_CLIP_CFG, as_generation_sees, make_tokenizer

from capkit.models.captioner import CaptionerConfig
from model import build_model, load_captioner


def tiny_lm(family: str, tok):
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, Qwen3Config, Qwen3ForCausalLM
    eos = tok.eos_token_id
    if family == "gpt2":  # GPT-2's own conventions: BOS = EOS = <|endoftext|>, no pad token
        return GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_embd=32, n_layer=2, n_head=2, n_positions=64,
                                          bos_token_id=eos, eos_token_id=eos, initializer_range=0.3))
    common = dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                  num_key_value_heads=1, max_position_embeddings=64, initializer_range=0.3, eos_token_id=eos)
    if family == "llama":  # SmolLM2 / Llama: a BOS of its own, tied embeddings
        return LlamaForCausalLM(LlamaConfig(**common, bos_token_id=tok.bos_token_id, pad_token_id=eos,
                                            tie_word_embeddings=True))
    return Qwen3ForCausalLM(Qwen3Config(**common, head_dim=16, bos_token_id=None, pad_token_id=eos,
                                        tie_word_embeddings=False))


def family_tokenizer(family: str):
    """GPT-2: no pad token (capkit must not need one in the folder). Llama: a BOS its post-processor adds."""
    from tokenizers import processors
    tok = make_tokenizer()
    if family == "gpt2":
        tok.pad_token = None
    if family == "llama":
        tok.add_special_tokens({"bos_token": "<s>"})
        tok.backend_tokenizer.post_processor = processors.TemplateProcessing(
            single="<s> $A", special_tokens=[("<s>", tok.bos_token_id)])
    return tok


@pytest.fixture(params=["gpt2", "llama", "qwen3"])
def decoder_dir(request, tmp_path):
    import json

    import open_clip
    from safetensors.torch import save_file
    torch.manual_seed(0)
    tok = family_tokenizer(request.param)
    lm = tiny_lm(request.param, tok).eval()
    ldir, cdir = tmp_path / request.param, tmp_path / "clip"
    lm.save_pretrained(ldir)
    tok.save_pretrained(ldir)
    clip = open_clip.CLIP(**TINY_CLIP_CFG)
    cdir.mkdir()
    save_file({k: v.contiguous() for k, v in clip.state_dict().items()}, cdir / "open_clip_model.safetensors")
    (cdir / "open_clip_config.json").write_text(json.dumps({"model_cfg": TINY_CLIP_CFG, "preprocess_cfg": {}}))
    return request.param, cdir, ldir


@pytest.mark.parametrize("mapper", [{"mapper_type": "mlp"},
                                    {"mapper_type": "resampler", "encoder_features": "tokens", "mapper_num_layers": 1,
                                     "mapper_num_heads": 2}], ids=["mlp", "resampler"])
def test_each_decoder_family_trains_generates_and_round_trips(decoder_dir, mapper, tmp_path):
    family, cdir, ldir = decoder_dir
    cfg = CaptionerConfig(encoder_name=str(cdir), encoder_pretrained=None, lm_name=str(ldir), mapper_prefix_length=3,
                          mapper_hidden_dim=64, lm_dtype="float32", **mapper)
    model = build_model(cfg)
    tok = model.tokenizer
    assert tok.pad_token_id is not None  # GPT-2's missing pad: EOS stands in (masked out of attention and loss)
    enc = model.tokenize(["a red dog runs", "the cat sits on grass"], 16)
    bos = tok.bos_token_id
    assert bos is None or bos == tok.eos_token_id or bos not in enc["input_ids"]  # the image prefix leads, no BOS
    assert (enc["input_ids"][0, enc["attention_mask"][0].sum() - 1] == tok.eos_token_id)

    # one step: only the mapper moves, the decoder stays bit-identical
    frozen = {k: v.clone() for k, v in model.lm.state_dict().items()}
    mapper_before = {k: v.clone() for k, v in model.mapper.state_dict().items()}
    px = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    model.train()
    logits, loss = model(enc["input_ids"], enc["attention_mask"], pixel_values=px)
    assert logits.shape == (2, enc["input_ids"].shape[1], len(tok)) and torch.isfinite(loss)
    loss.backward()
    torch.optim.AdamW(model.trainable_parameters(), lr=1e-2).step()
    assert all(torch.equal(v, model.lm.state_dict()[k]) for k, v in frozen.items())
    assert any(not torch.equal(v, model.mapper.state_dict()[k]) for k, v in mapper_before.items())

    # greedy generation from inputs_embeds = the teacher-forced argmax over what it generated
    model.eval()
    with torch.no_grad():
        for p in model.mapper.parameters():  # a prefix that makes the random decoder say something
            p.add_(torch.randn_like(p) * 0.3)
    gen = model.generate_ids(pixel_values=px, max_new_tokens=8)
    mask = torch.ones_like(gen)
    for i in range(len(gen)):
        hit = (gen[i] == tok.eos_token_id).nonzero()
        if len(hit):
            mask[i, hit[0, 0] + 1:] = 0
    logits, _ = model(gen, mask, pixel_values=px)
    assert torch.equal(as_generation_sees(logits, tok).argmax(-1)[mask.bool()], gen[mask.bool()])
    assert all(isinstance(c, str) for c in model.generate(pixel_values=px, max_new_tokens=8))

    # checkpoint round trip: the same logits from the rebuilt model
    path = tmp_path / "model_state_dict_x-1.pth"
    model.save_checkpoint(path)
    loaded = load_captioner(path)
    assert torch.equal(model(gen, mask, pixel_values=px)[0], loaded(gen, mask, pixel_values=px)[0])


def test_captions_never_outgrow_the_decoders_positions(decoder_dir):
    """The tiny decoders have 64 positions and the prefix takes 3: 61 caption tokens. GPT-2's learned
    positions fail with an IndexError past them, deep in training or generation; capkit truncates
    training captions there and refuses a max_new_tokens beyond them, by name, before decoding."""
    from capkit.errors import ConfigError
    family, cdir, ldir = decoder_dir
    model = build_model(CaptionerConfig(encoder_name=str(cdir), encoder_pretrained=None, lm_name=str(ldir),
                                        mapper_prefix_length=3, mapper_hidden_dim=64, lm_dtype="float32")).eval()
    assert model.caption_positions() == 61
    enc = model.tokenize(["a red dog runs on grass " * 40], max_length=10_000)
    assert enc["input_ids"].shape == (1, 61)  # truncated to what the positions hold, EOS last
    px = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        logits, loss = model(enc["input_ids"], enc["attention_mask"], pixel_values=px)  # every position used
    assert logits.shape[1] == 61 and torch.isfinite(loss)
    with pytest.raises(ConfigError, match="max_new_tokens=62 .* at most 61 tokens"):
        model.generate(pixel_values=px, max_new_tokens=62)
    assert model.generate_ids(pixel_values=px, max_new_tokens=61).shape[1] <= 61
    with pytest.raises(ConfigError, match="mapper_prefix_length=64 leaves no room"):
        build_model(CaptionerConfig(encoder_name=str(cdir), encoder_pretrained=None, lm_name=str(ldir),
                                    mapper_prefix_length=64, mapper_hidden_dim=64, lm_dtype="float32"))
