"""Tokenizer ids against transformers' slow SentencePiece tokenizer (the oracle LLaVA's ids came from)."""

import os
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
    assert [tok.sp.id_to_piece(i) for i in (0, 1, 2)] == ["<unk>", "<s>", "</s>"]
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


# ---- legacy=False, and tokens added to the vocabulary -------------------------------------------------

def plain_oracle(tok, legacy):
    """transformers' slow LlamaTokenizer (4.31-4.37, the versions with `legacy`) in either mode.

    SentencePieceBackend holds its `_tokenize` (dummy prefix off, the "<unk>" trick); LlamaTokenizer's own
    `tokenize` (one "▁" in front of the text, dropped again before a leading special token) is restated
    here. Its constructor needs protobuf (absent here) to switch the dummy prefix off in non-legacy mode, so
    it is built in legacy mode and given the edited model afterwards.
    """
    from transformers.tokenization_utils_sentencepiece import SPIECE_UNDERLINE, SentencePieceBackend
    import sentencepiece as spm

    class SlowLlama(SentencePieceBackend):
        def tokenize(self, text, **kwargs):
            if self.legacy or len(text) == 0:
                return super().tokenize(text, **kwargs)
            tokens = super().tokenize(SPIECE_UNDERLINE + text.replace(SPIECE_UNDERLINE, " "), **kwargs)
            if len(tokens) > 1 and tokens[0] == SPIECE_UNDERLINE and tokens[1] in self.all_special_tokens:
                tokens = tokens[1:]
            return tokens

    o = SlowLlama(vocab_file=tok.path, unk_token="<unk>", bos_token="<s>", eos_token="</s>", legacy=True,
                  special_tokens_pattern="bos")
    if not legacy:
        from minillavamed.tokenizer import _without_dummy_prefix
        edited = spm.SentencePieceProcessor()
        edited.LoadFromSerializedProto(_without_dummy_prefix(tok.sp.serialized_model_proto()))
        o.sp_model, o.legacy = edited, False
    return o


def test_the_edited_model_only_loses_the_dummy_prefix(tok):
    import sentencepiece as spm
    proto = tok.sp.serialized_model_proto()
    reference = spm.SentencePieceNormalizer(model_proto=proto, add_dummy_prefix=False)
    plain = tok.sp_plain
    assert plain.get_piece_size() == tok.sp.get_piece_size()
    assert all(plain.id_to_piece(i) == tok.sp.id_to_piece(i) and plain.get_score(i) == tok.sp.get_score(i)
               for i in range(plain.get_piece_size()))
    for text in TEXTS + ["hello", " lead", "x  y"]:
        assert plain.normalize(text) == reference.normalize(text), repr(text)
    assert tok.sp.normalize("hello") == "\u2581hello" and plain.normalize("hello") == "hello"


@pytest.mark.parametrize("legacy", [True, False])
def test_both_modes_equal_slow_llama_tokenizer(tok, legacy):
    ours = Tokenizer(tok.path, legacy=legacy)
    oracle = plain_oracle(tok, legacy)
    texts = TEXTS + corpus()[:7] + ["\u2581already", "x\u2581y", "</s>[INST] next [/INST]", "<s>", "</s>"]
    texts += [render(get_template(n), CONV) for n in ("vicuna_v1", "mistral_instruct", "llava_med_v1")]
    for text in texts:
        assert ours.encode(text, bos=True) == oracle(text).input_ids, repr(text)
        assert ours.encode(text) == oracle(text, add_special_tokens=False).input_ids, repr(text)
    # The modes really differ where the issue says: text right after a special token.
    other = Tokenizer(tok.path, legacy=not legacy)
    assert ours.encode("A1</s>USER: x") != other.encode("A1</s>USER: x")


def test_mode_and_added_tokens_from_the_checkpoint_files(tok, tmp_path):
    import json
    import shutil
    shutil.copy(tok.path, tmp_path / "tokenizer.model")
    assert Tokenizer(tmp_path).legacy  # no tokenizer_config.json: transformers' default, legacy
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"legacy": False, "added_tokens_decoder": {
        "0": {"content": "<unk>"}, "600": {"content": "[PAD]", "lstrip": False}}}))
    (tmp_path / "added_tokens.json").write_text(json.dumps({"<im_patch>": 601, "<im_start>": 602, "<im_end>": 603}))
    t = Tokenizer(tmp_path)
    assert not t.legacy and Tokenizer(tmp_path, legacy=True).legacy
    assert t.added == {"[PAD]": 600, "<im_patch>": 601, "<im_start>": 602, "<im_end>": 603}
    (tmp_path / "tokenizer_config.json").write_text("{not json")
    with pytest.raises(ValueError, match="tokenizer_config.json"):
        Tokenizer(tmp_path)


@pytest.mark.parametrize("legacy", [True, False])
def test_added_tokens_split_and_strip_as_transformers_4_28(tok, legacy):
    # transformers 4.28 (LLaVA-Med v1's) stripped the whitespace on both sides of a token added with
    # add_tokens; later versions need lstrip/rstrip=True on the AddedToken to do the same.
    from transformers import AddedToken
    ours = Tokenizer(tok.path, legacy=legacy)
    assert ours.add_tokens(["<im_patch>", "<im_start>", "<im_end>"]) == 3
    assert ours.add_tokens(["<im_start>"]) == 0
    assert ours.added == {"<im_patch>": 600, "<im_start>": 601, "<im_end>": 602}
    oracle = plain_oracle(tok, legacy)
    oracle.add_tokens([AddedToken(t, lstrip=True, rstrip=True, special=True)
                       for t in ("<im_patch>", "<im_start>", "<im_end>")])
    for text in ["### Human: <im_start><im_patch><im_patch><im_end>\nWhat is it?\n###",
                 "What is it?\n<im_start><im_patch><im_end>", "<im_start><im_end> x", "a <im_patch> b </s> c",
                 "x</s> <im_start>  y"]:
        assert ours.encode(text, bos=True) == oracle(text).input_ids, repr(text)
    # Added tokens are not text; the space after one is gone in non-legacy mode (it was stripped).
    assert ours.decode(ours.encode("lobe <im_patch> lobe")) == ("lobe lobe" if legacy else "lobelobe")


def test_save_pretrained_round_trips_mode_and_added_tokens(tok, tmp_path):
    t = Tokenizer(tok.path, legacy=False)
    t.add_tokens(["<im_patch>", "<im_start>", "<im_end>"])
    t.save_pretrained(tmp_path / "out")
    back = Tokenizer(tmp_path / "out")
    assert not back.legacy and back.added == t.added
    text = "x</s> <im_start><im_patch><im_end>\nWhat?"
    assert back.encode(text, bos=True) == t.encode(text, bos=True)
    Tokenizer(tok.path).save_pretrained(tmp_path / "plain")
    assert sorted(os.listdir(tmp_path / "plain")) == ["tokenizer.model"]
    assert open(tmp_path / "plain" / "tokenizer.model", "rb").read() == open(tok.path, "rb").read()
