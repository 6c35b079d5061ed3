"""LLaVA-Med records → samples → batches; the bad-input suite; the VQA-RAD converter on the real release."""

import json
import os
import re

import pytest
import torch
from PIL import Image

from minillavamed.config import IGNORE_INDEX, IMAGE_TOKEN_INDEX
from minillavamed.conversation import get_template, tokenize_conversation
from minillavamed.data import (ConversationDataset, ImageLoadError, ImageProcessor, collate, convert_vqa_rad,
                               load_records, questions_from_vqa, truncate)
from minillavamed.tokenizer import train_tokenizer

VQA_RAD = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "vqa-rad")
N_IMG = 16  # decoder positions per image in these tests

ALIGN = {"id": "PMC1_fig1", "image": "a.png",
         "conversations": [{"from": "human", "value": "<image>\nDescribe the figure."},
                           {"from": "gpt", "value": "Chest X-ray with a right lower lobe opacity."}]}
INSTRUCT = {"id": "i1", "image": "b.png", "domain": {"chest_xray": True, "mri": False},
            "conversations": [{"from": "human", "value": "What is shown?\n<image>"},
                              {"from": "gpt", "value": "A chest X-ray."},
                              {"from": "human", "value": "Any opacity?"},
                              {"from": "gpt", "value": "Yes, in the right lower lobe."}]}
TEXT = {"id": "t1", "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello."}]}


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    texts = ["Chest X-ray with a right lower lobe opacity. What is shown? A chest X-ray. Any opacity? Yes, "
             "in the right lower lobe. Describe the figure. Hi Hello. USER: ASSISTANT: </s>"] * 50
    return train_tokenizer(texts, tmp_path_factory.mktemp("tok"), vocab_size=300)


@pytest.fixture
def root(tmp_path):
    Image.new("RGB", (30, 20), (200, 0, 0)).save(tmp_path / "a.png")
    Image.new("L", (12, 40), 90).save(tmp_path / "b.png")
    return tmp_path


def make(records, root, tok, template="vicuna_v1", max_len=512, **kw):
    return ConversationDataset(records, root, get_template(template), tok, ImageProcessor(size=28, crop_size=28),
                               max_len=max_len, num_image_tokens=N_IMG, **kw)


def test_records_read_unmodified(tmp_path):
    (tmp_path / "a.json").write_text(json.dumps([ALIGN, INSTRUCT]))
    (tmp_path / "b.jsonl").write_text(json.dumps(ALIGN) + "\n\n" + json.dumps(TEXT) + "\n")
    assert load_records(tmp_path / "a.json") == [ALIGN, INSTRUCT]
    assert load_records(tmp_path / "b.jsonl") == [ALIGN, TEXT]


def test_samples(root, tok):
    ds = make([ALIGN, INSTRUCT, TEXT], root, tok)
    assert len(ds) == 3 and not ds.dropped
    for k, rec in enumerate([ALIGN, INSTRUCT]):
        item = ds[k]
        ids, labels = tokenize_conversation(get_template("vicuna_v1"), rec["conversations"], tok)
        assert item["input_ids"].tolist() == ids and item["labels"].tolist() == labels
        assert item["input_ids"].dtype == torch.long and (item["input_ids"] == IMAGE_TOKEN_INDEX).sum() == 1
        assert item["pixel_values"].shape == (3, 28, 28) and item["pixel_values"].dtype == torch.float32
    assert ds[2]["pixel_values"] is None and IMAGE_TOKEN_INDEX not in ds[2]["input_ids"].tolist()
    plain = make([ALIGN], root, tok, template="plain")[0]
    assert plain["labels"][:2].tolist() == [IGNORE_INDEX] * 2 and (plain["labels"][2:] >= 0).all()


def test_truncation_counts_image_positions_and_never_cuts_an_image():
    ids, labels = [1, 5, IMAGE_TOKEN_INDEX, 6, 7, 8], [-100, -100, -100, 6, 7, 8]
    assert truncate(ids, labels, max_len=2 + N_IMG + 2, num_image_tokens=N_IMG) == (ids[:5], labels[:5])
    assert truncate(ids, labels, max_len=2 + N_IMG - 1, num_image_tokens=N_IMG) == (ids[:2], labels[:2])
    assert truncate(ids, labels, max_len=100, num_image_tokens=N_IMG) == (ids, labels)


def test_too_long_and_label_free_samples_are_dropped_and_counted(root, tok):
    n_prompt = len(tokenize_conversation(get_template("vicuna_v1"), INSTRUCT["conversations"], tok)[0])
    ds = make([INSTRUCT, ALIGN, TEXT], root, tok, max_len=40)  # the system prompt alone is longer
    assert len(ds) == 0
    assert ds.dropped == {"image does not fit in max_len": 2, "no trained label": 1}
    ds = make([INSTRUCT], root, tok, max_len=n_prompt + N_IMG - 1 - 3)  # loses the last reply's end
    assert len(ds) == 1 and ds.dropped == {}
    item = ds[0]
    assert len(item["input_ids"]) - 1 + N_IMG == n_prompt + N_IMG - 1 - 3


def test_collate_pads_right_and_stacks_images(root, tok):
    ds = make([ALIGN, TEXT, INSTRUCT], root, tok)
    b = collate([ds[0], ds[1], ds[2]], pad_id=tok.pad_id)
    n = [len(ds[k]["input_ids"]) for k in range(3)]
    assert b["input_ids"].shape == (3, max(n)) and b["labels"].shape == (3, max(n))
    assert b["attention_mask"].sum(1).tolist() == n
    assert (b["input_ids"][1, n[1]:] == tok.pad_id).all() and (b["labels"][1, n[1]:] == IGNORE_INDEX).all()
    assert b["pixel_values"].shape == (2, 3, 28, 28) and b["skipped"] == 0
    assert torch.equal(b["pixel_values"][1], ds[2]["pixel_values"])


def test_packing_boundaries_count_image_positions(root, tok):
    ds = make([ALIGN, TEXT, INSTRUCT], root, tok)
    b = collate([ds[0], ds[1], ds[2]], pad_id=tok.pad_id, pack=True, num_image_tokens=N_IMG)
    n = [len(ds[k]["input_ids"]) for k in range(3)]
    expanded = [n[0] - 1 + N_IMG, n[1], n[2] - 1 + N_IMG]
    assert b["input_ids"].shape == (1, sum(n)) and b["labels"].shape == (1, sum(n))
    assert b["cu_seqlens"].tolist() == [0, expanded[0], expanded[0] + expanded[1], sum(expanded)]
    assert b["cu_seqlens"].dtype == torch.int32 and b["max_seqlen"] == max(expanded)
    with pytest.raises(ValueError, match="num_image_tokens"):
        collate([ds[0]], pad_id=0, pack=True)


# ---- the bad-input suite ----

def test_missing_and_corrupt_images(root, tok):
    (root / "junk.png").write_bytes(b"\x89PNG but not really")
    bad = [dict(ALIGN, id="m", image="nope.png"), dict(ALIGN, id="c", image="junk.png"), ALIGN]
    ds = make(bad, root, tok)
    with pytest.raises(ImageLoadError, match="nope.png"):
        ds[0]
    with pytest.raises(ImageLoadError, match="junk.png"):
        ds[1]
    ds = make(bad, root, tok, skip_bad_images=True)
    with pytest.warns(UserWarning) as warned:
        items = [ds[k] for k in range(3)]
    assert ["nope.png" in str(w.message) for w in warned] == [True, False]
    assert ["junk.png" in str(w.message) for w in warned] == [False, True]
    assert items[0] is None and items[1] is None
    b = collate(items, pad_id=0)
    assert b["skipped"] == 2 and b["input_ids"].shape[0] == 1 and b["pixel_values"].shape[0] == 1
    assert collate(items[:2], pad_id=0) is None


def test_malformed_json_names_file_and_line(tmp_path):
    (tmp_path / "x.jsonl").write_text(json.dumps(ALIGN) + "\n" + json.dumps(TEXT) + "\n{\"id\": 3,\n")
    with pytest.raises(ValueError, match=r"x\.jsonl:3: not valid JSON"):
        load_records(tmp_path / "x.jsonl")
    (tmp_path / "y.json").write_text("[\n" + json.dumps(ALIGN) + ",\n{\"id\": oops}\n]")
    with pytest.raises(ValueError, match=r"y\.json:3: not valid JSON"):
        load_records(tmp_path / "y.json")
    (tmp_path / "z.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="record 0 is not a JSON object"):
        load_records(tmp_path / "z.json")


def test_bad_records_name_the_record(root, tok):
    with pytest.raises(ValueError, match="train.json: record 'r7': no 'conversations' key"):
        make([{"id": "r7", "image": "a.png"}], root, tok, source="train.json")
    with pytest.raises(ValueError, match="'r8': 'conversations' is not a non-empty list"):
        make([{"id": "r8", "conversations": []}], root, tok)
    with pytest.raises(ValueError, match="'r9': turn 0 is from 'bot', not 'human' or 'gpt'"):
        make([{"id": "r9", "conversations": [{"from": "bot", "value": "x"}]}], root, tok)
    with pytest.raises(ValueError, match="'r10': one image but 0 <image> in the conversation"):
        make([dict(TEXT, id="r10", image="a.png")], root, tok)


@pytest.mark.parametrize("record,message", [
    # each of these used to train on something else than the record says, or fail later unnamed
    (dict(ALIGN, conversations=[ALIGN["conversations"][0], {"from": "gpt", "value": None}]),
     "turn 1 has value None, not text"),
    ({"id": "PMC1_fig1", "conversations": ALIGN["conversations"]}, "no 'image' but 1 <image> in the conversation"),
    (dict(ALIGN, image=["a.png"]), "'image' is ['a.png'], not a file name"),
    (dict(ALIGN, image=None), "'image' is None, not a file name; leave the key out for a text-only record"),
    (dict(INSTRUCT, conversations=INSTRUCT["conversations"][:2] + [
        {"from": "human", "value": "<image>\nand this?"}, INSTRUCT["conversations"][3]]),
     "one image but 2 <image> in the conversation"),
])
def test_records_the_dataset_would_change_silently_are_refused(root, tok, record, message):
    with pytest.raises(ValueError, match=re.escape(f"train.json: record {record['id']!r}: {message}")):
        make([record], root, tok, source="train.json")


def test_check_data_names_file_line_and_id(root, tok, tmp_path):
    from minillavamed.data import DataError, check_data

    good = dict(ALIGN, image="a.png")
    lines = [good, dict(good, id="v", conversations=[ALIGN["conversations"][0], {"from": "gpt", "value": None}]),
             dict(good, id="m", image="missing.png"), good]
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in lines))
    args = (root, get_template("vicuna_v1"), tok, 512, N_IMG, 512)
    with pytest.raises(DataError) as e:
        check_data([path], *args)
    assert f"1 bad record(s), first: {path}:2 (id 'v'): turn 1 has value None" in str(e.value)
    assert f"1 bad image(s), first: {path}:3 (id 'm'): image file not found" in str(e.value)
    report = check_data([path], *args, skip_bad_records=True, skip_bad_images=True)
    assert report.records == [good, good]
    assert report.summary() == {"records_read": 4, "records_skipped": 2,
                                "skipped_reasons": {"bad record": 1, "bad image": 1}, "samples_truncated": 0}
    assert check_data([path], root, get_template("vicuna_v1"), tok, 30, N_IMG, 512, True, True).truncated == 2
    with pytest.raises(DataError, match=f"longer than the model's max_seq_len 20, which max_len 512 would keep, "
                                        f"first: {path}:1 \\(id 'PMC1_fig1'\\)"):
        check_data([path], root, get_template("vicuna_v1"), tok, 512, N_IMG, 20, True, True)


    # A typo in some released LLaVA-Med files; LLaVA-Med's own loader accepts it, so do we.
    typo = {"id": "t", "image": "a.png", "conversatons": ALIGN["conversations"]}
    assert len(make([typo], root, tok)) == 1


# ---- VQA ----

def test_question_files(tmp_path):
    import sample  # question files are read by sample.py's reader
    (tmp_path / "q.jsonl").write_text('{"question_id": 1, "image": "a.png", "text": "Is it?"}\n{"image": "b"}\n')
    with pytest.raises(SystemExit, match=r"q\.jsonl:2: the question has no 'question_id'"):
        sample.read_questions(tmp_path / "q.jsonl")
    vqa = {"id": "v1", "image": "a.png", "answer_type": "CLOSED",
           "conversations": [{"from": "human", "value": "<image>\nIs there an opacity?"},
                             {"from": "gpt", "value": "yes"}]}
    assert questions_from_vqa([vqa]) == [{"question_id": "v1", "text": "Is there an opacity?", "answer": "yes",
                                          "image": "a.png", "answer_type": "CLOSED"}]


def test_vqa_rad_converter_on_the_real_release(tmp_path, tok):
    if not os.path.isfile(os.path.join(VQA_RAD, "VQA_RAD Dataset Public.json")):
        pytest.skip(f"VQA-RAD not found at {os.path.abspath(VQA_RAD)}")
    train_path, test_path = convert_vqa_rad(VQA_RAD, tmp_path)
    train, test = load_records(train_path), load_records(test_path)
    assert (len(train), len(test)) == (1797, 451)  # the official split (SOURCE.md)
    assert sum(r["answer_type"] == "CLOSED" for r in test) == 272
    assert sum(r["answer_type"] == "OPEN" for r in test) == 179
    assert len({r["image"] for r in test}) == 203
    assert {r["answer_type"] for r in train} == {"OPEN", "CLOSED"}  # "CLOSED " normalised
    first = next(r for r in train if r["id"] == "0")
    assert first["image"] == "synpic54610.jpg" and first["conversations"] == [
        {"from": "human", "value": "<image>\nAre regions of the brain infarcted?"}, {"from": "gpt", "value": "Yes"}]
    ds = ConversationDataset(test[:3], os.path.join(VQA_RAD, "images"), get_template("vicuna_v1"), tok,
                             ImageProcessor.for_model(224, "pad"), max_len=2048, num_image_tokens=256)
    assert len(ds) == 3 and ds[0]["pixel_values"].shape == (3, 224, 224)


def test_im_start_end_samples_keep_the_image_in_place(root, tok):
    from minillavamed.tokenizer import Tokenizer
    v1 = Tokenizer(tok.path)
    v1.add_tokens(["<im_patch>", "<im_start>", "<im_end>"])
    ds = make([INSTRUCT], root, v1, template="llava_med_v1", im_start_end=True)
    ids, labels = tokenize_conversation(get_template("llava_med_v1"), INSTRUCT["conversations"], v1,
                                        im_start_end=True)
    item = ds[0]
    assert item["input_ids"].tolist() == ids and item["labels"].tolist() == labels
    p = ids.index(IMAGE_TOKEN_INDEX)
    assert ids[p - 1:p + 2] == [v1.added["<im_start>"], IMAGE_TOKEN_INDEX, v1.added["<im_end>"]]
    # "What is shown?\n<image>": the image follows the question, as the record has it.
    assert v1.decode(ids[:p]).endswith("### Human: What is shown?")
    with pytest.raises(ValueError, match="im_start"):
        make([INSTRUCT], root, tok, template="llava_med_v1", im_start_end=True)
