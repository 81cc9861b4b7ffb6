"""The real architecture's shapes (ViT-B-32 + a Qwen3 with the 0.6B model's dimensions), random
weights, no download: the mapper maps 512 -> prefix x 1024 (or 49 patch tokens x 768 -> prefix x 1024)
and a bf16 training step runs on CPU, for every mapper."""
import pytest
import torch
from conftest import make_tokenizer

from capkit.models.captioner import CaptionerConfig
from capkit.models.decoders import tokenize_captions
from model import PrefixCaptioner

pytestmark = pytest.mark.slow


def test_vit_b32_qwen3_06b_shapes_bf16_step():
    import open_clip
    from transformers import Qwen3ForCausalLM

    from tools.bench import real_shape_lm_config
    torch.manual_seed(0)
    clip, _, preprocess = open_clip.create_model_and_transforms("ViT-B-32", pretrained=None)
    tok = make_tokenizer()
    lm = Qwen3ForCausalLM._from_config(real_shape_lm_config(tok), dtype=torch.bfloat16)
    assert 0.55e9 < sum(p.numel() for p in lm.parameters()) < 0.65e9
    mcfg = CaptionerConfig(encoder_name="ViT-B-32", encoder_pretrained=None, mapper_prefix_length=10, lm_dtype="bfloat16")
    model = PrefixCaptioner(mcfg, clip.visual.to(torch.bfloat16), lm, tok, preprocess)
    assert (mcfg.encoder_embed_dim, mcfg.lm_hidden_size) == (512, 1024)
    assert model.mapper[0].in_features == 512 and model.mapper[-1].out_features == 10 * 1024
    frozen = model.lm.model.layers[5].mlp.up_proj.weight.clone()
    batch = tokenize_captions(tok, ["a dog runs on grass", "a red ball", "the cat sits", "big blue snow"], 32)
    opt = torch.optim.AdamW(model.mapper.parameters(), lr=1e-4)
    model.train()
    logits, loss = model(batch["input_ids"], batch["attention_mask"], pixel_values=torch.randn(4, 3, 224, 224))
    assert logits.shape == (4, batch["input_ids"].shape[1], 151936) and logits.dtype == torch.bfloat16
    assert torch.isfinite(loss)
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.mapper.parameters())
    opt.step()
    assert torch.equal(frozen, model.lm.model.layers[5].mlp.up_proj.weight)
    token_mapper_step(clip, lm, tok, preprocess)


def token_mapper_step(clip, lm, tok, preprocess):
    """The resampler on ViT-B-32's patch tokens, on the same (already built) backbones: 49 x 768 -> 10 x 1024.
    (The transformer mapper on tokens runs the same code at tiny scale in test_model.py.)"""
    mcfg = CaptionerConfig(encoder_name="ViT-B-32", encoder_pretrained=None, mapper_type="resampler",
                           encoder_features="tokens", lm_dtype="bfloat16")
    model = PrefixCaptioner(mcfg, clip.visual.float(), lm, tok, preprocess)
    assert (mcfg.encoder_token_dim, mcfg.lm_hidden_size) == (768, 1024)
    feats = model.encode_images(torch.randn(2, 3, 224, 224))
    assert feats.shape == (2, 49, 768)                                   # 7 x 7 patches of ViT-B/32 at 224 px
    batch = tokenize_captions(tok, ["a dog runs on grass", "a red ball"], 32)
    frozen = model.lm.model.layers[3].self_attn.q_proj.weight.clone()
    model.train()
    logits, loss = model(batch["input_ids"], batch["attention_mask"], image_embeds=feats)
    assert logits.dtype == torch.bfloat16 and torch.isfinite(loss)
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.mapper.parameters())
    torch.optim.AdamW(model.mapper.parameters(), lr=1e-4).step()
    assert torch.equal(frozen, model.lm.model.layers[3].self_attn.q_proj.weight)

