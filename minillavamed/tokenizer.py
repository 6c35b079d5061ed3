"""The language model's tokenizer (paper §4: the LLM's own vocabulary, LLaMA / Mistral SentencePiece).

LLaVA tokenizes with transformers' slow `LlamaTokenizer`. That tokenizer does these things on top of
SentencePiece, and we do exactly those:
  1. it cuts the text at the literal special-token strings "<unk>", "<s>", "</s>" and emits their ids
     (plain SentencePiece would spell "</s>" out as characters: the templates rely on "</s>" being EOS),
     and at the tokens added to the vocabulary (LLaVA-Med v1's "<im_patch>", "<im_start>", "<im_end>");
     the transformers 4.28 that v1 trained with strips the whitespace touching an added token;
  2. legacy mode (the default, and what every LLaVA-Med release ran): every piece between them is encoded
     with `sp.encode`, which adds the dummy-prefix space to *each* piece (text after "</s>" starts with "▁");
  3. `legacy: false` in a checkpoint's tokenizer_config.json: one "▁" goes in front of the whole text, and
     the pieces are encoded with the dummy prefix switched off (text after "</s>" gets no space).
BOS is prepended when asked; EOS is never appended (add_eos_token=False in LLaVA's tokenizers).

`train_tokenizer` makes a new LLaMA-like BPE model for the from-scratch `tiny` preset.
"""

from __future__ import annotations

import io
import json
import os
import re
from typing import Iterable

import sentencepiece as spm

# Ids of LLaMA's special pieces. LLaMA has no pad piece; LLaVA pads with <unk> (pad_token = unk_token), and
# so do we: padded positions are masked out of attention and loss, so the id only has to be a valid row.
UNK_ID, BOS_ID, EOS_ID = 0, 1, 2


class Tokenizer:
    """SentencePiece model + the slow-LlamaTokenizer rules LLaVA's prompts were tokenized with.

    `legacy` None reads the mode from tokenizer_config.json beside the model (absent: legacy, as transformers
    defaults). Tokens added to the vocabulary come from added_tokens.json or tokenizer_config.json there.
    """

    def __init__(self, path: str | os.PathLike, legacy: bool | None = None):
        path = os.fspath(path)
        model_file = os.path.join(path, "tokenizer.model") if os.path.isdir(path) else path
        if not os.path.isfile(model_file):
            raise FileNotFoundError(f"no SentencePiece tokenizer.model at {model_file!r}")
        self.path = model_file
        self.sp = spm.SentencePieceProcessor()
        try:
            self.sp.Load(model_file)
        except (OSError, RuntimeError) as e:
            raise ValueError(f"{model_file!r} is not a SentencePiece model: {e}") from e
        config, self.added = read_tokenizer_files(os.path.dirname(model_file), self.sp.get_piece_size())
        # transformers treats a missing or null "legacy" as legacy (with a warning).
        self.legacy = config.get("legacy") is not False if legacy is None else legacy
        # Non-legacy mode encodes with the dummy prefix off (transformers edits the model the same way).
        self.sp_plain = spm.SentencePieceProcessor()
        self.sp_plain.LoadFromSerializedProto(_without_dummy_prefix(self.sp.serialized_model_proto()))
        self._unk_pieces = len(self.sp_plain.encode(self.sp.id_to_piece(self.sp.unk_id())))
        specials = {"<unk>": self.sp.unk_id(), "<s>": self.sp.bos_id(), "</s>": self.sp.eos_id()}
        self.special_ids = {s: i for s, i in specials.items() if i >= 0}
        self._compile()

    def _compile(self) -> None:
        # Longest first so that no special string is matched as a part of another.
        alternatives = sorted({**self.special_ids, **self.added}, key=len, reverse=True)
        self._special_re = re.compile("(" + "|".join(map(re.escape, alternatives)) + ")")

    def add_tokens(self, tokens: Iterable[str]) -> int:
        """Add tokens after the vocabulary (ids counted on from the last one), as transformers' add_tokens;
        returns how many were new."""
        new = [t for t in dict.fromkeys(tokens) if t not in self.added and t not in self.special_ids]
        for t in new:
            self.added[t] = max([self.sp.get_piece_size() - 1, *self.added.values()]) + 1
        self._compile()
        return len(new)

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        """tokenizer.model, plus what `Tokenizer(directory)` reads back: added_tokens.json for added tokens and
        tokenizer_config.json for the non-legacy mode (only when there is something to say)."""
        os.makedirs(directory, exist_ok=True)
        with open(os.path.join(directory, "tokenizer.model"), "wb") as f:
            f.write(self.sp.serialized_model_proto())
        if self.added:
            with open(os.path.join(directory, "added_tokens.json"), "w", encoding="utf-8") as f:
                json.dump(self.added, f, indent=1)
        if not self.legacy:
            with open(os.path.join(directory, "tokenizer_config.json"), "w", encoding="utf-8") as f:
                json.dump({"legacy": False}, f)

    @property
    def bos_id(self) -> int:
        return self.sp.bos_id()

    @property
    def eos_id(self) -> int:
        return self.sp.eos_id()

    @property
    def pad_id(self) -> int:
        return self.sp.pad_id() if self.sp.pad_id() >= 0 else self.sp.unk_id()

    @property
    def vocab_size(self) -> int:
        """SentencePiece pieces only; added tokens come after them (`len(added)` more ids)."""
        return self.sp.get_piece_size()

    def encode(self, text: str, bos: bool = False) -> list[int]:
        ids = [self.bos_id] if bos else []
        if not text:
            return ids
        if not self.legacy:
            text = "\u2581" + text.replace("\u2581", " ")
        parts = self._special_re.split(text)
        for k, part in enumerate(parts):
            if part in self.added:  # transformers 4.28 strips both neighbours of an added token
                if k + 1 < len(parts):
                    parts[k + 1] = parts[k + 1].lstrip()
                if k > 0 and parts[k - 1] not in self.added and parts[k - 1] not in self.special_ids:
                    parts[k - 1] = parts[k - 1].rstrip()
        out: list[int] = []
        for part in parts:
            if part in self.special_ids:
                out.append(self.special_ids[part])
            elif part in self.added:
                out.append(self.added[part])
            elif part:
                out.extend(self._encode_piece(part))
        if (not self.legacy and len(out) > 1 and out[0] == self.sp.piece_to_id("\u2581")
                and parts[0] == "\u2581" and (out[1] in self.special_ids.values() or out[1] in self.added.values())):
            out = out[1:]  # the "▁" put in front of a text that starts with a special token
        return ids + out

    def _encode_piece(self, text: str) -> list[int]:
        if self.legacy:
            return self.sp.encode(text)
        if not text.startswith(("\u2581", " ")):
            return self.sp_plain.encode(text)
        # Without the dummy prefix SentencePiece drops a leading "▁"; transformers keeps it by encoding
        # "<unk>" + text and cutting the pieces of "<unk>" off again.
        unk = self.sp.id_to_piece(self.sp.unk_id())
        return self.sp_plain.encode(unk + text)[self._unk_pieces:]

    def decode(self, ids: Iterable[int]) -> str:
        """Text of `ids` without special or added tokens, the (negative) image sentinel, or ids past the
        SentencePiece vocabulary (rows a checkpoint adds to its embeddings, e.g. llava-hf's image token), which
        have no text."""
        specials, size = set(self.special_ids.values()), self.sp.get_piece_size()
        return self.sp.decode([int(i) for i in ids if 0 <= int(i) < size and int(i) not in specials])


def read_tokenizer_files(directory: str, base_size: int) -> tuple[dict, dict[str, int]]:
    """(tokenizer_config.json, {added token: id}) of a transformers tokenizer directory; ids below
    `base_size` are SentencePiece's own pieces and are left out."""
    config, added = {}, {}
    config_file = os.path.join(directory, "tokenizer_config.json")
    if os.path.isfile(config_file):
        config = _read_json(config_file)
        for i, entry in (config.get("added_tokens_decoder") or {}).items():
            added[entry["content"] if isinstance(entry, dict) else str(entry)] = int(i)
    added_file = os.path.join(directory, "added_tokens.json")
    if os.path.isfile(added_file):
        added.update({t: int(i) for t, i in _read_json(added_file).items()})
    return config, {t: i for t, i in added.items() if i >= base_size}


def _read_json(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: not readable JSON ({e})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object")
    return data


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    value, shift = 0, 0
    while True:
        b = data[pos]
        value |= (b & 0x7F) << shift
        pos, shift = pos + 1, shift + 7
        if not b & 0x80:
            return value, pos


def _without_dummy_prefix(model_proto: bytes) -> bytes:
    """The SentencePiece model with add_dummy_prefix off, written without protobuf: SentencePiece's own
    normalizer gives the edited NormalizerSpec, which replaces field 3 of the ModelProto on the wire."""
    spec = spm.SentencePieceNormalizer(model_proto=model_proto, add_dummy_prefix=False).serialized_normalizer_spec()
    out, pos = bytearray(), 0
    while pos < len(model_proto):
        start = pos
        key, pos = _varint(model_proto, pos)
        wire = key & 7
        if wire == 0:
            _, pos = _varint(model_proto, pos)
        elif wire == 1 or wire == 5:
            pos += 8 if wire == 1 else 4
        elif wire == 2:
            n, pos = _varint(model_proto, pos)
            pos += n
        else:
            raise ValueError(f"unexpected protobuf wire type {wire} in the SentencePiece model")
        if key >> 3 != 3:  # normalizer_spec
            out += model_proto[start:pos]
    size, length = len(spec), bytearray()
    while True:
        length.append((size & 0x7F) | (0x80 if size > 0x7F else 0))
        size >>= 7
        if not size:
            break
    return bytes(out + bytes([3 << 3 | 2]) + length + spec)


def train_tokenizer(texts: Iterable[str], out_dir: str | os.PathLike, vocab_size: int,
                    max_sentence_length: int = 16384) -> Tokenizer:
    """Train a LLaMA-like BPE SentencePiece model on `texts` and save `out_dir/tokenizer.model`.

    LLaMA's settings: BPE, byte fallback (no unknown characters), digits split one by one, identity
    normalization with whitespace kept as is (runs of spaces and newlines survive a round trip), dummy
    prefix, unk=0 bos=1 eos=2 and no pad piece (pad = unk, as LLaVA does). One thread and no input
    sampling or shuffling, so the same texts give the same model bytes.
    """
    model = io.BytesIO()  # in memory, so that no output path is recorded inside the model
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(list(texts)),
        model_writer=model,
        model_type="bpe",
        vocab_size=vocab_size,
        byte_fallback=True,
        split_digits=True,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        add_dummy_prefix=True,
        allow_whitespace_only_pieces=True,
        character_coverage=0.9999,
        unk_id=UNK_ID, bos_id=BOS_ID, eos_id=EOS_ID, pad_id=-1,
        max_sentence_length=max_sentence_length,
        input_sentence_size=0,
        shuffle_input_sentence=False,
        num_threads=1,
        hard_vocab_limit=False,
        minloglevel=2,
    )
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "tokenizer.model")
    with open(path, "wb") as f:
        f.write(model.getvalue())
    return Tokenizer(path)
