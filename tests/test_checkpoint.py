"""Checkpoint layouts: ours, llava-hf, original LLaVA(-Med v1.5), CLIP + LLM; export; bad checkpoints."""

from __future__ import annotations

import json
import re

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import CLIPConfig, CLIPModel, LlavaForConditionalGeneration

import hf_oracle as hf
from minillavamed import LlavaMed
from minillavamed.checkpoint import CheckpointError, export_llava_hf, read_config
from minillavamed.config import PRESETS, ConfigError, LlavaConfig, preset
from test_model import PROMPTS, assert_close_scaled, expand_for_hf, pad


def logits_vs_hf(ours, ref):
    pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    ids, mask = pad(PROMPTS, pad_left=False)
    hf_ids, hf_mask = expand_for_hf(PROMPTS, 16, pad_left=False)
    with torch.no_grad():
        out = ours(ids, pixels, mask)[0]
        expected = ref(input_ids=hf_ids, pixel_values=pixels, attention_mask=hf_mask).logits
    valid = hf_mask.bool()
    return out[valid], expected[valid][:, : out.shape[-1]]


@pytest.fixture(scope="module")
def ref():
    return hf.llava(seed=3)


def write_original_layout(ref, root, projector="mlp2x_gelu"):
    """A LLaVA-Med v1.5 style checkpoint (llava_mistral keys) and its separate CLIP tower directory."""
    clip_dir, llava_dir = root / "clip", root / "llava"
    ref.model.vision_tower.save_pretrained(clip_dir)
    llava_dir.mkdir()
    state = {}
    for k, v in ref.state_dict().items():
        if k.startswith("model.language_model."):
            state["model." + k[len("model.language_model."):]] = v
        elif k == "lm_head.weight":
            state[k] = v
        elif k.startswith("model.multi_modal_projector.linear_"):
            index = 2 * (int(k.split("linear_")[1][0]) - 1)  # nn.Sequential(Linear, GELU, Linear): 0 and 2
            state[f"model.mm_projector.{index}.{k.rsplit('.', 1)[1]}"] = v
    save_file({k: v.contiguous() for k, v in state.items()}, str(llava_dir / "model.safetensors"))
    config = {**ref.config.text_config.to_dict(), "model_type": "llava_mistral",
              "architectures": ["LlavaMistralForCausalLM"], "mm_projector_type": projector,
              "mm_vision_tower": str(clip_dir), "mm_vision_select_layer": -2, "mm_vision_select_feature": "patch",
              "mm_hidden_size": 32, "image_aspect_ratio": "pad"}
    (llava_dir / "config.json").write_text(json.dumps(config))
    return llava_dir, clip_dir


def test_llava_hf_sharded_layout(ref, tmp_path):
    ref.save_pretrained(tmp_path, max_shard_size="100KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    ours = LlavaMed.from_pretrained(tmp_path)
    assert_close_scaled(*logits_vs_hf(ours, ref))
    assert ours.cfg.conv_template == "mistral_instruct"
    assert read_config(tmp_path) == ours.cfg  # what training validates its data against, no tensor read


def test_original_llava_layout(ref, tmp_path):
    llava_dir, clip_dir = write_original_layout(ref, tmp_path)
    ours = LlavaMed.from_pretrained(llava_dir)  # the tower found through config's mm_vision_tower
    assert_close_scaled(*logits_vs_hf(ours, ref))
    moved = tmp_path / "elsewhere"
    clip_dir.rename(moved)
    with pytest.raises(CheckpointError, match="vision_tower"):
        LlavaMed.from_pretrained(llava_dir)
    ours = LlavaMed.from_pretrained(llava_dir, vision_tower=moved)
    assert_close_scaled(*logits_vs_hf(ours, ref))
    assert read_config(llava_dir, vision_tower=moved) == ours.cfg


def test_clip_plus_llm_builds_a_fresh_llava(tmp_path):
    clip, mistral = hf.clip(seed=4), hf.mistral(seed=5)
    # A full CLIPModel checkpoint (text tower included), as openai/clip-vit-large-patch14-336 ships.
    full = CLIPModel(CLIPConfig(vision_config=clip.config.to_dict(),
                                text_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                                 num_attention_heads=2, vocab_size=50, bos_token_id=0,
                                                 eos_token_id=1, pad_token_id=1), projection_dim=16))
    full.vision_model.load_state_dict(clip.state_dict())
    full.save_pretrained(tmp_path / "clip")
    mistral.save_pretrained(tmp_path / "mistral")
    ours = LlavaMed.from_pretrained(tmp_path / "mistral", vision_tower=tmp_path / "clip", projector="linear")
    assert read_config(tmp_path / "mistral", vision_tower=tmp_path / "clip", projector="linear") == ours.cfg
    pixels = torch.randn(2, 3, 32, 32)
    ids = torch.randint(3, 120, (2, 9))
    with torch.no_grad():
        assert_close_scaled(ours.vision(pixels), clip(pixels, output_hidden_states=True).hidden_states[-2][:, 1:])
        assert_close_scaled(ours(ids)[0], mistral(ids).logits)
    w = ours.projector.linears[0].weight
    assert len(ours.projector.linears) == 1 and w.shape == (64, 32) and torch.isfinite(w).all() and w.std() > 0
    with pytest.raises(CheckpointError, match="vision_tower"):
        LlavaMed.from_pretrained(tmp_path / "mistral")


def test_own_format_round_trip_sharded_and_tied(tmp_path):
    cfg = preset("tiny")
    cfg.decoder.tie_embeddings = True
    model = LlavaMed(cfg)
    model.save_pretrained(tmp_path, max_shard_bytes=2_000_000)
    assert json.loads((tmp_path / "model.safetensors.index.json").read_text())["weight_map"]
    loaded = LlavaMed.from_pretrained(tmp_path)
    assert loaded.decoder.lm_head.weight is loaded.decoder.embed.weight
    for (k, a), b in zip(model.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), k


def test_bf16_load(tmp_path):
    LlavaMed(preset("tiny")).save_pretrained(tmp_path)
    model = LlavaMed.from_pretrained(tmp_path, dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert not any(p.is_meta for p in model.parameters())


def test_export_to_llava_hf_round_trips(ref, tmp_path):
    ours = LlavaMed.from_pretrained(_saved(ref, tmp_path / "src"))
    export_llava_hf(ours, tmp_path / "export")
    back, info = LlavaForConditionalGeneration.from_pretrained(tmp_path / "export", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    image_id = back.config.image_token_index
    assert image_id == ours.cfg.decoder.vocab_size
    pixels = torch.randn(2, 3, 32, 32)
    ids, mask = pad(PROMPTS, pad_left=False)
    rows = [[image_id if t == -200 else t for t in p] for p in PROMPTS]
    hf_ids, hf_mask = pad([sum(([t] * 16 if t == image_id else [t] for t in r), []) for r in rows], False)
    with torch.no_grad():
        out = ours(ids, pixels, mask)[0]
        expected = back.eval()(input_ids=hf_ids, pixel_values=pixels, attention_mask=hf_mask).logits
    valid = hf_mask.bool()
    assert_close_scaled(out[valid], expected[valid][:, :-1])
    # The added image row's logit is the mean logit, so it never wins a greedy step.
    assert (expected[valid][:, -1] < expected[valid][:, :-1].max(-1).values).all()


def test_export_refuses_a_linear_projector(tmp_path):
    cfg = preset("tiny")
    cfg.projector.type = "linear"
    with pytest.raises(ValueError, match="two-layer"):
        export_llava_hf(LlavaMed(cfg), tmp_path)


def _saved(ref, path):
    ref.save_pretrained(path)
    return path


# ---- bad checkpoints give errors that name the key and the file ----
@pytest.fixture
def own(tmp_path):
    LlavaMed(preset("tiny")).save_pretrained(tmp_path)
    return tmp_path


def test_missing_key_is_named(own):
    state = load_file(own / "model.safetensors")
    del state["decoder.blocks.1.gate_up.weight"]
    save_file(state, str(own / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"missing key 'decoder\.blocks\.1\.gate_up\.weight'") as e:
        LlavaMed.from_pretrained(own)
    assert str(own) in str(e.value)


def test_unexpected_key_is_named(own):
    state = load_file(own / "model.safetensors")
    state["decoder.extra.weight"] = torch.zeros(2)
    save_file(state, str(own / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"model\.safetensors: unexpected key 'decoder\.extra\.weight'"):
        LlavaMed.from_pretrained(own)


def test_wrong_shape_is_named(own):
    state = load_file(own / "model.safetensors")
    state["projector.linears.1.bias"] = torch.zeros(3)
    save_file(state, str(own / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"model\.safetensors: key 'projector\.linears\.1\.bias' has shape \(3,\)"):
        LlavaMed.from_pretrained(own)


def test_a_bad_part_of_a_fused_projection_is_named(ref, tmp_path):
    # We keep q/k/v (and gate/up) as one tensor; the error must still name the released key at fault.
    ref.save_pretrained(tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    key = next(k for k in state if k.endswith("model.layers.0.self_attn.k_proj.weight"))
    good, state[key] = state[key], state[key][:-1]
    save_file(state, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointError, match=rf"model\.safetensors: key '{key}' has shape \(31, 64\), the model "
                                              r"expects \(32, 64\)"):
        LlavaMed.from_pretrained(tmp_path)
    state[key] = good
    del state[next(k for k in state if k.endswith("model.layers.1.mlp.up_proj.weight"))]
    save_file(state, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"missing key '.*layers\.1\.mlp\.up_proj\.weight' \(for "
                                              r"decoder\.blocks\.1\.gate_up\.weight\)"):
        LlavaMed.from_pretrained(tmp_path)


def test_truncated_file_is_named(own):
    data = (own / "model.safetensors").read_bytes()
    (own / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"model\.safetensors"):
        LlavaMed.from_pretrained(own)


def test_unknown_layout_and_missing_files(tmp_path):
    with pytest.raises(CheckpointError, match="not a checkpoint directory"):
        LlavaMed.from_pretrained(tmp_path / "nope")
    with pytest.raises(CheckpointError, match=r"config\.json: missing"):
        LlavaMed.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    save_file({"x": torch.zeros(1)}, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointError, match="unknown model_type 'gpt2'"):
        LlavaMed.from_pretrained(tmp_path)


def test_config_with_unknown_field_is_rejected():
    d = preset("tiny").to_dict()
    d["decoder"]["n_experts"] = 8
    with pytest.raises(ValueError, match="n_experts"):
        LlavaConfig.from_dict(d)


def test_config_values_are_checked_naming_the_field():
    for name in PRESETS:
        preset(name)  # every preset passes its own checks
    d = preset("tiny").to_dict()
    for part, key, value, says in [("vision", "select_feature", "cls", "choose 'patch' or 'cls_patch'"),
                                   ("vision", "select_layer", 5, "-5 to 4"),
                                   ("projector", "type", "mlp2x", "mlp<N>x_gelu"),
                                   ("decoder", "kv_heads", 3, "heads = 4: must be a multiple of kv_heads 3"),
                                   (None, "image_aspect_ratio", "square", "choose 'pad' or 'crop'")]:
        bad = json.loads(json.dumps(d))
        (bad[part] if part else bad)[key] = value
        with pytest.raises(ConfigError, match=re.escape(says)):
            LlavaConfig.from_dict(bad)


def test_bad_config_values_of_a_checkpoint_name_its_file(own, ref, tmp_path):
    config = json.loads((own / "config.json").read_text())
    config["vision"]["select_feature"] = "cls"
    (own / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"config\.json: VisionConfig\.select_feature = 'cls'"):
        LlavaMed.from_pretrained(own)
    llava_dir, _ = write_original_layout(ref, tmp_path / "original")
    config = json.loads((llava_dir / "config.json").read_text())
    (llava_dir / "config.json").write_text(json.dumps({**config, "mm_vision_select_feature": "cls"}))
    with pytest.raises(CheckpointError, match=r"config\.json: VisionConfig\.select_feature = 'cls'"):
        LlavaMed.from_pretrained(llava_dir)


# ---- LLaVA-Med v1 layout: mm_use_im_start_end, tokens added after LLaMA's vocabulary ----

def write_v1_layout(root, tok_texts=None):
    """A LLaVA-Med v1.0 style checkpoint: LlavaLlamaForCausalLM keys, one linear projector, a config with
    mm_use_im_start_end and no image_aspect_ratio, and the tokenizer v1.0's train.py saves ([PAD], then
    <im_patch>, <im_start>, <im_end> after the SentencePiece pieces)."""
    from safetensors.torch import save_file as save
    from minillavamed.tokenizer import train_tokenizer
    clip_dir, v1_dir = root / "clip", root / "v1"
    clip = hf.clip(seed=6)
    clip.save_pretrained(clip_dir)
    tok = train_tokenizer(tok_texts or ["what is shown in the image a chest x ray lesion left right"] * 20,
                          v1_dir, vocab_size=300)
    base = tok.vocab_size
    llama = hf.llama(seed=7, vocab_size=base + 4)
    proj = torch.nn.Linear(32, 64)
    torch.nn.init.normal_(proj.weight, std=0.2)
    state = {**llama.state_dict(), "model.mm_projector.weight": proj.weight.data,
             "model.mm_projector.bias": proj.bias.data}
    save({k: v.contiguous() for k, v in state.items()}, str(v1_dir / "model.safetensors"))
    config = {**llama.config.to_dict(), "model_type": "llava", "architectures": ["LlavaLlamaForCausalLM"],
              "mm_vision_tower": str(clip_dir), "mm_vision_select_layer": -2, "mm_hidden_size": 32,
              "mm_use_im_start_end": True, "use_mm_proj": True}
    (v1_dir / "config.json").write_text(json.dumps(config))
    (v1_dir / "added_tokens.json").write_text(json.dumps(
        {"[PAD]": base, "<im_patch>": base + 1, "<im_start>": base + 2, "<im_end>": base + 3}))
    return v1_dir, clip, llama, proj


def test_llava_med_v1_layout_is_prompted_as_it_was_trained(tmp_path):
    from minillavamed.conversation import build_prompt, get_template, tokenize_prompt
    from minillavamed.tokenizer import Tokenizer
    v1_dir, clip, llama, proj = write_v1_layout(tmp_path)
    ours = LlavaMed.from_pretrained(v1_dir)
    cfg = ours.cfg
    assert read_config(v1_dir) == cfg
    assert cfg.mm_use_im_start_end and cfg.conv_template == "llava_med_v1" and cfg.image_aspect_ratio == "crop"
    tok = Tokenizer(v1_dir)
    prompt = build_prompt(get_template(cfg.conv_template), "what is shown?", im_start_end=cfg.mm_use_im_start_end)
    ids = tokenize_prompt(prompt, tok, im_start_end=True)
    pixels = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    # v1.0's LlavaLlamaModel.forward: the embeddings of the patch tokens between <im_start> and <im_end>
    # are replaced by the projected patch features; <im_start>/<im_end> keep their own embeddings.
    patch = tok.added["<im_patch>"]
    with torch.no_grad():
        features = proj(clip(pixels, output_hidden_states=True).hidden_states[-2][:, 1:])[0]
        p = ids.index(-200)
        expanded = torch.tensor(ids[:p] + [patch] * features.shape[0] + ids[p + 1:])[None]
        embeds = llama.model.embed_tokens(expanded)
        embeds[0, p:p + features.shape[0]] = features
        expected = llama(inputs_embeds=embeds).logits
        out = ours(torch.tensor([ids]), pixels)[0]
    assert ids[p - 1] == tok.added["<im_start>"] and ids[p + 1] == tok.added["<im_end>"]
    assert_close_scaled(out, expected)


def test_v1_layout_without_its_tokenizer_files_is_refused(tmp_path):
    v1_dir, *_ = write_v1_layout(tmp_path)
    (v1_dir / "added_tokens.json").unlink()
    with pytest.raises(CheckpointError, match="added_tokens.json.*<im_start>"):
        LlavaMed.from_pretrained(v1_dir)
    (v1_dir / "added_tokens.json").write_text(json.dumps({"<im_patch>": 300, "<im_start>": 301, "<im_end>": 999}))
    with pytest.raises(CheckpointError, match="<im_end> has id 999 but the embeddings have only 304 rows"):
        LlavaMed.from_pretrained(v1_dir)


@pytest.mark.parametrize("tied", [False, True])
def test_add_image_markers_grows_the_vocabulary_as_v1_did(tmp_path, tied):
    from minillavamed.checkpoint import add_image_markers
    from minillavamed.tokenizer import train_tokenizer
    tok = train_tokenizer(["a chest x ray of the left lung"] * 20, tmp_path, vocab_size=300)
    cfg = preset("tiny")
    cfg.decoder.vocab_size, cfg.decoder.tie_embeddings = tok.vocab_size, tied
    model = LlavaMed(cfg)
    old_embed, old_head = model.decoder.embed.weight.detach().clone(), model.decoder.lm_head.weight.detach().clone()
    add_image_markers(model, tok)
    n = tok.vocab_size
    assert tok.added == {"<im_patch>": n, "<im_start>": n + 1, "<im_end>": n + 2}
    assert model.cfg.mm_use_im_start_end and model.cfg.decoder.vocab_size == n + 3
    embed, head = model.decoder.embed.weight, model.decoder.lm_head.weight
    assert embed.shape == head.shape == (n + 3, cfg.decoder.dim) and (head is embed) == tied
    assert torch.equal(embed[:n], old_embed) and torch.allclose(embed[n:], old_embed.mean(0).expand(3, -1))
    assert torch.allclose(head[n:], old_head.mean(0).expand(3, -1))
    ids = torch.tensor([[1, n + 1, 5, n + 2]])
    assert model(ids)[0].shape == (1, 4, n + 3)
    add_image_markers(model, tok)  # idempotent
    assert model.cfg.decoder.vocab_size == n + 3
