"""Tokenizer ids against transformers' slow SentencePiece tokenizer (the oracle LLaVA's ids came from)."""

import random

import pytest

from minillavamed.conversation import build_prompt, get_template, render
from minillavamed.tokenizer import Tokenizer, train_tokenizer

CONV = [{"from": "human", "value": "What is shown?\n<image>"}, {"from": "gpt", "value": "A chest X-ray."},
        {"from": "human", "value": "Any  opacity?"}, {"from": "gpt", "value": "Yes, in the right lower lobe.\n"}]


def corpus():
    rng = random.Random(0)
    words = ("lesion lobe opacity cardiomegaly histology stain cell nucleus MRI CT scan axial contrast the a of "
             "is in shows right left lower upper").split()
    fixed = ["The chest X-ray shows an opacity in the right lower lobe.  Heart size 12.5 cm.\n\nNo effusion.",
             "Ünïcödé: ß, 中文字, emoji 🩺, Ελληνικά — dash", "digits 0123456789 and 3.14159, 2,048 tokens",
             "   leading spaces and\ttabs\n\n\nnewlines   trailing   "]
    fixed += [render(get_template(n), CONV) for n in ("vicuna_v1", "mistral_instruct", "llava_med_v1")]
    return fixed * 10 + [" ".join(rng.choice(words) for _ in range(25)) for _ in range(200)]


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return train_tokenizer(corpus(), tmp_path_factory.mktemp("tok"), vocab_size=600)


@pytest.fixture(scope="module")
def oracle(tok):
    # transformers 5.23 has no slow LlamaTokenizer class any more (LlamaTokenizer is the `tokenizers` one,
    # and converting a .model to it needs protobuf, absent here). SentencePieceBackend *is* the slow
    # sentencepiece path LlamaTokenizer(use_fast=False) ran: legacy=True, split at special tokens, BOS first.
    from transformers.tokenization_utils_sentencepiece import SentencePieceBackend
    return SentencePieceBackend(vocab_file=tok.path, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                legacy=True, special_tokens_pattern="bos")


TEXTS = ["hello", "", " ", "  two", "a\n\nb", "\n", "trail  ", "</s>USER: x", "x </s> y", "<s>hi", "A1</s>",
         "<unk> odd", "[INST] What? [/INST]", "中文 🩺 ß Ελληνικά", "12345 and 3.14", "tab\there",
         "\n\n\n   \n", "Ünïcödé — ‘quotes’ “double”", "x\u00a0y\u200bz"]


def test_ids_equal_transformers_slow_tokenizer(tok, oracle):
    texts = TEXTS + corpus()[:7]
    texts += [build_prompt(get_template(n), "Is there an opacity?", history=[("Describe it.", "A CT scan.")])
              for n in ("vicuna_v1", "mistral_instruct", "llava_med_v1")]
    for text in texts:
        assert tok.encode(text, bos=True) == oracle(text).input_ids, repr(text)
        assert tok.encode(text) == oracle(text, add_special_tokens=False).input_ids, repr(text)


def test_special_ids_and_sizes(tok):
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (1, 2, 0)  # LLaMA's ids; pad = unk as LLaVA pads
    assert tok.vocab_size == 600
    assert tok.piece(0) == "<unk>" and tok.piece(1) == "<s>" and tok.piece(2) == "</s>"
    assert tok.encode("a</s>")[-1] == 2 and tok.encode("<s>")[-1] == 1


def test_decode(tok):
    for text in ["hello world", "  two  spaces\n\nand lines", "中文 🩺 ß", "12345"]:
        assert tok.decode(tok.encode(text, bos=True)) == text
    ids = tok.encode("A1</s>B")
    assert tok.decode(ids) == "A1 B"  # "B" after "</s>" got its own dummy-prefix space
    assert tok.decode(ids[:2] + [-200] + ids[2:]) == "A1 B"  # the image sentinel is not text


def test_training_is_deterministic(tmp_path):
    a = train_tokenizer(corpus(), tmp_path / "a", vocab_size=500)
    b = train_tokenizer(corpus(), tmp_path / "b", vocab_size=500)
    assert open(a.path, "rb").read() == open(b.path, "rb").read()


def test_load_from_directory_and_bad_paths(tok, tmp_path):
    import os
    assert Tokenizer(os.path.dirname(tok.path)).encode("lobe") == tok.encode("lobe")
    with pytest.raises(FileNotFoundError, match="nowhere"):
        Tokenizer(tmp_path / "nowhere")
    bad = tmp_path / "tokenizer.model"
    bad.write_bytes(b"not a model")
    with pytest.raises(ValueError, match="tokenizer.model"):
        Tokenizer(tmp_path)
