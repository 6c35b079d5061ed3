"""Checkpoints in and out: our format, and the layouts LLaVA-Med's weights are published in.

A model is only "LLaVA-Med" if it runs the released weights. Those come in three layouts, each read through
an explicit map from its key names to ours (no `transformers` at run time):

- llava-hf (`model_type: llava` with `text_config`/`vision_config`): transformers' LlavaForConditionalGeneration.
- original LLaVA / LLaVA-Med v1.5 (`llava_mistral`, `llava_llama`, or `llava` with `mm_projector_type`): an
  LLM checkpoint with `model.mm_projector.*` added; the CLIP vision tower is a separate checkpoint.
- a bare CLIP vision checkpoint plus a bare LLaMA/Mistral checkpoint: the starting point of stage 1 when
  no general-domain LLaVA is at hand; the projector starts fresh.

Our own format is config.json (the LlavaConfig) plus model.safetensors, sharded with an index when large.
Weights are read tensor by tensor and cast on the way in, so a 7B model loads in bf16 without ever holding
an fp32 copy. Loading with `quantize` quantises each linear layer as soon as its weight is in (quantize.py), so
memory holds the quantised model plus one layer; a quantised model saves its int8 / int4 tensors as they are,
with config.json's "quantization" saying how, and loads back without ever seeing a float weight.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn as nn
from safetensors.torch import save_file

from minillavamed.config import ConfigError, DecoderConfig, LlavaConfig, ProjectorConfig, VisionConfig
from minillavamed.conversation import IM_END, IM_PATCH, IM_START
from minillavamed.quantize import QuantConfig, QuantizedLinear, empty_quantized, quantized_names
from minillavamed.tokenizer import Tokenizer

FORMAT = "minillavamed"
# Largest weight file written; past it the tensors go in numbered shards with an index (transformers' default).
SHARD_BYTES = 5 * 2**30


class CheckpointError(ValueError):
    """A checkpoint that does not fit the model: names the file and the key."""


# ------------------------------------------------------------------------------------------------ reading
class WeightFiles:
    """The tensors of one checkpoint directory: a single file or shards listed in an index."""

    def __init__(self, directory: Path):
        self.dir = directory
        self._handles: dict[Path, object] = {}
        index = next((directory / n for n in ("model.safetensors.index.json", "pytorch_model.bin.index.json")
                      if (directory / n).exists()), None)
        if index is not None:
            weight_map = _read_json(index).get("weight_map")
            if not isinstance(weight_map, dict):
                raise CheckpointError(f"{index}: no 'weight_map' in the shard index")
            self.where = {k: directory / f for k, f in weight_map.items()}
        else:
            single = next((directory / n for n in ("model.safetensors", "pytorch_model.bin")
                           if (directory / n).exists()), None)
            if single is None:
                raise CheckpointError(f"{directory}: no model.safetensors, pytorch_model.bin or shard index found")
            self._handles[single] = self._open(single)  # kept: listing the keys already opened it
            self.where = {k: single for k in self._handles[single].keys()}

    def _open(self, file: Path):
        if file.suffix == ".bin":
            # Older CLIP/LLaMA repos ship pickles; weights_only refuses anything but tensors.
            return torch.load(file, map_location="cpu", mmap=True, weights_only=True)
        return SafetensorsFile(file)

    def keys(self):
        return self.where.keys()

    def get(self, key: str) -> torch.Tensor:
        return self.rows(key, None, None)

    def rows(self, key: str, start: int | None, stop: int | None) -> torch.Tensor:
        """Rows start:stop of a tensor (dim 0; None, None: all of it); from safetensors only those are read."""
        handle = self._handle(key)
        try:
            if isinstance(handle, dict):
                return handle[key] if start is None and stop is None else handle[key][start:stop]
            return handle.rows(key, start, stop)
        except KeyError:
            raise CheckpointError(f"{self.where[key]}: no tensor {key!r} in the file its index names") from None

    def shape(self, key: str) -> tuple[int, ...]:
        """The tensor's shape, from the file's header (nothing is read)."""
        handle = self._handle(key)
        try:
            return tuple(handle[key].shape if isinstance(handle, dict) else handle.shape(key))
        except KeyError:
            raise CheckpointError(f"{self.where[key]}: no tensor {key!r} in the file its index names") from None

    def _handle(self, key: str):
        file = self.where[key]
        if file not in self._handles:
            if not file.exists():
                raise CheckpointError(f"{file}: shard named in the index is missing (needed for {key!r})")
            self._handles[file] = self._open(file)
        handle = self._handles[file]
        if len(self._handles) > 1:
            # One pickle shard mapped at a time: the pages read from a closed shard leave the resident set.
            self._handles = {file: handle}
        return handle


_SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                       "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "I64": torch.int64,
                       "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
                       "BOOL": torch.bool}


class SafetensorsFile:
    """One .safetensors file, each tensor read with a plain file read into memory of its own.

    Not memory-mapped on purpose: a mapped file keeps every page read from it in the process's resident set
    for as long as any tensor of the file lives (a norm weight is enough), so a load that quantises or casts
    each weight would hold the whole float checkpoint besides its result (bench/RESULTS.md measured
    RssFile). A tensor read here is freed with its last reference, and the page cache is not resident memory.
    """

    def __init__(self, file: Path):
        self.file = file
        try:
            with open(file, "rb") as f:
                n = int.from_bytes(f.read(8), "little")
                if not 0 < n <= 100_000_000:  # safetensors' own header limit
                    raise ValueError(f"header length {n}")
                header = json.loads(f.read(n))
            size = file.stat().st_size
            header.pop("__metadata__", None)
            self.base, self.tensors = 8 + n, {}
            for key, info in header.items():
                dtype, shape, (begin, end) = _SAFETENSORS_DTYPES[info["dtype"]], info["shape"], info["data_offsets"]
                numel = 1
                for d in shape:
                    numel *= d
                if end - begin != numel * dtype.itemsize or self.base + end > size:
                    raise ValueError(f"tensor {key!r} at bytes {begin}..{end} does not fit its shape or the file")
                self.tensors[key] = (dtype, tuple(shape), begin, end)
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise CheckpointError(f"{file}: not a readable safetensors file ({e})") from None

    def keys(self):
        return self.tensors.keys()

    def shape(self, key: str) -> tuple[int, ...]:
        return self.tensors[key][1]

    def get_tensor(self, key: str) -> torch.Tensor:
        return self.rows(key, None, None)

    def rows(self, key: str, start: int | None, stop: int | None) -> torch.Tensor:
        """Rows start:stop of dim 0 (None, None: the whole tensor): a row-major tensor's rows are one run of
        bytes, so an FSDP rank reads only its own shard."""
        dtype, shape, begin, end = self.tensors[key]
        if start is not None or stop is not None:
            start, stop, _ = slice(start, stop).indices(shape[0])
            stop = max(start, stop)
            row = (end - begin) // shape[0] if shape[0] else 0
            begin, end, shape = begin + start * row, begin + stop * row, (stop - start, *shape[1:])
        data = torch.empty(end - begin, dtype=torch.uint8)
        with open(self.file, "rb") as f:
            f.seek(self.base + begin)
            got = f.readinto(memoryview(data.numpy()))
        if got != end - begin:
            raise CheckpointError(f"{self.file}: cannot read tensor {key!r} (the file ends early)")
        return data.view(dtype).view(shape)


def _read_json(path: Path) -> dict:
    if not path.exists():
        raise CheckpointError(f"{path}: missing")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: invalid JSON ({e})") from None


def _first_prefix(files: WeightFiles, probe: str, candidates: list[str]) -> str | None:
    return next((p for p in candidates if p + probe in files.where), None)


# --------------------------------------------------------------------------------------------- key maps
# Each map lists (our key, their key) pairs for one part, given their prefix. Where we keep several of their
# tensors as one (the decoder's fused query/key/value and gate/up projections), their side is a Joined.
class Joined(NamedTuple):
    """Their tensors `keys`, stacked in this order along dim 0 (`rows` each) into one of ours."""

    keys: tuple[str, ...]
    rows: tuple[int, ...]


def their_keys(theirs: str | Joined) -> tuple[str, ...]:
    return theirs.keys if isinstance(theirs, Joined) else (theirs,)


def vision_keys(cfg: VisionConfig, pre: str) -> list[tuple[str, str | Joined]]:
    pairs: list[tuple[str, str | Joined]] = [("patch_embed.weight", pre + "embeddings.patch_embedding.weight"),
                                             ("cls_token", pre + "embeddings.class_embedding"),
                                             ("pos_embed", pre + "embeddings.position_embedding.weight")]
    for ours, theirs in (("pre_norm", "pre_layrnorm"), ("post_norm", "post_layernorm")):
        pairs += [(f"{ours}.{p}", f"{pre}{theirs}.{p}") for p in ("weight", "bias")]
    names = {"norm1": "layer_norm1", "norm2": "layer_norm2", "fc1": "mlp.fc1", "fc2": "mlp.fc2",
             "attn.wo": "self_attn.out_proj"}
    for i in range(cfg.layers):
        layer = f"{pre}encoder.layers.{i}."
        for p in ("weight", "bias"):
            pairs += [(f"blocks.{i}.{o}.{p}", f"{layer}{t}.{p}") for o, t in names.items()]
            pairs.append((f"blocks.{i}.attn.wqkv.{p}",
                          Joined(tuple(f"{layer}self_attn.{n}_proj.{p}" for n in "qkv"), (cfg.width,) * 3)))
    return [("vision." + o, t) for o, t in pairs]


def decoder_keys(cfg: DecoderConfig, pre: str, head: str) -> list[tuple[str, str | Joined]]:
    pairs: list[tuple[str, str | Joined]] = [("embed.weight", pre + "embed_tokens.weight"),
                                             ("norm.weight", pre + "norm.weight")]
    if not cfg.tie_embeddings:
        pairs.append(("lm_head.weight", head))
    q, kv = cfg.heads * cfg.head_dim, cfg.kv_heads * cfg.head_dim
    for i in range(cfg.layers):
        layer = f"{pre}layers.{i}."
        pairs += [
            (f"blocks.{i}.attn_norm.weight", layer + "input_layernorm.weight"),
            (f"blocks.{i}.attn.wqkv.weight",
             Joined(tuple(f"{layer}self_attn.{n}_proj.weight" for n in "qkv"), (q, kv, kv))),
            (f"blocks.{i}.attn.wo.weight", layer + "self_attn.o_proj.weight"),
            (f"blocks.{i}.mlp_norm.weight", layer + "post_attention_layernorm.weight"),
            (f"blocks.{i}.gate_up.weight",
             Joined((layer + "mlp.gate_proj.weight", layer + "mlp.up_proj.weight"), (cfg.mlp_dim, cfg.mlp_dim))),
            (f"blocks.{i}.down.weight", layer + "mlp.down_proj.weight"),
        ]
    return [("decoder." + o, t) for o, t in pairs]


def projector_keys(cfg: ProjectorConfig, pre: str, style: str) -> list[tuple[str, str]]:
    """style 'hf': linear_1, linear_2; 'llava': an nn.Sequential (0, 2, ...) or a bare Linear."""
    pairs = []
    for i in range(cfg.depth):
        if style == "hf":
            theirs = f"{pre}linear_{i + 1}"
        else:
            theirs = pre.rstrip(".") if cfg.type == "linear" else f"{pre}{2 * i}"
        pairs += [(f"projector.linears.{i}.{p}", f"{theirs}.{p}") for p in ("weight", "bias")]
    return pairs


# Buffers that older transformers versions saved and that carry no weights.
IGNORABLE = ("rotary_emb.inv_freq", "embeddings.position_ids")
# What a full CLIPModel checkpoint holds besides its vision tower.
CLIP_NOT_VISION = ("text_model.", "text_projection.", "visual_projection.", "logit_scale")


# ------------------------------------------------------------------------------------- config converters
def decoder_config_from_hf(c: dict, source: Path) -> DecoderConfig:
    if c.get("hidden_act", "silu") != "silu":
        raise CheckpointError(f"{source}: hidden_act {c['hidden_act']!r} is not SwiGLU's silu")
    heads = c["num_attention_heads"]
    if c.get("head_dim") not in (None, c["hidden_size"] // heads):
        raise CheckpointError(f"{source}: head_dim {c['head_dim']} != hidden_size / num_attention_heads")
    theta = (c.get("rope_parameters") or {}).get("rope_theta", c.get("rope_theta", 10000.0))

    def special(name, default):
        v = c.get(name)
        return (v[0] if isinstance(v, list) else v) if v is not None else default

    return DecoderConfig(
        vocab_size=c["vocab_size"], dim=c["hidden_size"], layers=c["num_hidden_layers"], heads=heads,
        kv_heads=c.get("num_key_value_heads") or heads, mlp_dim=c["intermediate_size"],
        norm_eps=c.get("rms_norm_eps", 1e-6), rope_theta=float(theta),
        max_seq_len=c.get("max_position_embeddings", 4096), tie_embeddings=bool(c.get("tie_word_embeddings", False)),
        bos_id=special("bos_token_id", 1), eos_id=special("eos_token_id", 2), pad_id=special("pad_token_id", 0),
    )


def vision_config_from_hf(c: dict, select_layer: int, select_feature: str) -> VisionConfig:
    return VisionConfig(
        image_size=c["image_size"], patch_size=c["patch_size"], width=c["hidden_size"],
        layers=c["num_hidden_layers"], heads=c["num_attention_heads"], mlp_dim=c["intermediate_size"],
        channels=c.get("num_channels", 3), norm_eps=c.get("layer_norm_eps", 1e-5),
        select_layer=select_layer, select_feature=select_feature,
    )


def _clip_vision_config(directory: Path) -> dict:
    c = _read_json(directory / "config.json")
    c = c.get("vision_config", c)  # a full CLIPModel nests it; a CLIPVisionModel is flat
    if c.get("model_type", "clip_vision_model") != "clip_vision_model":
        raise CheckpointError(f"{directory / 'config.json'}: not a CLIP vision checkpoint")
    return c


def _conv_for(llm_type: str) -> str:
    return "mistral_instruct" if "mistral" in llm_type else "vicuna_v1"


# ------------------------------------------------------------------------------------------------ loading
def load_model(model_class, path, vision_tower=None, dtype=None, device=None, projector: str = "mlp2x_gelu",
               quantize=None):
    """Build `model_class` (LlavaMed, whose from_pretrained calls this) from any supported layout (see the module
    docstring); missing, unexpected or mis-shaped tensors raise CheckpointError naming the key and the file.
    `quantize`: see quantize.py."""
    path = Path(path)
    quantize = None if quantize is None else QuantConfig.parse(quantize)
    if quantize is not None and torch.device(device or "cpu").type != "cpu":
        raise ValueError(f"weight-only {quantize.mode} uses torch's CPU kernels; load it with device='cpu'")
    meta, files = _open_checkpoint(path)
    if meta.get("model_type") == FORMAT and "quantization" in meta:
        return _load_quantized(model_class, path, meta, files, quantize, dtype or torch.float32)
    cfg, sources, fresh = _plan(path, meta, files, vision_tower, projector)
    with torch.device("meta"):
        model = model_class(cfg)
    _fill(model, sources, fresh, dtype or torch.float32, torch.device(device or "cpu"), quantize)
    return model


def read_config(path, vision_tower=None, projector: str = "mlp2x_gelu") -> LlavaConfig:
    """The LlavaConfig `load_model` would build from a checkpoint, read from its config files and the weight
    files' headers (key names; no tensor is read): what training checks its data against before the model
    loads."""
    path = Path(path)
    meta, files = _open_checkpoint(path)
    if meta.get("model_type") == FORMAT and "quantization" in meta:
        return _our_config(path, meta)
    return _plan(path, meta, files, vision_tower, projector)[0]


def _open_checkpoint(path: Path) -> tuple[dict, WeightFiles]:
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a checkpoint directory")
    return _read_json(path / "config.json"), WeightFiles(path)


def _our_config(path: Path, meta: dict) -> LlavaConfig:
    """The LlavaConfig of our format's config.json."""
    try:
        return LlavaConfig.from_dict({k: v for k, v in meta.items() if k not in ("model_type", "quantization")})
    except ConfigError as e:
        raise CheckpointError(f"{path / 'config.json'}: {e}") from None


def _plan(path: Path, meta: dict, files: WeightFiles, vision_tower, projector: str):
    """(config, [(weight files, [(our key, their key)], prefixes of theirs knowingly unused)], parts left at
    random init) for the layout `meta` describes."""
    try:
        return _layout(path, meta, files, vision_tower, projector)
    except ConfigError as e:  # a value of theirs our configs refuse (e.g. mm_vision_select_feature)
        raise CheckpointError(f"{path / 'config.json'}: {e}") from None


def _layout(path: Path, meta: dict, files: WeightFiles, vision_tower, projector: str):
    kind = meta.get("model_type")
    # (files, [(our key, their key)], prefixes of their keys that are knowingly left unused)
    sources: list[tuple[WeightFiles, list[tuple[str, str]], tuple[str, ...]]] = []
    fresh: list[str] = []  # parts that start from random init (the projector of a fresh LLaVA)

    if kind == FORMAT:
        cfg = _our_config(path, meta)
        ours = [o for o, _ in vision_keys(cfg.vision, "") + decoder_keys(cfg.decoder, "", "")
                + projector_keys(cfg.projector, "", "hf")]  # our names: the left side of every key map
        sources.append((files, [(k, k) for k in ours], ()))
    elif kind == "llava" and "text_config" in meta:
        vc, tc = meta["vision_config"], meta["text_config"]
        layer = meta.get("vision_feature_layer", -2)
        if not isinstance(layer, int):
            raise CheckpointError(f"{path / 'config.json'}: vision_feature_layer {layer!r}: "
                                  "only one layer is supported")
        if meta.get("projector_hidden_act", "gelu") != "gelu":
            raise CheckpointError(f"{path / 'config.json'}: projector_hidden_act must be gelu")
        feature = "patch" if meta.get("vision_feature_select_strategy", "default") == "default" else "cls_patch"
        cfg = LlavaConfig(vision=vision_config_from_hf(vc, layer, feature), projector=ProjectorConfig("mlp2x_gelu"),
                          decoder=decoder_config_from_hf(tc, path / "config.json"),
                          conv_template=_conv_for(tc.get("model_type", "llama")), image_aspect_ratio="pad")
        vis = _first_prefix(files, "embeddings.patch_embedding.weight",
                            ["vision_tower.vision_model.", "vision_tower.", "model.vision_tower.vision_model.",
                             "model.vision_tower."])
        lm = _first_prefix(files, "embed_tokens.weight", ["language_model.model.", "model.language_model."])
        proj = _first_prefix(files, "linear_1.weight", ["multi_modal_projector.", "model.multi_modal_projector."])
        head = next((h for h in ("language_model.lm_head.weight", "lm_head.weight") if h in files.where),
                    "lm_head.weight")
        if None in (vis, lm, proj):
            raise CheckpointError(f"{path}: llava-hf config but the weights lack the vision tower, language model "
                                  f"or projector keys")
        sources.append((files, vision_keys(cfg.vision, vis) + decoder_keys(cfg.decoder, lm, head)
                        + projector_keys(cfg.projector, proj, "hf"), ()))
    elif "mm_vision_tower" in meta or "mm_projector_type" in meta or kind in ("llava_llama", "llava_mistral"):
        tower_dir = _find_vision_tower(path, meta, vision_tower)
        layer = meta.get("mm_vision_select_layer", -2)
        feature = meta.get("mm_vision_select_feature", "patch")
        embedded = _first_prefix(files, "embeddings.patch_embedding.weight",
                                 ["model.vision_tower.vision_tower.vision_model."])
        vc = _clip_vision_config(tower_dir) if tower_dir else None
        if vc is None:
            raise CheckpointError(f"{path}: no vision tower: pass vision_tower=DIR (a CLIP checkpoint, "
                                  f"config names {meta.get('mm_vision_tower')!r})")
        # LLaVA-Med v1 (and LLaVA v0) set mm_use_im_start_end and trained on the ### template; their configs
        # name no image_aspect_ratio, and the reference's loaders then resize and crop.
        im_start_end = bool(meta.get("mm_use_im_start_end", False))
        cfg = LlavaConfig(vision=vision_config_from_hf(vc, layer, feature),
                          projector=ProjectorConfig(meta.get("mm_projector_type", "linear")),
                          decoder=decoder_config_from_hf(meta, path / "config.json"),
                          conv_template="llava_med_v1" if im_start_end else _conv_for(kind or ""),
                          image_aspect_ratio=meta.get("image_aspect_ratio") or "crop",
                          mm_use_im_start_end=im_start_end)
        if im_start_end:
            _check_image_markers(path, cfg)
        llm = decoder_keys(cfg.decoder, "model.", "lm_head.weight") + projector_keys(
            cfg.projector, "model.mm_projector.", "llava")
        if embedded and vision_tower is None:
            sources.append((files, llm + vision_keys(cfg.vision, embedded), ()))
        else:  # a tower named by the user wins over one saved inside the checkpoint
            clip = WeightFiles(tower_dir)
            sources += [(files, llm, ("model.vision_tower.",)),
                        (clip, vision_keys(cfg.vision, _clip_prefix(clip, tower_dir)), CLIP_NOT_VISION)]
    elif kind in ("llama", "mistral"):
        if vision_tower is None:
            raise CheckpointError(f"{path}: a bare {kind} checkpoint; pass vision_tower=DIR (a CLIP checkpoint) to "
                                  f"build a fresh LLaVA for stage 1")
        tower_dir = Path(vision_tower)
        vc = _clip_vision_config(tower_dir)
        cfg = LlavaConfig(vision=vision_config_from_hf(vc, -2, "patch"), projector=ProjectorConfig(projector),
                          decoder=decoder_config_from_hf(meta, path / "config.json"), conv_template=_conv_for(kind))
        clip = WeightFiles(tower_dir)
        sources += [(files, decoder_keys(cfg.decoder, "model.", "lm_head.weight"), ()),
                    (clip, vision_keys(cfg.vision, _clip_prefix(clip, tower_dir)), CLIP_NOT_VISION)]
        fresh.append("projector.")
    else:
        raise CheckpointError(f"{path / 'config.json'}: unknown model_type {kind!r}; expected {FORMAT}, llava, "
                              f"llava_llama, llava_mistral, llama or mistral")
    return cfg, sources, fresh


def _load_quantized(model_class, path: Path, meta: dict, files: WeightFiles, quantize, dtype: torch.dtype):
    """A checkpoint save_model wrote from a quantised model: its tensors are the model's state dict."""
    try:
        saved = QuantConfig.parse(meta["quantization"])
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{path / 'config.json'}: bad 'quantization' ({e})") from None
    if quantize is not None and quantize != saved:
        raise CheckpointError(f"{path}: saved quantised as {saved}; asked for {quantize} (load it without quantize, "
                              f"or quantize its bf16 original)")
    cfg = _our_config(path, meta)
    with torch.device("meta"):
        model = model_class(cfg)
    # The layers saved quantised: checkpoints written before the vision tower was quantised keep it in bf16.
    empty_quantized(model, saved, dtype, [n for n in quantized_names(model) if f"{n}.qweight" in files.where])
    model.quantization = saved
    state = model.state_dict(keep_vars=True)
    if cfg.decoder.tie_embeddings:
        state.pop("decoder.lm_head.weight")
    for key in files.keys():
        if key not in state:
            raise CheckpointError(f"{files.where[key]}: unexpected key {key!r}")
    for name, expected in state.items():
        if name not in files.where:
            raise CheckpointError(f"{files.dir}: missing key {name!r}")
        tensor = files.get(name)
        if tensor.shape != expected.shape or tensor.is_floating_point() != expected.is_floating_point():
            raise CheckpointError(f"{files.where[name]}: key {name!r} is {tensor.dtype} {tuple(tensor.shape)}, the "
                                  f"model expects {expected.dtype} {tuple(expected.shape)}")
        tensor = tensor.to(dtype) if tensor.is_floating_point() else tensor.to(expected.dtype)
        owner, _, leaf = name.rpartition(".")
        module = model.get_submodule(owner)
        if leaf in module._parameters:
            module._parameters[leaf] = nn.Parameter(tensor, requires_grad=expected.requires_grad)
        elif isinstance(module, QuantizedLinear) and leaf == "qweight":
            module.load_saved_qweight(tensor)
        else:
            module._buffers[leaf] = tensor
    if cfg.decoder.tie_embeddings:
        model.decoder.lm_head.weight = model.decoder.embed.weight
    return model


def _check_image_markers(path: Path, cfg: LlavaConfig) -> None:
    """A v1 checkpoint's tokenizer must hold <im_start>, <im_patch>, <im_end> with embedding rows."""
    if not (path / "tokenizer.model").exists():
        return  # the tokenizer comes from elsewhere; tokenize_prompt checks it then
    added = Tokenizer(path).added
    for token in (IM_START, IM_PATCH, IM_END):
        if token not in added:
            raise CheckpointError(f"{path}: config.json sets mm_use_im_start_end but the tokenizer files there "
                                  f"(added_tokens.json / tokenizer_config.json) define no {token}; copy the "
                                  f"released v1 tokenizer files beside tokenizer.model")
        if added[token] >= cfg.decoder.vocab_size:
            raise CheckpointError(f"{path}: {token} has id {added[token]} but the embeddings have only "
                                  f"{cfg.decoder.vocab_size} rows")


def add_image_markers(model, tokenizer) -> None:
    """Turn on LLaVA-Med v1's mm_use_im_start_end for a model that lacks it, as v1.0's
    initialize_vision_tokenizer did: <im_patch>, <im_start>, <im_end> join the tokenizer (those it lacks),
    and the embedding and output matrices grow to cover them, new rows set to the mean of the old ones."""
    tokenizer.add_tokens([IM_PATCH, IM_START, IM_END])
    d = model.cfg.decoder
    rows = max(max(tokenizer.added.values()) + 1, d.vocab_size)
    if rows > d.vocab_size:
        embed, head = model.decoder.embed, model.decoder.lm_head
        grown = torch.cat([embed.weight.data, embed.weight.data.float().mean(0, keepdim=True)
                           .to(embed.weight.dtype).expand(rows - d.vocab_size, -1)])
        embed.weight = nn.Parameter(grown, requires_grad=embed.weight.requires_grad)
        embed.num_embeddings = rows
        if d.tie_embeddings:
            head.weight = embed.weight
        else:
            w = head.weight.data
            head.weight = nn.Parameter(torch.cat([w, w.float().mean(0, keepdim=True).to(w.dtype)
                                                  .expand(rows - d.vocab_size, -1)]),
                                       requires_grad=head.weight.requires_grad)
        head.out_features = rows
        d.vocab_size = rows
    model.cfg.mm_use_im_start_end = True


def check_vocab(cfg: LlavaConfig, tokenizer_vocab: int, where) -> int:
    """Compare the model's vocabulary with its tokenizer's. Fewer rows than pieces is an error (the tokenizer
    makes ids the embedding lacks); extra rows (llava-hf's `<image>` token, padding to a multiple) are
    returned, for generation to mask: the tokenizer cannot decode them."""
    rows = cfg.decoder.vocab_size
    if rows < tokenizer_vocab:
        raise CheckpointError(f"{where}: the model has {rows} vocabulary rows but its tokenizer.model has "
                              f"{tokenizer_vocab} pieces; the tokenizer belongs to another model")
    return rows - tokenizer_vocab


def _find_vision_tower(path: Path, meta: dict, given) -> Path | None:
    if given is not None:
        return Path(given)
    named = meta.get("mm_vision_tower")
    for candidate in (named, path / str(named)) if named else ():
        if Path(candidate).is_dir() and (Path(candidate) / "config.json").exists():
            return Path(candidate)
    return None


def _clip_prefix(clip: WeightFiles, directory: Path) -> str:
    pre = _first_prefix(clip, "embeddings.patch_embedding.weight", ["vision_model.", "", "vision_tower.vision_model."])
    if pre is None:
        raise CheckpointError(f"{directory}: no CLIP vision weights (vision_model.embeddings.patch_embedding.weight)")
    return pre


def _fill(model: nn.Module, sources, fresh: list[str], dtype: torch.dtype, device: torch.device, quantize=None) -> None:
    """Replace every meta parameter with its checkpoint tensor (cast to dtype, moved to device); with `quantize`
    (a QuantConfig), the model is allocated first and each linear layer it covers is quantised into place as soon
    as its last parameter is read."""
    params = dict(model.named_parameters())
    order = quantized_names(model) if quantize is not None else []
    to_quantize = set(order)
    wanted = {k for k in params if not any(k.startswith(f) for f in fresh)}
    if model.cfg.decoder.tie_embeddings:
        wanted.discard("decoder.lm_head.weight")
    if quantize is not None:
        # Everything the quantised model keeps is allocated before the first read: each float weight read after
        # it is then a temporary the allocator takes back whole. Kept tensors allocated between reads pin freed
        # ones, and a 7B int4 load's peak varied by 0.5 GiB from run to run (bench/RESULTS.md, issue 17).
        empty_quantized(model, quantize, dtype, order)
        model.to(dtype).to_empty(device=device)  # .to(dtype) on the meta device: the params' dtype, no memory
    floats: dict[str, dict[str, torch.Tensor]] = {}  # a quantised layer's float weight and bias, until both are in
    with torch.no_grad():
        for files, pairs, unused in sources:
            _check_unexpected(files, pairs, unused)
            for ours, theirs in pairs:
                tensor = _read(files, ours, theirs, tuple(params[ours].shape)).to(device=device, dtype=dtype)
                wanted.discard(ours)
                owner, _, leaf = ours.rpartition(".")
                if owner in to_quantize:
                    floats.setdefault(owner, {})[leaf] = tensor
                    layer = model.get_submodule(owner)
                    if len(floats[owner]) == 1 + (layer.bias is not None):
                        layer.fill_(**floats.pop(owner))
                        to_quantize.discard(owner)
                elif quantize is not None:
                    getattr(model.get_submodule(owner), leaf).copy_(tensor)
                else:
                    _set_param(model, ours, tensor)
    if wanted:
        raise CheckpointError(f"no tensor found for {sorted(wanted)[:5]}{'...' if len(wanted) > 5 else ''}")
    # Materialize and initialize the parts that start from scratch (a quantised load allocated them above).
    for prefix in fresh:
        module = model.get_submodule(prefix.rstrip("."))
        if quantize is None:
            module.to_empty(device=device)
            module.to(dtype)
        for m in module.modules():
            if isinstance(m, nn.Linear):
                m.reset_parameters()  # PyTorch's default init, as LLaVA's freshly built projector gets
    if model.cfg.decoder.tie_embeddings:
        model.decoder.lm_head.weight = model.decoder.embed.weight
    for owner in (n for n in order if n in to_quantize):  # the fresh ones, from the same default init in order
        layer = model.get_submodule(owner)
        init = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None, device=device, dtype=dtype)
        layer.fill_(init.weight, init.bias)
    if quantize is not None:
        model.quantization = quantize


def _check_unexpected(files: WeightFiles, pairs, unused: tuple[str, ...]) -> None:
    mapped = {key for _, theirs in pairs for key in their_keys(theirs)}
    for key in files.keys():
        if key not in mapped and not key.endswith(IGNORABLE) and not key.startswith(unused):
            raise CheckpointError(f"{files.where[key]}: unexpected key {key!r}")


def fill_shards(model: nn.Module, path, vision_tower=None, projector: str = "mlp2x_gelu") -> None:
    """Fill a model built on the meta device from `path` (any layout load_model reads) after FSDP2's
    fully_shard and to_empty: each process reads from the checkpoint files only the rows of its own
    dim-0 shard of each parameter, tensor by tensor, cast to that parameter's dtype, so that no process ever
    holds a whole model. Fresh parts (the projector of a bare LLM + CLIP) are initialised whole on the host
    in fp32 (they are small) and sliced."""
    from torch.distributed.tensor import DTensor, Shard

    path = Path(path)
    meta, files = _open_checkpoint(path)
    _, sources, fresh = _plan(path, meta, files, vision_tower, projector)
    where = {}
    for source, pairs, unused in sources:
        _check_unexpected(source, pairs, unused)
        where.update({ours: (source, theirs) for ours, theirs in pairs})
    initial = {}
    for prefix in fresh:  # PyTorch's default init, as load_model gives them: each linear layer built whole
        for name, m in model.get_submodule(prefix.rstrip(".")).named_modules(prefix=prefix.rstrip(".")):
            if isinstance(m, nn.Linear):
                whole = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None, device="cpu")
                initial.update(whole.named_parameters(prefix=name))
    with torch.no_grad():
        for name, param in model.named_parameters():
            local, start, stop = param, None, None
            if isinstance(param, DTensor):
                if param.placements != (Shard(0),):
                    raise ValueError(f"{name}: placements {param.placements}; fill_shards reads dim-0 shards only")
                rows, world = param.shape[0], param.device_mesh.size()
                size = -(-rows // world)  # torch.chunk's split, as FSDP2 shards
                start = min(param.device_mesh.get_local_rank() * size, rows)
                stop = min(start + size, rows)
                local = param.to_local()
            if name in initial:
                local.copy_(initial[name][start:stop].to(local.dtype))
                continue
            if name not in where:
                raise CheckpointError(f"{path}: no tensor found for {name}")
            source, theirs = where[name]
            tensor = _read(source, name, theirs, tuple(param.shape), start, stop)
            if tuple(tensor.shape) != tuple(local.shape):
                raise RuntimeError(f"{name}: read {tuple(tensor.shape)} for a local shard of {tuple(local.shape)}")
            local.copy_(tensor.to(local.dtype))


def _read(files: WeightFiles, ours: str, theirs, shape: tuple[int, ...], start: int | None = None,
          stop: int | None = None) -> torch.Tensor:
    """Rows start:stop (None, None: all) of our parameter `ours`, of `shape`, from its checkpoint key; a Joined
    one is several keys' rows one after another, of which only those in start:stop are read. Each key's shape
    is checked against the model's from the file's header before anything is read."""
    parts = zip(theirs.keys, theirs.rows) if isinstance(theirs, Joined) else [(theirs, shape[0] if shape else 0)]
    pieces, offset = [], 0
    for key, n in parts:
        expected = (n, *shape[1:]) if shape else ()
        if key not in files.where:
            raise CheckpointError(f"{files.dir}: missing key {key!r} (for {ours})")
        if files.shape(key) != expected:
            raise CheckpointError(f"{files.where[key]}: key {key!r} has shape {files.shape(key)}, "
                                  f"the model expects {expected}")
        if start is None:
            pieces.append(files.get(key))
        elif max(start, offset) < min(stop, offset + n):  # this part holds some of the rows asked for
            pieces.append(files.rows(key, max(start, offset) - offset, min(stop, offset + n) - offset))
        offset += n
    return pieces[0] if len(pieces) == 1 else torch.cat(pieces) if pieces else torch.empty(0, *shape[1:])


def _set_param(model: nn.Module, name: str, tensor: torch.Tensor) -> None:
    owner, _, leaf = name.rpartition(".")
    module = model.get_submodule(owner)
    old = getattr(module, leaf)
    setattr(module, leaf, nn.Parameter(tensor, requires_grad=old.requires_grad))


# ------------------------------------------------------------------------------------------------ writing
def _write_tensors(tensors: dict[str, torch.Tensor], directory: Path, max_shard_bytes: int) -> None:
    """model.safetensors, or shards plus model.safetensors.index.json when the total exceeds max_shard_bytes."""
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    if total <= max_shard_bytes:
        save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})
        return
    shards, current, size = [], {}, 0
    for k, t in tensors.items():
        n = t.numel() * t.element_size()
        if current and size + n > max_shard_bytes:
            shards.append(current)
            current, size = {}, 0
        current[k], size = t, size + n
    shards.append(current)
    weight_map = {}
    for i, shard in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(directory / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in shard})
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def save_model(model, path, max_shard_bytes: int = SHARD_BYTES) -> None:
    """Our format: config.json (model_type minillavamed + the LlavaConfig) and the weights."""
    save_state(model.cfg, model.state_dict(), path, max_shard_bytes, getattr(model, "quantization", None))


def save_state(cfg: LlavaConfig, state: dict[str, torch.Tensor], path, max_shard_bytes: int = SHARD_BYTES,
               quantization=None) -> None:
    """save_model for a state dict gathered elsewhere (e.g. from FSDP shards); `quantization`: a QuantConfig."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    if cfg.decoder.tie_embeddings:
        state = {k: v for k, v in state.items() if k != "decoder.lm_head.weight"}  # loading re-ties it
    extra = {} if quantization is None else {"quantization": quantization.to_dict()}
    (path / "config.json").write_text(json.dumps({"model_type": FORMAT, **cfg.to_dict(), **extra}, indent=2))
    _write_tensors(state, path, max_shard_bytes)


def export_llava_hf(model, path, max_shard_bytes: int = SHARD_BYTES) -> None:
    """Write the transformers llava-hf layout, so that LlavaForConditionalGeneration opens a trained model.

    llava-hf marks image positions with a real token id, so the vocabulary grows by one row for it (id =
    old vocab size). Its embedding and output rows are the means of the others: the new logit is then the
    mean logit, which can never win a greedy step.
    """
    cfg: LlavaConfig = model.cfg
    if getattr(model, "quantization", None) is not None:
        raise ValueError("llava-hf holds float weights; export the model before quantising it")
    if cfg.projector.depth != 2:
        raise ValueError(f"llava-hf has a two-layer projector; {cfg.projector.type!r} cannot be exported to it")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    state = model.state_dict()
    pairs = (vision_keys(cfg.vision, "vision_tower.vision_model.")
             + decoder_keys(cfg.decoder, "language_model.model.", "language_model.lm_head.weight")
             + projector_keys(cfg.projector, "multi_modal_projector.", "hf"))
    tensors = {}
    for ours, theirs in pairs:
        if isinstance(theirs, Joined):
            tensors.update(zip(theirs.keys, state[ours].split(list(theirs.rows))))
        elif ours in state:
            tensors[theirs] = state[ours]
    image_id = cfg.decoder.vocab_size
    for key in ("language_model.model.embed_tokens.weight", "language_model.lm_head.weight"):
        if key in tensors:
            w = tensors[key]
            tensors[key] = torch.cat([w, w.float().mean(0, keepdim=True).to(w.dtype)])
    d, v = cfg.decoder, cfg.vision
    text_type = "mistral" if cfg.conv_template == "mistral_instruct" else "llama"
    config = {
        "architectures": ["LlavaForConditionalGeneration"], "model_type": "llava",
        "image_token_index": image_id, "projector_hidden_act": "gelu",
        "vision_feature_layer": v.select_layer,
        "vision_feature_select_strategy": "default" if v.select_feature == "patch" else "full",
        "image_seq_length": v.num_patches, "tie_word_embeddings": d.tie_embeddings,
        "text_config": {
            "model_type": text_type, "vocab_size": d.vocab_size + 1, "hidden_size": d.dim,
            "num_hidden_layers": d.layers, "num_attention_heads": d.heads, "num_key_value_heads": d.kv_heads,
            "intermediate_size": d.mlp_dim, "rms_norm_eps": d.norm_eps, "rope_theta": d.rope_theta,
            "max_position_embeddings": d.max_seq_len, "hidden_act": "silu", "tie_word_embeddings": d.tie_embeddings,
            "bos_token_id": d.bos_id, "eos_token_id": d.eos_id, "pad_token_id": d.pad_id,
            **({"sliding_window": None} if text_type == "mistral" else {}),
        },
        "vision_config": {
            "model_type": "clip_vision_model", "hidden_size": v.width, "intermediate_size": v.mlp_dim,
            "num_hidden_layers": v.layers, "num_attention_heads": v.heads, "image_size": v.image_size,
            "patch_size": v.patch_size, "num_channels": v.channels, "layer_norm_eps": v.norm_eps,
            "hidden_act": "quick_gelu",
        },
    }
    (path / "config.json").write_text(json.dumps(config, indent=2))
    _write_tensors(tensors, path, max_shard_bytes)
