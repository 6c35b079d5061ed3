"""Templates against hand-written strings from LLaVA's definitions; labels token by token against a
transcription of LLaVA's train.py preprocessing run on transformers' slow SentencePiece tokenizer."""

import copy
import random

import pytest

from minillavamed.config import IGNORE_INDEX, IMAGE_TOKEN_INDEX
from minillavamed.conversation import (V1_SYSTEM, VICUNA_SYSTEM, build_prompt, get_template, render,
                                       tokenize_conversation, tokenize_prompt)
from minillavamed.tokenizer import train_tokenizer

IGN = IGNORE_INDEX
CONV = [{"from": "human", "value": "What is shown?\n<image>"}, {"from": "gpt", "value": "A chest X-ray."},
        {"from": "human", "value": "Any  opacity?"}, {"from": "gpt", "value": "Yes, in the right lower lobe.\n"},
        {"from": "human", "value": "Size?"}, {"from": "gpt", "value": "About 3 cm."}]
CAPTION = [{"from": "human", "value": "Describe the figure.\n<image>"},
           {"from": "gpt", "value": "Axial CT of the head shows a 2 cm lesion."}]


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    rng = random.Random(1)
    words = "what is shown a chest x-ray any opacity yes in the right lower lobe size about cm".split()
    texts = [render(get_template(n), CONV) for n in ("vicuna_v1", "mistral_instruct", "llava_med_v1")] * 5
    texts += [" ".join(rng.choice(words) for _ in range(20)) for _ in range(100)]
    return train_tokenizer(texts, tmp_path_factory.mktemp("tok"), vocab_size=400)


@pytest.fixture(scope="module")
def hf(tok):
    from transformers.tokenization_utils_sentencepiece import SentencePieceBackend
    return SentencePieceBackend(vocab_file=tok.path, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                legacy=True, special_tokens_pattern="bos")


# ---- LLaVA's train.py / mm_utils.py, transcribed (list-based), driven by the transformers tokenizer ----

def llava_tokenizer_image_token(prompt, tokenizer):
    chunks = [tokenizer(c).input_ids for c in prompt.split("<image>")]
    ids, offset = [], 0
    if chunks and chunks[0] and chunks[0][0] == tokenizer.bos_token_id:
        offset = 1
        ids.append(chunks[0][0])
    seps = [ele for sub in zip(chunks, [[IMAGE_TOKEN_INDEX] * (offset + 1)] * len(chunks)) for ele in sub][:-1]
    for x in seps:
        ids.extend(x[offset:])
    return ids


def llava_preprocess_multimodal(source):
    for s in source:
        if "<image>" in s["value"]:
            s["value"] = ("<image>\n" + s["value"].replace("<image>", "").strip()).strip()
    return source


def llava_preprocess_two_or_llama2(prompt, tokenizer, sep, sep2):
    ids = llava_tokenizer_image_token(prompt, tokenizer)
    target = list(ids)
    total_len = sum(1 for i in ids if i != tokenizer.pad_token_id)
    cur_len = 1
    target[:cur_len] = [IGN]
    for rou in prompt.split(sep2):
        if rou == "":
            break
        parts = rou.split(sep)
        if len(parts) != 2:
            break
        parts[0] += sep
        round_len = len(llava_tokenizer_image_token(rou, tokenizer))
        instruction_len = len(llava_tokenizer_image_token(parts[0], tokenizer)) - 2
        target[cur_len:cur_len + instruction_len] = [IGN] * len(target[cur_len:cur_len + instruction_len])
        cur_len += round_len
    target[cur_len:] = [IGN] * len(target[cur_len:])
    if cur_len != total_len:
        target = [IGN] * len(target)
    return ids, target


def llava_preprocess_sharp(source, tokenizer, system):
    header = f"{system}\n\n"
    conversation = header
    for s in source:
        role = {"human": "Human", "gpt": "Assistant"}[s["from"]]
        s["value"] = "### " + role + ": " + s["value"] + "\n"
        conversation += s["value"]
    conversation += "### "
    ids = llava_tokenizer_image_token(conversation, tokenizer)
    target = list(ids)
    lens = [len(llava_tokenizer_image_token(p, tokenizer)) for p in [header] + [s["value"] for s in source]]
    cur_idx = lens[0]
    target[:cur_idx] = [IGN] * cur_idx
    for n, s in zip(lens[1:], source):
        if s["from"] == "human":
            target[cur_idx + 2:cur_idx + n] = [IGN] * len(target[cur_idx + 2:cur_idx + n])
        cur_idx += n
    return ids, target


def llava_preprocess_plain(source, tokenizer):
    conversation = "<image>" + source[1]["value"] + "\n"
    ids = llava_tokenizer_image_token(conversation, tokenizer)
    n = len(llava_tokenizer_image_token("<image>", tokenizer))
    return ids, [IGN] * n + ids[n:]


def no_sentinel_labels(labels, ids):
    # LLaVA's model drops the sentinel's label when it splices the image in; our labels say so directly.
    return [IGN if i == IMAGE_TOKEN_INDEX else y for i, y in zip(ids, labels)]


# ---- renders ----

def test_renders_equal_llava_strings():
    assert render(get_template("vicuna_v1"), CONV[:4]) == (
        VICUNA_SYSTEM + " USER: <image>\nWhat is shown? ASSISTANT: A chest X-ray.</s>"
        "USER: Any  opacity? ASSISTANT: Yes, in the right lower lobe.\n</s>")
    assert VICUNA_SYSTEM == ("A chat between a curious user and an artificial intelligence assistant. The "
                             "assistant gives helpful, detailed, and polite answers to the user's questions.")
    assert render(get_template("mistral_instruct"), CONV[:4]) == (
        "[INST] <image>\nWhat is shown? [/INST] A chest X-ray. </s>"
        "[INST] Any  opacity? [/INST] Yes, in the right lower lobe.\n </s>")
    assert render(get_template("llava_med_v1"), CONV[:4]) == (
        V1_SYSTEM + "\n\n### Human: <image>\nWhat is shown?\n### Assistant: A chest X-ray.\n"
        "### Human: Any  opacity?\n### Assistant: Yes, in the right lower lobe.\n\n### ")
    assert V1_SYSTEM == ("A chat between a curious human and an artificial intelligence assistant. The "
                         "assistant gives helpful, detailed, and polite answers to the human's questions.")
    assert render(get_template("plain"), CAPTION) == "<image>Axial CT of the head shows a 2 cm lesion.\n"
    # Text-only records keep their text as is.
    assert render(get_template("vicuna_v1"), [{"from": "human", "value": " Hi "}, {"from": "gpt", "value": "Yo"}],
                  with_image=False) == VICUNA_SYSTEM + " USER:  Hi  ASSISTANT: Yo</s>"


def test_prompts_end_where_the_reply_begins():
    hist = [("Describe it.", "A CT scan.")]
    assert build_prompt(get_template("vicuna_v1"), "Is it normal?") == (
        VICUNA_SYSTEM + " USER: <image>\nIs it normal? ASSISTANT:")
    assert build_prompt(get_template("vicuna_v1"), "Is it normal?", hist) == (
        VICUNA_SYSTEM + " USER: <image>\nDescribe it. ASSISTANT: A CT scan.</s>USER: Is it normal? ASSISTANT:")
    assert build_prompt(get_template("mistral_instruct"), "Is it normal?", hist) == (
        "[INST] <image>\nDescribe it. [/INST] A CT scan. </s>[INST] Is it normal? [/INST]")
    assert build_prompt(get_template("mistral_instruct"), "Q?", with_image=False) == "[INST] Q? [/INST]"
    assert build_prompt(get_template("llava_med_v1"), "Is it normal?", hist) == (
        V1_SYSTEM + "\n\n### Human: <image>\nDescribe it.\n### Assistant: A CT scan.\n"
        "### Human: Is it normal?\n### Assistant:")
    assert build_prompt(get_template("plain"), "ignored") == "<image>"


def test_stop_strings_are_never_empty():
    assert get_template("mistral_instruct").stop_strings == ("</s>", "[INST]")
    assert get_template("vicuna_v1").stop_strings == ("</s>",)
    assert get_template("llava_med_v1").stop_strings == ("###",)
    assert get_template("plain").stop_strings == ("\n",)
    with pytest.raises(KeyError, match="vicuna_v1"):
        get_template("vicuna")


# ---- token ids and labels ----

def test_prompt_ids_match_tokenizer_image_token(tok, hf):
    for text in ["<image>\nWhat?", "before <image> after", "<image>", "no image", "a<image>b<image>c"]:
        assert tokenize_prompt(text, tok) == llava_tokenizer_image_token(text, hf), text
    assert tokenize_prompt("<image>\nWhat?", tok)[:2] == [1, IMAGE_TOKEN_INDEX]


@pytest.mark.parametrize("conv", [CONV[:2], CONV[:4], CONV, [{"from": "gpt", "value": "Hello."}] + CONV[:4]])
def test_vicuna_and_mistral_labels_equal_llava(tok, hf, conv):
    for name, sep in (("vicuna_v1", " ASSISTANT: "), ("mistral_instruct", "[/INST] ")):
        t = get_template(name)
        ids, labels = tokenize_conversation(t, conv, tok)
        src = conv[1:] if conv[0]["from"] == "gpt" else conv
        prompt = render(t, src)  # rendering is checked by hand above
        ref_ids, ref_labels = llava_preprocess_two_or_llama2(prompt, hf, sep, "</s>")
        assert ids == ref_ids
        assert labels == no_sentinel_labels(ref_labels, ref_ids)


def trained_runs(ids, labels):
    runs, cur = [], []
    for i, y in zip(ids, labels):
        if y != IGN:
            assert y == i
            cur.append(i)
        elif cur:
            runs.append(cur)
            cur = []
    return runs + ([cur] if cur else [])


def test_only_replies_with_their_end_separator_are_trained(tok):
    replies = [m["value"] for m in CONV if m["from"] == "gpt"]
    _, labels = tokenize_conversation(get_template("vicuna_v1"), CONV, tok)
    ids, _ = tokenize_conversation(get_template("vicuna_v1"), CONV, tok)
    assert trained_runs(ids, labels) == [tok.encode(r) + [tok.eos_id] for r in replies]
    ids, labels = tokenize_conversation(get_template("mistral_instruct"), CONV, tok)
    assert trained_runs(ids, labels) == [tok.encode(r + " ") + [tok.eos_id] for r in replies]
    ids, labels = tokenize_conversation(get_template("plain"), CAPTION, tok)
    assert ids[:2] == [tok.bos_id, IMAGE_TOKEN_INDEX]
    assert labels == [IGN, IGN] + tok.encode(CAPTION[1]["value"] + "\n")


def test_plain_and_sharp_labels_equal_llava(tok, hf):
    ids, labels = tokenize_conversation(get_template("plain"), CAPTION, tok)
    assert (ids, labels) == llava_preprocess_plain(llava_preprocess_multimodal(copy.deepcopy(CAPTION)), hf)
    for conv in (CONV[:2], CONV, CONV[:4]):
        ids, labels = tokenize_conversation(get_template("llava_med_v1"), conv, tok)
        src = llava_preprocess_multimodal(copy.deepcopy(conv))
        ref_ids, ref_labels = llava_preprocess_sharp(src, hf, V1_SYSTEM)
        assert ids == ref_ids
        assert labels == no_sentinel_labels(ref_labels, ref_ids)
        assert IMAGE_TOKEN_INDEX in ids and sum(y != IGN for y in labels) > 0


def test_text_only_and_mismatch(tok, hf):
    conv = [{"from": "human", "value": "Hi <image> there"}, {"from": "gpt", "value": "Hello."}]
    ids, labels = tokenize_conversation(get_template("vicuna_v1"), conv, tok, with_image=False)
    assert IMAGE_TOKEN_INDEX not in ids
    assert ids == hf(render(get_template("vicuna_v1"), conv, with_image=False)).input_ids
    assert trained_runs(ids, labels) == [tok.encode("Hello.") + [tok.eos_id]]
    # A reply that itself contains "</s>" breaks LLaVA's round arithmetic: the whole sample is masked.
    bad = [{"from": "human", "value": "<image>\nQ"}, {"from": "gpt", "value": "A</s>B"}]
    ids, labels = tokenize_conversation(get_template("vicuna_v1"), bad, tok)
    ref_ids, ref_labels = llava_preprocess_two_or_llama2(render(get_template("vicuna_v1"), bad), hf,
                                                         " ASSISTANT: ", "</s>")
    assert labels == no_sentinel_labels(ref_labels, ref_ids) == [IGN] * len(ids)


def test_bad_conversations_raise():
    t = get_template("vicuna_v1")
    with pytest.raises(ValueError, match="empty"):
        render(t, [])
    with pytest.raises(ValueError, match="speaker"):
        render(t, [{"from": "system", "value": "x"}])
    with pytest.raises(ValueError, match="alternate"):
        render(t, [{"from": "human", "value": "a"}, {"from": "human", "value": "b"}])
    with pytest.raises(ValueError, match="value"):
        render(t, [{"from": "human"}])
    # v1.0's train.py lower-cases the speaker.
    assert render(t, [{"from": "Human", "value": "a"}, {"from": "GPT", "value": "b"}]) == render(
        t, [{"from": "human", "value": "a"}, {"from": "gpt", "value": "b"}])
    with pytest.raises(ValueError, match="plain"):
        render(get_template("plain"), CONV)


# ---- LLaVA-Med v1.0 (mm_use_im_start_end) -------------------------------------------------------------

N_PATCHES = 4
V1_CONVS = [
    CONV[:2], CONV,
    [{"from": "human", "value": "<image>\nWhat is shown?"}, {"from": "gpt", "value": "A chest X-ray."}],
    [{"from": "human", "value": "Is the  <image>  lesion right?"}, {"from": "gpt", "value": "Yes."},
     {"from": "human", "value": "Size?"}, {"from": "gpt", "value": "3 cm"}],
    [{"from": "human", "value": "What is shown?\n<image>"}, {"from": "gpt", "value": 42}],
    CAPTION,
]


@pytest.fixture(scope="module")
def hf_v1(tok):
    """The slow tokenizer with v1's three added tokens. transformers 4.28 stripped the whitespace around a
    token added by add_tokens; AddedToken(lstrip=True, rstrip=True) asks 5.x for the same."""
    from transformers import AddedToken
    from transformers.tokenization_utils_sentencepiece import SentencePieceBackend
    o = SentencePieceBackend(vocab_file=tok.path, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                             legacy=True, special_tokens_pattern="bos")
    o.add_tokens([AddedToken(t, lstrip=True, rstrip=True, special=True) for t in ("<im_patch>", "<im_start>",
                                                                                   "<im_end>")])
    return o


@pytest.fixture(scope="module")
def tok_v1(tok):
    from minillavamed.tokenizer import Tokenizer
    t = Tokenizer(tok.path)
    t.add_tokens(["<im_patch>", "<im_start>", "<im_end>"])  # initialize_vision_tokenizer's order
    return t


def v1_train_preprocess(source, tokenizer, system):
    """LLaVA-Med v1.0 train.py on one record (version v0, default conv_v1_2, mm_use_im_start_end), from our
    reading: preprocess_multimodal replaces "<image>" where it stands (ints become strings), then
    `preprocess` tokenizes the ### conversation whole and masks each human message from its third token on,
    measuring every piece by tokenizing it alone."""
    image = "<im_start>" + "<im_patch>" * N_PATCHES + "<im_end>"
    for s in source:
        s["value"] = str(s["value"]).replace("<image>", image)
    header = f"{system}\n\n"
    conversation = header
    for s in source:
        s["value"] = "### " + {"human": "Human", "gpt": "Assistant"}[s["from"]] + ": " + s["value"] + "\n"
        conversation += s["value"]
    conversation += "### "
    ids = tokenizer(conversation).input_ids
    target = list(ids)
    lens = [len(tokenizer(p).input_ids) for p in [header] + [s["value"] for s in source]]
    cur = lens[0]
    target[:cur] = [IGN] * cur
    for n, s in zip(lens[1:], source):
        if s["from"] == "human":
            target[cur + 2:cur + n] = [IGN] * len(target[cur + 2:cur + n])
        cur += n
    return ids, target


def expand_patches(ids, labels, patch_id):
    """Our sentinel as v1.0's run of patch tokens (the splice puts the patch features there; not trained)."""
    out_ids, out_labels = [], []
    for i, y in zip(ids, labels):
        out_ids += [patch_id] * N_PATCHES if i == IMAGE_TOKEN_INDEX else [i]
        out_labels += [IGN] * N_PATCHES if i == IMAGE_TOKEN_INDEX else [y]
    return out_ids, out_labels


@pytest.mark.parametrize("k", range(len(V1_CONVS)))
def test_im_start_end_ids_and_labels_equal_llava_med_v1_train(tok_v1, hf_v1, k):
    conv = V1_CONVS[k]
    ids, labels = tokenize_conversation(get_template("llava_med_v1"), conv, tok_v1, im_start_end=True)
    ref_ids, ref_labels = v1_train_preprocess(copy.deepcopy(conv), hf_v1, V1_SYSTEM)
    assert expand_patches(ids, labels, tok_v1.added["<im_patch>"]) == (ref_ids, ref_labels)
    start, end = tok_v1.added["<im_start>"], tok_v1.added["<im_end>"]
    p = ids.index(IMAGE_TOKEN_INDEX)
    assert ids[p - 1:p + 2] == [start, IMAGE_TOKEN_INDEX, end] and ids.count(IMAGE_TOKEN_INDEX) == 1
    # v1.5's layout moves the image to the front; v1.0's leaves it where the record has it.
    assert render(get_template("llava_med_v1"), conv, im_start_end=True).count("<image>") == 1
    if k == 3:
        assert "Is the <image> lesion" not in render(get_template("llava_med_v1"), conv)
        assert "Is the  <image>  lesion" in render(get_template("llava_med_v1"), conv, im_start_end=True)


def test_im_start_end_prompt_puts_the_image_after_the_question(tok, tok_v1, hf_v1):
    t = get_template("llava_med_v1")
    prompt = build_prompt(t, "<image> Is it normal?", im_start_end=True)
    assert prompt == V1_SYSTEM + "\n\n### Human: Is it normal?\n<image>\n### Assistant:"
    ids = tokenize_prompt(prompt, tok_v1, im_start_end=True)
    image = "<im_start>" + "<im_patch>" * N_PATCHES + "<im_end>"
    assert expand_patches(ids, ids, tok_v1.added["<im_patch>"])[0] == hf_v1(prompt.replace("<image>", image)).input_ids
    with pytest.raises(ValueError, match="im_start"):
        tokenize_prompt(prompt, tok, im_start_end=True)
