"""The real architecture's shapes (ViT-B-32 + a Qwen3 with the 0.6B model's dimensions), random
weights, no download: the projector maps 512 -> prefix x 1024 and a bf16 training step runs on CPU."""
import pytest
import torch

from conftest import make_tokenizer
from model import tokenize_captions
from model import CaptionerConfig, ClipCaptioner

pytestmark = pytest.mark.slow


def test_vit_b32_qwen3_06b_shapes_bf16_step():
    import open_clip
    from transformers import Qwen3ForCausalLM

    from bench import real_shape_lm_config
    torch.manual_seed(0)
    clip, _, preprocess = open_clip.create_model_and_transforms("ViT-B-32", pretrained=None)
    tok = make_tokenizer()
    lm = Qwen3ForCausalLM._from_config(real_shape_lm_config(tok), dtype=torch.bfloat16)
    assert 0.55e9 < sum(p.numel() for p in lm.parameters()) < 0.65e9
    mcfg = CaptionerConfig(clip_model_name="ViT-B-32", clip_pretrained=None, proj_prefix_length=10, lm_dtype="bfloat16")
    model = ClipCaptioner(mcfg, clip.visual.to(torch.bfloat16), lm, tok, preprocess)
    assert (mcfg.clip_embed_dim, mcfg.lm_hidden_size) == (512, 1024)
    assert model.projector[0].in_features == 512 and model.projector[-1].out_features == 10 * 1024
    frozen = model.lm.model.layers[5].mlp.up_proj.weight.clone()
    batch = tokenize_captions(tok, ["a dog runs on grass", "a red ball", "the cat sits", "big blue snow"], 32)
    opt = torch.optim.AdamW(model.projector.parameters(), lr=1e-4)
    model.train()
    logits, loss = model(batch["input_ids"], batch["attention_mask"], pixel_values=torch.randn(4, 3, 224, 224))
    assert logits.shape == (4, batch["input_ids"].shape[1], 151936) and logits.dtype == torch.bfloat16
    assert torch.isfinite(loss)
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.projector.parameters())
    opt.step()
    assert torch.equal(frozen, model.lm.model.layers[5].mlp.up_proj.weight)
