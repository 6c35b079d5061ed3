"""The model core against transformers: ViT hidden states, decoder logits, whole-model logits, generation.

The parity tests have a precision axis (as litgpt's tests do): fp32, and fp16 / bf16 autocast with
transformers run under the same autocast. fp32 must agree to 1e-5 of the reference's scale. Under autocast
both sides round at the same places (the products in the autocast dtype, RMSNorm / LayerNorm / softmax /
RoPE in fp32, q and k rounded once after RoPE), and on this CPU they agree exactly; the tolerance is two
units in the last place of the autocast dtype at the reference's scale, far below the gap between autocast
and fp32 (2e-3 for fp16, 2-3e-2 for bf16, on these models).
"""

from __future__ import annotations

import contextlib
import copy
import subprocess
import sys

import pytest
import torch

import hf_oracle as hf
from minillavamed import LlavaMed
from minillavamed.checkpoint import decoder_config_from_hf, decoder_keys, their_keys, vision_config_from_hf, vision_keys
from minillavamed.config import IMAGE_TOKEN_INDEX, preset
from minillavamed.decoder import Decoder, KVCache, rope_cos_sin
from minillavamed.vit import VisionTower

IMG = IMAGE_TOKEN_INDEX


def assert_close_scaled(ours, ref, rel=1e-5):
    """Max abs error <= rel x the reference's scale (its largest magnitude)."""
    ours, ref = ours.float(), ref.float()
    scale = ref.abs().max().item()
    torch.testing.assert_close(ours, ref, rtol=0, atol=rel * scale)


PRECISIONS = {"fp32": None, "fp16-autocast": torch.float16, "bf16-autocast": torch.bfloat16}
TOLERANCE = {"fp32": 1e-5, "fp16-autocast": 2 * 2.0 ** -10, "bf16-autocast": 2 * 2.0 ** -7}


def precision(name):
    """The context both models run under for one point of the precision axis."""
    dtype = PRECISIONS[name]
    return contextlib.nullcontext() if dtype is None else torch.autocast("cpu", dtype=dtype)


with_precision = pytest.mark.parametrize("prec", list(PRECISIONS))


def load_part(module, pairs, hf_state, strip):
    state = {ours[len(strip):]: torch.cat([hf_state[k] for k in their_keys(theirs)]) for ours, theirs in pairs}
    module.load_state_dict(state, strict=True)
    return module.eval()


@pytest.mark.slow
@with_precision
@pytest.mark.parametrize("select_layer", [-2, -1, 1])
def test_vit_hidden_states_match_clip(select_layer, prec):
    clip = hf.clip()
    cfg = vision_config_from_hf(clip.config.to_dict(), select_layer, "patch")
    ours = load_part(VisionTower(cfg), vision_keys(cfg, ""), clip.state_dict(), "vision.")
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad(), precision(prec):
        ref = clip(pixels, output_hidden_states=True).hidden_states[select_layer][:, 1:]
        out = ours(pixels)
    assert out.shape == (2, 16, 32)
    assert_close_scaled(out, ref, TOLERANCE[prec])


@with_precision
@pytest.mark.parametrize("factory", [hf.mistral, hf.llama], ids=["mistral-gqa-theta1e6", "llama-mha-theta5e5"])
def test_decoder_logits_match(factory, prec):
    ref_model = factory()
    cfg = decoder_config_from_hf(ref_model.config.to_dict(), "test")
    ours = load_part(Decoder(cfg), decoder_keys(cfg, "model.", "lm_head.weight"), ref_model.state_dict(), "decoder.")
    ids = torch.randint(3, cfg.vocab_size, (2, 13))
    with torch.no_grad(), precision(prec):
        ref = ref_model(ids).logits
        out = ours.lm_head(ours(ours.embed(ids), torch.arange(13).expand(2, 13)))
    assert out.dtype == ref.dtype
    assert_close_scaled(out, ref, TOLERANCE[prec])


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_dtype_contract_under_autocast(dtype):
    """q, k and v reach attention in the autocast dtype in both towers, dense and packed; RoPE is computed in
    fp32 and rounded once, as transformers' Llama/Mistral code does; the KV cache holds the autocast dtype."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    import minillavamed.decoder as decoder_module
    import minillavamed.vit as vit_module

    torch.manual_seed(0)
    model = LlavaMed(preset("tiny")).eval()
    seen = []

    def recording(inner):
        def call(q, k, v, *args, **kwargs):
            seen.append((q, k, v))
            return inner(q, k, v, *args, **kwargs)
        return call

    ids = torch.tensor([[1, IMG, 5, 6, 7], [1, IMG, 8, 9, 10]])
    pixels = torch.randn(2, 3, 64, 64)
    patched = {(decoder_module, "attention"), (decoder_module, "attention_varlen"), (vit_module, "attention")}
    originals = {(m, n): getattr(m, n) for m, n in patched}
    try:
        for m, n in patched:
            setattr(m, n, recording(originals[(m, n)]))
        with torch.no_grad(), torch.autocast("cpu", dtype=dtype):
            model(ids, pixels)
            cu = torch.tensor([0, 20, 40], dtype=torch.int32)
            model(ids.view(1, -1), pixels, cu_seqlens=cu, max_seqlen=20)
    finally:
        for (m, n), f in originals.items():
            setattr(m, n, f)
    assert len(seen) == 2 * (model.vision.n_run + model.cfg.decoder.layers)
    assert all(t.dtype == dtype for qkv in seen for t in qkv), [[t.dtype for t in qkv] for qkv in seen]

    # RoPE: the product's q rotated in fp32 with fp32 tables, then rounded once (transformers under autocast).
    cfg = model.cfg.decoder
    x = torch.randn(2, 7, cfg.dim)
    positions = torch.arange(7).expand(2, 7)
    attn = model.decoder.blocks[0].attn
    captured = []
    inner = decoder_module.attention
    decoder_module.attention = lambda q, k, v, **kw: captured.append(q) or inner(q, k, v, **kw)
    try:
        with torch.no_grad(), torch.autocast("cpu", dtype=dtype):
            cos, sin = decoder_module.rope_cos_sin(positions, cfg.head_dim, cfg.rope_theta, x.dtype)
            attn(x, cos, sin, 0, None, None, None, None, "sdpa", False)
            q = torch.nn.functional.linear(x, attn.wqkv.weight)[..., :cfg.heads * cfg.head_dim]
            q = q.view(2, 7, cfg.heads, cfg.head_dim).transpose(1, 2)
            hf_cos, hf_sin = cos[:, :, 0], torch.cat([sin[..., cfg.head_dim // 2:]] * 2, -1)[:, :, 0]
            expected = apply_rotary_pos_emb(q, q, hf_cos, hf_sin)[0].to(dtype).transpose(1, 2)
    finally:
        decoder_module.attention = inner
    assert q.dtype == dtype and hf_cos.dtype == torch.float32
    assert torch.equal(captured[0], expected)

    with torch.autocast("cpu", dtype=dtype):
        cache = KVCache(cfg, batch=1, max_len=4, dtype=torch.float32, device="cpu")
    assert cache.k[0].dtype == cache.v[0].dtype == dtype and cache.cos.dtype == torch.float32


def expand_for_hf(rows, n_patches, pad_left):
    """Our sentinel prompts -> llava-hf's (image id repeated per patch), padded, with the attention mask."""
    expanded = [sum(([hf.IMAGE_ID] * n_patches if t == IMG else [t] for t in r), []) for r in rows]
    return pad(expanded, pad_left)


def pad(rows, pad_left, value=0):
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), value)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, r in enumerate(rows):
        span = slice(width - len(r), width) if pad_left else slice(0, len(r))
        ids[i, span], mask[i, span] = torch.tensor(r), 1
    return ids, mask


PROMPTS = [[1, 5, 6, IMG, 7, 8, 9, 10], [1, 11, IMG, 12]]  # image mid-prompt, different lengths


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """A tiny llava-hf model and ours, loaded from its save_pretrained directory."""
    ref = hf.llava()
    path = tmp_path_factory.mktemp("llava_hf")
    ref.save_pretrained(path)
    return ref, LlavaMed.from_pretrained(path).eval()


@with_precision
def test_whole_model_logits_match_llava_hf(pair, prec):
    ref, ours = pair
    pixels = torch.randn(2, 3, 32, 32)
    ids, mask = pad(PROMPTS, pad_left=False)
    hf_ids, hf_mask = expand_for_hf(PROMPTS, 16, pad_left=False)
    with torch.no_grad(), precision(prec):
        out, _ = ours(ids, pixels, mask)
        positions = (hf_mask.cumsum(-1) - 1).clamp(min=0)
        expected = ref(input_ids=hf_ids, pixel_values=pixels, attention_mask=hf_mask, position_ids=positions).logits
    assert out.shape == expected.shape
    valid = hf_mask.bool()
    assert_close_scaled(out[valid], expected[valid], TOLERANCE[prec])


def test_labels_at_image_positions_are_ignored(pair):
    _, ours = pair
    ids, mask = pad(PROMPTS, pad_left=False)
    labels = ids.clone()
    _, _, _, spliced = ours.splice(ids, torch.randn(2, 3, 32, 32), mask, labels)
    assert (spliced[0, 3:19] == -100).all() and (spliced[1, 2:18] == -100).all()
    assert spliced[0, 19].item() == 7 and spliced[1, 18].item() == 12
    assert (spliced[1, 20:] == -100).all()  # padding


def test_the_loss_is_transformers_loss_from_the_scored_positions_alone(pair):
    ref, ours = pair
    pixels = torch.randn(2, 3, 32, 32)
    ids, mask = pad(PROMPTS, pad_left=False)
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, :2] = -100  # a prompt, which the loss ignores
    hf_ids, hf_mask = expand_for_hf(PROMPTS, 16, pad_left=False)
    _, _, _, spliced = ours.splice(ids, pixels, mask, labels)
    with torch.no_grad():
        logits, loss = ours(ids, pixels, mask, labels)
        every, _ = ours(ids, pixels, mask)
        positions = (hf_mask.cumsum(-1) - 1).clamp(min=0)
        expected = ref(input_ids=hf_ids, pixel_values=pixels, attention_mask=hf_mask, position_ids=positions,
                       labels=spliced).loss
    scored = spliced[:, 1:] != -100
    assert logits.shape == (int(scored.sum()), every.shape[-1]) and 0 < logits.shape[0] < every[:, 1:, 0].numel()
    assert_close_scaled(logits, every[:, :-1][scored])
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)


def test_image_count_mismatch_is_an_error(pair):
    _, ours = pair
    ids, mask = pad(PROMPTS, pad_left=False)
    with pytest.raises(ValueError, match="2 image sentinel"):
        ours(ids, torch.randn(1, 3, 32, 32), mask)


@pytest.mark.slow
@with_precision
def test_greedy_generation_matches_transformers(pair, prec):
    """Under autocast too: the KV cache in the autocast dtype holds what transformers' SDPA rounds to."""
    ref, ours = pair
    pixels = torch.randn(2, 3, 32, 32)
    ids, mask = pad(PROMPTS, pad_left=True)
    hf_ids, hf_mask = expand_for_hf(PROMPTS, 16, pad_left=True)
    with torch.no_grad(), precision(prec):
        expected = ref.generate(input_ids=hf_ids, pixel_values=pixels, attention_mask=hf_mask, max_new_tokens=32,
                                do_sample=False, eos_token_id=None, pad_token_id=0)[:, hf_ids.shape[1]:]
        out = ours.generate(ids, pixels, mask, max_new_tokens=32, eos_id=-1)
    assert expected.shape == (2, 32)
    assert out == expected.tolist()


def compiled_frames() -> int:
    return torch._dynamo.utils.counters["frames"]["ok"]


@pytest.mark.slow
def test_compiled_decoding_generates_what_transformers_generates(pair):
    # fp32 decode steps through torch.compile: a padded batch (a key mask every step) and a cache that grows.
    ref, ours = pair
    ours = copy.deepcopy(ours).compile_decoding()
    pixels = torch.randn(2, 3, 32, 32)
    ids, mask = pad(PROMPTS, pad_left=True)
    hf_ids, hf_mask = expand_for_hf(PROMPTS, 16, pad_left=True)
    with torch.no_grad():
        expected = ref.generate(input_ids=hf_ids, pixel_values=pixels, attention_mask=hf_mask, max_new_tokens=24,
                                do_sample=False, eos_token_id=None, pad_token_id=0)[:, hf_ids.shape[1]:]
    frames = compiled_frames()
    assert ours.generate(ids, pixels, mask, max_new_tokens=24, eos_id=-1) == expected.tolist()
    assert compiled_frames() > frames


def forced_logits(model, ids, pixels, tokens):
    """Each step's next-token logits (steps, vocab) with `tokens` fed in turn, as generate feeds its own."""
    with torch.inference_mode():
        logits, cache, _, positions = model.prefill(ids, pixels, room=len(tokens))
        steps = [logits]
        for i, t in enumerate(tokens[:-1]):
            steps.append(model.decode_step(torch.tensor([t]), positions + i + 1, None, cache))
    return torch.cat(steps)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["bfloat16", "int8", "int4"])
def test_compiled_decode_steps_keep_eager_logits(mode):
    # The bf16 and quantised models decode on bf16 activations. Compiling fuses operators, and a fused chain
    # rounds to bf16 once instead of after each operator: its logits are a few bf16 units from eager's, and as
    # close to the fp32 model's as eager's are.
    torch.manual_seed(0)
    cfg = preset("tiny")
    cfg.decoder.layers = 2
    exact = LlavaMed(cfg).eval()
    model = copy.deepcopy(exact).to(torch.bfloat16)
    if mode != "bfloat16":
        model.quantize(mode if mode == "int8" else "int4-32")
    ids = torch.tensor([[1, IMG, 5, 6, 7]])
    pixels = torch.randn(1, 3, 64, 64)
    tokens = model.generate(ids, pixels.bfloat16(), max_new_tokens=16, eos_id=-1)[0]
    eager = forced_logits(model, ids, pixels.bfloat16(), tokens)
    frames = compiled_frames()
    compiled = forced_logits(model.compile_decoding(), ids, pixels.bfloat16(), tokens)
    assert compiled_frames() > frames
    assert_close_scaled(compiled, eager, rel=4 * 2.0 ** -8)
    fp32 = forced_logits(exact, ids, pixels, tokens)
    assert (compiled - fp32).pow(2).mean() < 1.2 * (eager - fp32).pow(2).mean()


@pytest.mark.slow
def test_a_compiled_decode_step_streams_through_the_kernel(monkeypatch):
    # A 7B's one-row products leave the compiled step for the kernel (compiled into the step, the loop is slower).
    from minillavamed import gemm

    torch.manual_seed(0)
    cfg = preset("tiny")
    cfg.decoder.layers = 2
    model = LlavaMed(cfg).to(torch.bfloat16).eval()
    ids = torch.tensor([[1, IMG, 5, 6, 7]])
    px = torch.randn(1, 3, 64, 64).bfloat16()
    monkeypatch.setattr(gemm, "STREAM_MIN_WEIGHTS", 0)
    tokens = model.generate(ids, px, max_new_tokens=6, eos_id=-1)[0]
    eager = forced_logits(model, ids, px, tokens)
    rows, stream = [], gemm.stream
    monkeypatch.setattr(gemm, "stream", torch.compiler.disable(lambda x, w: rows.append(1) or stream(x, w)))
    frames = compiled_frames()
    compiled = forced_logits(model.compile_decoding(), ids, px, tokens)
    assert compiled_frames() > frames
    per_step = 4 * cfg.decoder.layers + 1  # wqkv, wo, gate_up, down in each layer, then lm_head
    # The prefill's last position (its last block's wo, gate_up and down, then lm_head), then 5 decode steps.
    assert rows == [1] * (4 + 5 * per_step)
    assert_close_scaled(compiled, eager, rel=4 * 2.0 ** -8)


@pytest.mark.slow
def test_cached_decoding_equals_full_recomputation(pair):
    _, ours = pair
    pixels = torch.randn(2, 3, 32, 32)
    ids, mask = pad(PROMPTS, pad_left=True)
    cached = ours.generate(ids, pixels, mask, max_new_tokens=12, eos_id=-1)
    rows = [list(p) for p in PROMPTS]
    with torch.no_grad():
        for _ in range(12):
            x, m = pad(rows, pad_left=False)
            logits, _ = ours(x, pixels, m)
            last = m.sum(1) - 1 + 15  # each row's last real position after its sentinel grew into 16
            for b in range(2):
                rows[b].append(int(logits[b, last[b]].argmax()))
    assert cached == [r[len(p):] for r, p in zip(rows, PROMPTS)]


def test_last_only_prefill_fills_the_same_cache(pair):
    # Generation's prefill skips the last block's work beyond the last position, but not its keys and values.
    decoder = pair[1].decoder
    embeds = torch.randn(2, 9, decoder.cfg.dim)
    mask = torch.arange(9)[None, :] >= torch.tensor([[0], [3]])  # the second row is left-padded
    positions = (mask.long().cumsum(-1) - 1).clamp(min=0)
    caches = [KVCache(decoder.cfg, 2, 9, torch.float32, "cpu") for _ in range(2)]
    with torch.no_grad():
        full = decoder(embeds, positions, mask, caches[0])
        last = decoder(embeds, positions, mask, caches[1], last_only=True)
    assert last.shape == (2, 1, decoder.cfg.dim)
    torch.testing.assert_close(last, full[:, -1:], rtol=1e-5, atol=1e-5)
    for a, b in zip(caches[0].k + caches[0].v, caches[1].k + caches[1].v):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    with pytest.raises(ValueError, match="last_only is for generation"):
        decoder(embeds[:1], positions[:1], cu_seqlens=torch.tensor([0, 4, 9]), max_seqlen=5, last_only=True)


def test_kv_cache_rope_tables_and_overflow():
    cfg = preset("tiny").decoder
    cache = KVCache(cfg, batch=2, max_len=5, dtype=torch.float32, device="cpu")
    positions = torch.tensor([[0, 1, 2], [4, 3, 0]])
    direct = rope_cos_sin(positions, cfg.head_dim, cfg.rope_theta, torch.float32)
    for table, expected in zip((cache.cos, cache.sin), direct):
        assert torch.equal(table[positions], expected)  # a decode step's lookup gives the same numbers
    k = torch.randn(2, 3, cfg.kv_heads, cfg.head_dim)
    keys, values = cache.update(0, k, 2 * k)
    assert torch.equal(keys, k) and torch.equal(values, 2 * k)
    cache.length = 3
    with pytest.raises(ValueError, match="KV cache holds 5 positions; 6 needed"):
        cache.update(0, k, k)


def test_generation_stops_at_eos_and_stop_strings(pair):
    _, ours = pair
    pixels = torch.randn(2, 3, 32, 32)
    ids, mask = pad(PROMPTS, pad_left=True)
    free = ours.generate(ids, pixels, mask, max_new_tokens=10, eos_id=-1)
    eos = free[0][3]
    stopped = ours.generate(ids, pixels, mask, max_new_tokens=10, eos_id=eos)
    assert stopped[0] == free[0][: free[0].index(eos)]
    decode = lambda toks: " ".join(map(str, toks))  # noqa: E731 - a stand-in detokenizer
    marker = str(free[1][4])
    by_string = ours.generate(ids, pixels, mask, max_new_tokens=10, eos_id=-1, stop_strings=[marker], decode=decode)
    cut = next(i for i, t in enumerate(free[1]) if marker in decode(free[1][: i + 1]))
    assert by_string[1] == free[1][: cut + 1]
    with pytest.raises(ValueError, match="decode"):
        ours.generate(ids, pixels, mask, stop_strings=["x"])


def test_prompt_rows_generate_as_their_padded_batch(pair):
    _, ours = pair
    pixels = torch.randn(2, 3, 32, 32)
    for side in (True, False):  # the padding of a tensor batch is dropped, whichever side it is on
        ids, mask = pad(PROMPTS, pad_left=side)
        assert ours.generate(list(PROMPTS), pixels, max_new_tokens=6, eos_id=-1) == \
            ours.generate(ids, pixels, mask, max_new_tokens=6, eos_id=-1)


def test_stop_strings_cut_the_reply_and_hold_back_what_may_change():
    from minillavamed.llava import StopStrings

    stops = StopStrings(["</s>", "###"], decode=None)
    assert stops.cut("  a lesion.</s> more ### x") == "a lesion." and stops.cut(" yes \n### Human") == "yes"
    text = "  the heart is enlarged. ###"
    shown = [stops.visible(text[:n]) for n in range(len(text) + 1)]
    assert all(later.startswith(earlier) for earlier, later in zip(shown, shown[1:]))
    assert shown[-1] == stops.cut(text) == "the heart is enlarged."
    assert stops.visible("the heart ") == "the he" and stops.visible("the    xyz") == "the"  # 4 held, spaces too
    assert stops.visible("abc\ufffd\ufffdwxyz") == "abc"  # a character still being spelled in byte pieces


@pytest.mark.slow
def test_sampling_is_seeded_and_respects_top_k_top_p(pair):
    _, ours = pair
    pixels = torch.randn(2, 3, 32, 32)
    ids, mask = pad(PROMPTS, pad_left=True)
    greedy = ours.generate(ids, pixels, mask, max_new_tokens=8, eos_id=-1)
    assert ours.generate(ids, pixels, mask, max_new_tokens=8, eos_id=-1, temperature=1.0, top_k=1) == greedy
    assert ours.generate(ids, pixels, mask, max_new_tokens=8, eos_id=-1, temperature=1.0, top_p=1e-6) == greedy
    runs = [ours.generate(ids, pixels, mask, max_new_tokens=8, eos_id=-1, temperature=1.5,
                          generator=torch.Generator().manual_seed(s)) for s in (7, 7, 8)]
    assert runs[0] == runs[1] != runs[2]


def test_sample_next_top_p_keeps_the_nucleus():
    from minillavamed.llava import sample_next

    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    g = torch.Generator().manual_seed(0)
    seen = {int(sample_next(logits, 1.0, 0, 0.7, g)) for _ in range(200)}
    assert seen == {0, 1}  # 0.5 alone < 0.7; 0.5 + 0.3 reaches it


def test_attention_backends_agree(pair):
    _, ours = pair
    pixels = torch.randn(2, 3, 32, 32)
    ids, mask = pad(PROMPTS, pad_left=False)
    outs = {}
    for backend in ("naive", "sdpa"):
        ours.set_attention_backend(backend)
        with torch.no_grad():
            outs[backend] = ours(ids, pixels, mask)[0]
    ours.set_attention_backend("sdpa")
    assert_close_scaled(outs["sdpa"], outs["naive"])
    with pytest.raises(ValueError, match="unknown attention backend"):
        ours.set_attention_backend("flash")


def test_packed_rows_equal_separate_rows(pair):
    _, ours = pair
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        separate = [ours(torch.tensor([p]), pixels[i:i + 1])[0][0] for i, p in enumerate(PROMPTS)]
        lengths = [s.shape[0] for s in separate]
        cu = torch.tensor([0, lengths[0], sum(lengths)], dtype=torch.int32)
        packed, _ = ours(torch.tensor([PROMPTS[0] + PROMPTS[1]]), pixels, cu_seqlens=cu, max_seqlen=max(lengths))
    assert_close_scaled(packed[0], torch.cat(separate))


def test_tiny_preset_trains_one_step():
    torch.manual_seed(0)
    model = LlavaMed(preset("tiny"))
    ids = torch.tensor([[1, IMG, 5, 6, 7]])
    labels = torch.tensor([[-100, -100, 5, 6, 7]])
    _, loss = model(ids, torch.randn(1, 3, 64, 64), labels=labels)
    loss.backward()
    assert torch.isfinite(loss)
    assert model.projector.linears[0].weight.grad.abs().sum() > 0
    assert model.vision.blocks[-1].fc1.weight.grad is None  # past the selected layer: frozen, unused


def test_import_is_light():
    code = ("import sys, time; t = time.perf_counter(); import minillavamed; "
            "dt = time.perf_counter() - t; assert 'torch' not in sys.modules, 'imported torch'; print(dt)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert float(out.stdout) < 1.0
