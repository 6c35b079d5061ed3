"""LLaVA-Med, the whole model (paper §4, Fig. 3): image features spliced into the word embeddings.

The prompt carries one sentinel id (IMAGE_TOKEN_INDEX, -200) per image where the chat template put
`<image>`. The vision tower encodes the image, the projector maps its patch features into the decoder's
embedding space, and those vectors take the sentinel's place, so that one id in `input_ids` becomes
`num_patches` positions in the sequence the decoder sees. Labels of image positions are IGNORE_INDEX: the
model is only ever trained to produce text (captions in stage 1, answers in stage 2).
With LLaVA-Med v1's layout (config mm_use_im_start_end) the sentinel sits between the ordinary tokens
<im_start> and <im_end>, so the same splice gives what v1.0 computed by overwriting the embeddings of its
run of <im_patch> tokens with the patch features.

`generate()` is the one sampling routine of the project (sample.py and evaluation both use it): a batched,
left-padded prefill (`prefill()`, which the server's continuous batching also starts from) followed by one
cached step per new token (`decode_step()`, the server's too; `compile_decoding()` compiles it). `splice` is
the one place prompt rows are padded; `StopStrings` is the one rule for where a reply ends, what it keeps and
what of it may be streamed early.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from minillavamed import checkpoint
from minillavamed.attention import BACKENDS
from minillavamed.config import IGNORE_INDEX, IMAGE_TOKEN_INDEX, LlavaConfig
from minillavamed.decoder import Decoder, KVCache
from minillavamed.gemm import linear
from minillavamed.projector import Projector
from minillavamed.quantize import QuantConfig, quantize_model
from minillavamed.vit import VisionTower


class LlavaMed(nn.Module):
    def __init__(self, cfg: LlavaConfig):
        super().__init__()
        self.cfg = cfg
        self.vision = VisionTower(cfg.vision)
        self.projector = Projector(cfg.projector, cfg.vision.width, cfg.decoder.dim)
        self.decoder = Decoder(cfg.decoder)
        self.quantization = None  # a QuantConfig once quantize() has replaced the linear layers
        self.apply(_init_weights)

    # ---- loading and saving live in checkpoint.py (which knows files and layouts); these are the entry points ----
    @classmethod
    def from_pretrained(cls, path, vision_tower=None, dtype=None, device=None, projector: str = "mlp2x_gelu",
                        quantize=None):
        """Load any layout checkpoint.py reads: ours, llava-hf, original LLaVA(-Med), or a bare LLaMA/Mistral
        checkpoint plus `vision_tower` (a CLIP checkpoint) with a fresh `projector` for stage 1.

        `quantize` ("int8", "int4", "int4-<group>" or a QuantConfig) quantises each layer as soon as it is
        read, so that memory never holds more than one layer in `dtype` besides the quantised rest."""
        return checkpoint.load_model(cls, path, vision_tower=vision_tower, dtype=dtype, device=device,
                                     projector=projector, quantize=quantize)

    def save_pretrained(self, path, max_shard_bytes: int = checkpoint.SHARD_BYTES) -> None:
        checkpoint.save_model(self, path, max_shard_bytes=max_shard_bytes)

    def quantize(self, mode="int8") -> "LlavaMed":
        """Weight-only int8 / int4 for CPU sampling, in place (see quantize.py); returns the model."""
        if self.quantization is not None:
            raise ValueError(f"the model is already quantised ({self.quantization.mode})")
        self.quantization = QuantConfig.parse(mode)
        quantize_model(self, self.quantization)
        return self

    def set_attention_backend(self, backend: str) -> None:
        if backend not in BACKENDS:
            raise ValueError(f"unknown attention backend {backend!r}; choose one of {BACKENDS}")
        self.vision.backend = self.decoder.backend = backend

    # ---- the model ----
    def image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(images, 3, H, W) -> (images, num_patches, dim): what replaces each image sentinel."""
        return self.projector(self.vision(pixel_values))

    def splice(self, input_ids, pixel_values=None, attention_mask=None, labels=None, pad_left=False):
        """Embed the prompt rows with each sentinel replaced by its image's features, in order of appearance.

        `input_ids` is a (batch, T) tensor whose real tokens `attention_mask` marks (all of them without one),
        or a list of rows of their own lengths (prompts for generation). Returns (embeds, key_padding_mask,
        positions, labels) with the rows laid out here, padded on the right, or on the left for generation
        (every row's next token in the same column): a sentinel grows into tokens_per_image positions, so
        any padding of `input_ids` is dropped first. Positions count real tokens only, as transformers'
        generate does, so that padding never shifts RoPE.
        """
        if torch.is_tensor(input_ids):
            keep = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
            id_rows = [ids[k] for ids, k in zip(input_ids, keep)]
            label_rows = None if labels is None else [lab[k] for lab, k in zip(labels, keep)]
        else:
            device = self.decoder.embed.weight.device
            id_rows = [torch.tensor(r, dtype=torch.long, device=device) for r in input_ids]
            label_rows = None if labels is None else [torch.tensor(r, dtype=torch.long, device=device) for r in labels]
        batch, flat = len(id_rows), torch.cat(id_rows)
        is_image = flat == IMAGE_TOKEN_INDEX
        n_images = int(is_image.sum())
        n_given = 0 if pixel_values is None else pixel_values.shape[0]
        if n_images != n_given:
            raise ValueError(f"input_ids hold {n_images} image sentinel(s) ({IMAGE_TOKEN_INDEX}) but "
                             f"{n_given} image(s) were given")
        text = self.decoder.embed(flat.masked_fill(is_image, 0)).split([len(r) for r in id_rows])
        features = self.image_features(pixel_values).to(text[0].dtype) if n_images else None
        rows, row_labels, used = [], [], 0
        for b in range(batch):
            ids, emb = id_rows[b], text[b]
            lab = label_rows[b] if label_rows is not None else None
            pieces, lab_pieces, start = [], [], 0
            for p in (ids == IMAGE_TOKEN_INDEX).nonzero()[:, 0].tolist():
                pieces += [emb[start:p], features[used]]
                if lab is not None:
                    lab_pieces += [lab[start:p], lab.new_full((features.shape[1],), IGNORE_INDEX)]
                used, start = used + 1, p + 1
            rows.append(torch.cat(pieces + [emb[start:]]))
            if lab is not None:
                row_labels.append(torch.cat(lab_pieces + [lab[start:]]))
        length = max(r.shape[0] for r in rows)
        embeds = text[0].new_zeros(batch, length, text[0].shape[-1])
        new_mask = torch.zeros(batch, length, dtype=torch.bool, device=flat.device)
        new_labels = None if labels is None else flat.new_full((batch, length), IGNORE_INDEX)
        for b, r in enumerate(rows):
            span = slice(length - r.shape[0], length) if pad_left else slice(0, r.shape[0])
            embeds[b, span], new_mask[b, span] = r, True
            if labels is not None:
                new_labels[b, span] = row_labels[b]
        positions = (new_mask.long().cumsum(-1) - 1).clamp(min=0)
        return embeds, new_mask, positions, new_labels

    def forward(self, input_ids, pixel_values=None, attention_mask=None, labels=None,
                cu_seqlens=None, max_seqlen=None):
        """Without `labels`: the logits (batch, seqlen after splicing, vocab) and None. With them: the logits of
        the positions the loss scores, (scored, vocab) in order, and the mean next-token loss over those.

        Only the scored positions go through the output layer: in stage 1 a caption is a few dozen of a
        row's positions (576 image positions at 7B), and the logits of the rest, in fp32 over the vocabulary,
        would cost more memory than any other activation. The loss is the same mean as over every position
        with the rest ignored, as LLaVA computes it. Selecting them waits once for the device (the count of
        scored positions sets the output layer's shape).

        With `cu_seqlens` the single row holds several samples packed back to back (boundaries counted
        after splicing); positions restart at each boundary and attention never crosses one.
        """
        embeds, mask, positions, labels = self.splice(input_ids, pixel_values, attention_mask, labels)
        if cu_seqlens is not None:
            if embeds.shape[0] != 1:
                raise ValueError("packed rows (cu_seqlens) need a batch of one row")
            lengths = cu_seqlens[1:] - cu_seqlens[:-1]
            starts = torch.repeat_interleave(cu_seqlens[:-1].to(positions.device), lengths.to(positions.device))
            positions = (torch.arange(embeds.shape[1], device=positions.device) - starts)[None]
        # Rows are right-padded, so under the causal mask no real token can see padding: no key mask needed.
        hidden = self.decoder(embeds, positions, None, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen)
        if labels is None:
            return self.decoder.lm_head(hidden), None
        targets = labels[:, 1:]
        scored = targets != IGNORE_INDEX
        logits = self.decoder.lm_head(hidden[:, :-1][scored])
        return logits, F.cross_entropy(logits.float(), targets[scored])

    def flops(self, text_tokens: int, images: int, seq_len: int, scored: int) -> int:
        """Model FLOPs of one training forward and backward over `text_tokens` text positions and `images`
        images, in rows of `seq_len` decoder positions, `scored` of them through the output layer (forward
        with labels; batches.count_tokens counts them): for MFU, as PaLM's appendix B counts them.

        Forward: 2 per multiply-add of every matrix product; the vision blocks past the selected layer never
        run. Backward: the same again for a product's input gradient wherever something upstream of it
        trains, and again for its weight gradient where the weight trains; nothing for the frozen vision
        tower of stages 1-2, which no gradient reaches. Attention is counted whole (no causal savings), and
        its backward as twice its forward, as for any product of two tensors that both need gradients.
        Norms, activations and the loss are not products and are left out. This is what
        torch.utils.flop_counter counts for an un-fused attention (the tests check it on the tiny preset).
        """
        v, grad = self.cfg.vision, False  # grad: whether the activations flowing here need a gradient

        def product(weight, positions):
            nonlocal grad
            forward = 2 * weight.numel() * positions
            cost = forward * (1 + grad + weight.requires_grad)
            grad = grad or weight.requires_grad
            return cost

        def attention(positions, length, width):  # every position against the `length` of its row
            return 4 * positions * length * width * (1 + 2 * grad)

        def trains(*modules):
            return any(p.requires_grad for m in modules for p in m.parameters(recurse=False))

        total = 0
        if images:
            tower = self.vision
            positions = images * (v.num_patches + 1)
            total += product(tower.patch_embed.weight, images * v.num_patches)
            grad = grad or tower.cls_token.requires_grad or tower.pos_embed.requires_grad or trains(tower.pre_norm)
            for block in tower.blocks[: tower.n_run]:
                grad = grad or trains(block.norm1)
                total += product(block.attn.wqkv.weight, positions) + attention(positions, v.num_patches + 1, v.width)
                total += product(block.attn.wo.weight, positions)
                grad = grad or trains(block.norm2)
                total += product(block.fc1.weight, positions) + product(block.fc2.weight, positions)
            per_image = v.tokens_per_image
            for layer in self.projector.linears:
                total += product(layer.weight, images * per_image)
            tokens = text_tokens + images * per_image
        else:
            tokens = text_tokens
        dec = self.decoder
        grad = (grad and images > 0) or dec.embed.weight.requires_grad
        for block in dec.blocks:
            grad = grad or trains(block.attn_norm)
            total += product(block.attn.wqkv.weight, tokens)
            total += attention(tokens, seq_len, block.attn.heads * block.attn.head_dim)
            total += product(block.attn.wo.weight, tokens)
            grad = grad or trains(block.mlp_norm)
            total += product(block.gate_up.weight, tokens) + product(block.down.weight, tokens)
        grad = grad or trains(dec.norm)
        return total + product(dec.lm_head.weight, scored)

    @torch.inference_mode()
    def prefill(self, input_ids, pixel_values=None, attention_mask=None, room: int = 0):
        """The prompts through the model at once, as generation begins: spliced and left-padded, their keys and
        values cached with `room` positions to spare. Returns (each row's next-token logits (batch, vocab) in
        fp32, the KVCache, the key padding mask (batch, cached length), each row's last position (batch, 1))."""
        embeds, mask, positions, _ = self.splice(input_ids, pixel_values, attention_mask, pad_left=True)
        batch, length = mask.shape
        cache = KVCache(self.cfg.decoder, batch, length + room, embeds.dtype, embeds.device)
        hidden = self.decoder(embeds, positions, None if bool(mask.all()) else mask, cache, last_only=True)
        return linear(hidden[:, -1], self.decoder.lm_head).float(), cache, mask, positions[:, -1:]

    @torch.inference_mode()
    def generate(
        self,
        input_ids: torch.Tensor | Sequence[Sequence[int]],
        pixel_values: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        *,
        max_new_tokens: int = 256,
        temperature: float = 0.0,
        top_p: float = 1.0,
        top_k: int = 0,
        eos_id: int | None = None,
        stop_strings: Sequence[str] = (),
        decode: Callable[[list[int]], str] | None = None,
        generator: torch.Generator | None = None,
        on_token: Callable[[torch.Tensor, list[bool]], None] | None = None,
        vocab_size: int | None = None,
    ) -> list[list[int]]:
        """New token ids for each prompt row (EOS excluded), `temperature` 0 meaning greedy. The prompts are a
        (batch, T) tensor with `attention_mask`, or a list of rows (see splice).

        A row stops at `eos_id` (default: the config's) or once its decoded text contains one of
        `stop_strings` (which needs `decode`); the stop string's tokens are kept for the caller to cut.
        `on_token(tokens, active)` sees each step's tokens (batch,) and which rows (a list of bools) were
        still running, for streaming. With `vocab_size` (the tokenizer's), ids past it are never chosen: a
        llava-hf checkpoint's `<image>` row, for one, has no piece to decode.
        """
        if stop_strings and decode is None:
            raise ValueError("stop_strings need a decode function to read the generated text")
        eos_id = self.cfg.decoder.eos_id if eos_id is None else eos_id
        stops = StopStrings(stop_strings, decode)
        logits, cache, mask, positions = self.prefill(input_ids, pixel_values, attention_mask, room=max_new_tokens)
        batch = mask.shape[0]
        # Padded rows need a key mask; it is allocated once with room for the new (real) tokens, so that each
        # step passes a longer view of it.
        mask = torch.cat([mask, mask.new_ones(batch, max_new_tokens)], dim=1) if not bool(mask.all()) else None
        out: list[list[int]] = [[] for _ in range(batch)]
        active = [True] * batch
        for step in range(max_new_tokens):
            tokens = sample_next(logits, temperature, top_k, top_p, generator, vocab_size)
            if on_token is not None:
                on_token(tokens, list(active))
            for b, t in enumerate(tokens.tolist()):  # one device sync per step, then plain Python
                if not active[b]:
                    continue
                if t == eos_id:
                    active[b] = False
                    continue
                out[b].append(t)
                if stops.reached(out[b]):
                    active[b] = False
            if not any(active) or step == max_new_tokens - 1:
                break
            positions = positions[:, -1:] + 1
            logits = self.decode_step(tokens, positions, None if mask is None else mask[:, :cache.length + 1], cache)
        return out

    def decode_step(self, tokens: torch.Tensor, positions: torch.Tensor, key_padding_mask: torch.Tensor | None,
                    cache: KVCache) -> torch.Tensor:
        """One new token per row, (batch,) at `positions` (batch, 1), through the cached decoder -> the next
        token's logits (batch, vocab) in fp32. `key_padding_mask` (batch, cached + 1) marks real tokens."""
        hidden = self.decoder(self.decoder.embed(tokens[:, None]), positions, key_padding_mask, cache)
        return linear(hidden[:, -1], self.decoder.lm_head).float()

    def compile_decoding(self) -> "LlavaMed":
        """Decode steps through torch.compile from now on (generate's and the server's), for small models on a
        CPU: a tiny decode step is mostly the cost of calling each of its operators, which the compiled step
        fuses away (bench/sample_speed.py --compile). A 7B's step is bound by streaming its weights and gains
        nothing. The first steps compile (7-18 s for the tiny preset on 2 cores), and again, once each, for the
        first batch of several rows, padded rows and a longer cache; the prefill stays eager. Returns the model."""
        # Dynamic shapes: a cache that grows every step and batches of any size share a few graphs, not one each.
        self.decode_step = torch.compile(self.decode_step, dynamic=True)
        return self


class StopStrings:
    """Where a reply ends besides EOS: at the first of `strings` in its text (a template's, and a request's).
    One rule for when generation stops a row, what the reply keeps, and what may be streamed before it ends."""

    def __init__(self, strings: Sequence[str], decode: Callable[[list[int]], str] | None):
        self.strings, self.decode = tuple(strings), decode
        self.hold = max((len(s) for s in self.strings), default=0)  # characters that may begin a stop string

    def reached(self, tokens: list[int]) -> bool:
        """Whether the text of a reply's `tokens` holds a stop string; only the last few tokens, enough to
        spell any of them, are decoded."""
        return bool(self.strings) and any(s in self.decode(tokens[-(self.hold + 4):]) for s in self.strings)

    def cut(self, text: str) -> str:
        """The reply: `text` up to the first stop string, stripped."""
        for s in self.strings:
            text = text.split(s)[0].strip()
        return text.strip()

    def visible(self, text: str) -> str:
        """What of an unfinished reply may be shown, a prefix of the reply whatever comes next: without the
        last characters (they may begin a stop string), trailing spaces (the reply is stripped) and a character
        still being spelled out in byte pieces (decoded as U+FFFD so far)."""
        text = text.lstrip()
        return text[:max(0, len(text) - self.hold)].rstrip().rstrip("\ufffd")


def sample_next(logits: torch.Tensor, temperature: float, top_k: int, top_p: float,
                generator: torch.Generator | None = None, vocab_size: int | None = None) -> torch.Tensor:
    """One token per row from (batch, vocab) logits: argmax at temperature 0, else top-k / top-p sampling;
    rows past `vocab_size` (ids the tokenizer cannot decode) are never chosen."""
    if vocab_size is not None and vocab_size < logits.shape[-1]:
        logits = logits.clone()
        logits[:, vocab_size:] = float("-inf")
    if temperature <= 0:
        return logits.argmax(dim=-1)
    logits = logits / temperature
    if top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        # Keep the smallest set of most likely tokens whose probability reaches top_p (the nucleus).
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        outside = probs.cumsum(dim=-1) - probs > top_p
        logits = logits.scatter(1, order, sorted_logits.masked_fill(outside, float("-inf")))
    return torch.multinomial(logits.softmax(dim=-1), 1, generator=generator)[:, 0]


def _init_weights(module: nn.Module) -> None:
    """GPT-2/LLaMA-style init for training from scratch (the tiny preset); checkpoints overwrite it."""
    if isinstance(module, (nn.Linear, nn.Embedding, nn.Conv2d)):
        nn.init.normal_(module.weight, std=0.02)
        if getattr(module, "bias", None) is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, VisionTower):
        nn.init.normal_(module.cls_token, std=0.02)
        nn.init.normal_(module.pos_embed, std=0.02)
