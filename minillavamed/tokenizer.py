"""The language model's tokenizer (paper §4: the LLM's own vocabulary, LLaMA / Mistral SentencePiece).

LLaVA tokenizes with transformers' slow `LlamaTokenizer` in its legacy mode. That tokenizer does two things
on top of SentencePiece, and we do exactly those:
  1. it cuts the text at the literal special-token strings "<unk>", "<s>", "</s>" and emits their ids
     (plain SentencePiece would spell "</s>" out as characters: the templates rely on "</s>" being EOS);
  2. it encodes every piece between them with `sp.encode`, which adds the dummy-prefix space to *each*
     piece (the legacy behaviour: text after "</s>" starts with "▁").
BOS is prepended when asked; EOS is never appended (add_eos_token=False in LLaVA's tokenizers).

`train_tokenizer` makes a new LLaMA-like BPE model for the from-scratch `tiny` preset.
"""

from __future__ import annotations

import io
import os
import re
from typing import Iterable

import sentencepiece as spm

# Ids of LLaMA's special pieces. LLaMA has no pad piece; LLaVA pads with <unk> (pad_token = unk_token), and
# so do we: padded positions are masked out of attention and loss, so the id only has to be a valid row.
UNK_ID, BOS_ID, EOS_ID = 0, 1, 2


class Tokenizer:
    """SentencePiece model + the slow-LlamaTokenizer rules LLaVA's prompts were tokenized with."""

    def __init__(self, path: str | os.PathLike):
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
        specials = {"<unk>": self.sp.unk_id(), "<s>": self.sp.bos_id(), "</s>": self.sp.eos_id()}
        self.special_ids = {s: i for s, i in specials.items() if i >= 0}
        # Longest first so that no special string is matched as a part of another.
        alternatives = sorted(self.special_ids, key=len, reverse=True)
        self._special_re = re.compile("(" + "|".join(map(re.escape, alternatives)) + ")")

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
        return self.sp.get_piece_size()

    def encode(self, text: str, bos: bool = False) -> list[int]:
        ids = [self.bos_id] if bos else []
        for part in self._special_re.split(text):
            if part in self.special_ids:
                ids.append(self.special_ids[part])
            elif part:
                ids.extend(self.sp.encode(part))
        return ids

    def decode(self, ids: Iterable[int]) -> str:
        """Text of `ids` without special pieces, the (negative) image sentinel, or ids past the SentencePiece
        vocabulary (rows a checkpoint adds to its embeddings, e.g. llava-hf's image token), which have no text."""
        specials, size = set(self.special_ids.values()), self.sp.get_piece_size()
        return self.sp.decode([int(i) for i in ids if 0 <= int(i) < size and int(i) not in specials])

    def piece(self, i: int) -> str:
        return self.sp.id_to_piece(int(i))


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
