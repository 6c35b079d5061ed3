"""Tiny random transformers models used as the reference oracle (test-only: the package never imports this)."""

from __future__ import annotations

import torch
from transformers import (CLIPVisionConfig, CLIPVisionModel, LlamaConfig, LlamaForCausalLM, LlavaConfig,
                          LlavaForConditionalGeneration, MistralConfig, MistralForCausalLM)

# A larger init than transformers' 0.02 makes attention peaky, so that mistakes in RoPE or masking show up
# as large logit differences instead of hiding in near-uniform attention.
INIT = 0.2


def clip_config(**kw) -> CLIPVisionConfig:
    base = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, image_size=32,
                patch_size=8, projection_dim=16, initializer_range=INIT, initializer_factor=5.0)
    return CLIPVisionConfig(**{**base, **kw})


def mistral_config(**kw) -> MistralConfig:
    base = dict(vocab_size=120, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, rope_theta=1e6, sliding_window=None, initializer_range=INIT,
                bos_token_id=1, eos_token_id=2, pad_token_id=0, rms_norm_eps=1e-5)
    cfg = MistralConfig(**{**base, **kw})
    return cfg


def llama_config(**kw) -> LlamaConfig:
    base = dict(vocab_size=120, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=4, rope_theta=5e5, initializer_range=INIT, bos_token_id=1, eos_token_id=2,
                pad_token_id=0, rms_norm_eps=1e-6)
    return LlamaConfig(**{**base, **kw})


def seeded(factory, config, seed=0):
    torch.manual_seed(seed)
    model = factory(config)
    # transformers 5 initializes norms and biases at fixed values; jitter them so that a swapped or dropped
    # norm/bias in our code changes the numbers.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias") or "class_embedding" in name:
                p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


def clip(seed=0, **kw) -> CLIPVisionModel:
    return seeded(CLIPVisionModel, clip_config(**kw), seed)


def mistral(seed=0, **kw) -> MistralForCausalLM:
    return seeded(MistralForCausalLM, mistral_config(**kw), seed)


def llama(seed=0, **kw) -> LlamaForCausalLM:
    return seeded(LlamaForCausalLM, llama_config(**kw), seed)


IMAGE_ID = 119  # llava-hf marks image positions with a real token id: the vocab's last row


def llava(seed=0, text="mistral") -> LlavaForConditionalGeneration:
    text_cfg = mistral_config() if text == "mistral" else llama_config()
    cfg = LlavaConfig(vision_config=clip_config(), text_config=text_cfg, image_token_index=IMAGE_ID,
                      vision_feature_layer=-2, vision_feature_select_strategy="default",
                      projector_hidden_act="gelu", image_seq_length=16)
    return seeded(LlavaForConditionalGeneration, cfg, seed)


# Prompt-like text for the tiny SentencePiece tokenizers of the llava-hf checkpoints below.
TEXTS = ["what is shown in this image?", "is there an opacity in the left lower lobe?", "the heart is enlarged.",
         "describe the figure.", "a ct scan of the abdomen with a small lesion on the right side."] * 20


def llava_hf_checkpoint(root, name: str, **text_kw):
    """A tiny random llava-hf checkpoint in root/name, as a user would download one: a SentencePiece
    tokenizer beside the weights (one more embedding row than it has pieces: the <image> token), and three
    random 32-px PNGs img0..img2 in root. Returns (transformers model, our Tokenizer)."""
    import shutil
    from pathlib import Path

    import numpy as np
    from PIL import Image

    from minillavamed.tokenizer import train_tokenizer

    root = Path(root)
    tok = train_tokenizer(TEXTS, root / "tok", vocab_size=300)
    vocab = tok.vocab_size
    cfg = LlavaConfig(vision_config=clip_config(), image_seq_length=16, image_token_index=vocab,
                      text_config=mistral_config(vocab_size=vocab + 1, bos_token_id=tok.bos_id,
                                                 eos_token_id=tok.eos_id, pad_token_id=tok.pad_id, **text_kw))
    model = seeded(LlavaForConditionalGeneration, cfg, seed=11)
    model.save_pretrained(root / name)
    shutil.copy(root / "tok" / "tokenizer.model", root / name / "tokenizer.model")
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(root / f"img{i}.png")
    return model, tok

