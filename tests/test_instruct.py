"""Tests for minillavamed/instruct.py: prompts, reply parsing and post-processing."""

import random
import sys
from pathlib import Path

import pytest

from minillavamed import instruct

RECORD = {"pair_id": "PMC1_F2", "image": "PMC1_F2.jpg", "fig_label": "Figure 2",
          "fig_caption": "Chest X-ray with a right upper lobe consolidation.",
          "in_text_mention": ["Figure 2 shows the consolidation on admission.", "  "],
          "domain": {"chest_xray": True, "ct_scan": False}}


# ------------------------------------------------------------------ prompts

def test_few_shot_covers_the_five_domains_and_messages_alternate():
    assert [ex["domain"] for ex in instruct.FEW_SHOT_EXAMPLES] == ["chest_xray", "ct_scan", "mri", "histology", "gross"]
    msgs = instruct.build_messages(RECORD)
    assert msgs[0]["role"] == "system" and len(msgs) == 1 + 2 * 5 + 1
    assert [m["role"] for m in msgs[1:]] == ["user", "assistant"] * 5 + ["user"]
    for m in msgs[2:-1:2]:  # our few-shot replies parse back into their own pairs
        assert len(instruct.parse_reply(m["content"])) == 3
    assert msgs[-1]["content"] == "Figure Caption:\nFigure 2: Chest X-ray with a right upper lobe consolidation."


def test_inline_mentions_only_when_asked():
    plain = instruct.build_messages(RECORD, inline_mentions=False)[-1]["content"]
    inline = instruct.build_messages(RECORD, inline_mentions=True)[-1]["content"]
    assert "Figure Context" not in plain
    assert inline.endswith("Figure Context:\n- Figure 2 shows the consolidation on admission.")  # blank one dropped
    no_mentions = dict(RECORD, in_text_mention=None, fig_label=None)
    assert instruct.figure_context(no_mentions, True) == "Figure Caption:\n" + RECORD["fig_caption"]


# ------------------------------------------------------------------ parsing

def test_parse_plain_reply():
    reply = "User: What is shown?\nAssistant: A chest X-ray.\n\nUser: Any finding?\nAssistant: An opacity."
    assert instruct.parse_reply(reply) == [("What is shown?", "A chest X-ray."), ("Any finding?", "An opacity.")]


def test_parse_markdown_bold_numbered_and_gpt_labels():
    reply = ("Here is a possible conversation:\n\n"
             "1. **User:** What modality is this?\n"
             "2. **Assistant:** It is an axial **MRI** of the brain.\n\n\n\n"
             "---\n"
             "**User 2**: Where is the lesion?\n"
             "**GPT**: In the left frontal lobe.\n"
             "It is about 2 cm.\n"
             "- Human: Is there edema?\n"
             "- AI: Mild surrounding edema is present.")
    assert instruct.parse_reply(reply) == [
        ("What modality is this?", "It is an axial **MRI** of the brain."),
        ("Where is the lesion?", "In the left frontal lobe.\nIt is about 2 cm."),
        ("Is there edema?", "Mild surrounding edema is present."),
    ]


def test_parse_stray_roles_and_blank_lines():
    reply = ("Assistant: Let me start.\n\n"           # leading answer without a question: dropped
             "User: What stain is used?\n\n\n"
             "User: And what magnification?\n"        # repeated role: merged into one question
             "Assistant:\n\nH&E at x400.\n\n"
             "Q: Are there mitoses?\nA: Several are visible.\n"
             "User: One more question?")               # trailing unanswered question: dropped
    assert instruct.parse_reply(reply) == [
        ("What stain is used?\nAnd what magnification?", "H&E at x400."),
        ("Are there mitoses?", "Several are visible."),
    ]


def test_parse_does_not_split_on_words_inside_a_line():
    reply = "User: Is the user: field relevant?\nAssistant: The answer: yes, clearly."
    assert instruct.parse_reply(reply) == [("Is the user: field relevant?", "The answer: yes, clearly.")]


@pytest.mark.parametrize("reply,reason", [
    ("I'm sorry, but I can't help with that.", "refusal"),
    ("The image shows a kidney.", "no role labels"),
    ("User: What is this?", "no complete question/answer pair"),
    ("", "no role labels"),
])
def test_parse_rejects_unusable_replies(reply, reason):
    with pytest.raises(instruct.ReplyError, match=reason):
        instruct.parse_reply(reply)


# ------------------------------------------------------------------ post-processing

def test_clean_drops_no_access_turns_and_strips_text_prefixes():
    pairs = [
        ("What organ is shown?", "I cannot see the image, but it is likely the liver."),
        ("Is there a mass?", "Based on the caption, there is a 3 cm mass in the liver."),
        ("Is it enhancing?", "Yes, according to the figure caption, the rim enhances."),
        ("Where exactly?", "In segment VII, as mentioned in the caption."),
        ("What size?", "The caption says it is 3 cm."),                       # still cites the text: dropped
        ("According to the description, what is the density?", "It is hypodense."),
        ("Can you see the vessels?", "I don't have access to the actual image."),
    ]
    assert instruct.clean_pairs(pairs) == [
        ("Is there a mass?", "There is a 3 cm mass in the liver."),
        ("Is it enhancing?", "Yes, the rim enhances."),
        ("Where exactly?", "In segment VII."),
        ("What is the density?", "It is hypodense."),
    ]


def test_to_llava_record_places_image_token_seeded_and_keeps_domain():
    reply = ("User: What modality?\nAssistant: As an AI I cannot view images.\n"
             "User: What is visible?\nAssistant: A consolidation.\nUser: Where?\nAssistant: Right upper lobe.")
    rec = instruct.to_llava_record(RECORD, reply, instruct.record_rng(0, RECORD["pair_id"]))
    assert rec["id"] == "PMC1_F2" and rec["image"] == "PMC1_F2.jpg" and rec["domain"] == RECORD["domain"]
    conv = rec["conversations"]
    assert [t["from"] for t in conv] == ["human", "gpt", "human", "gpt"]
    first = conv[0]["value"]  # the dropped first pair moved <image> to the first kept question
    assert first in ("<image>\nWhat is visible?", "What is visible?\n<image>")
    assert sum(t["value"].count("<image>") for t in conv) == 1
    again = instruct.to_llava_record(RECORD, reply, instruct.record_rng(0, RECORD["pair_id"]))
    assert again == rec  # same seed and id: same placement, whatever the run order
    placements = {instruct.to_llava_record(dict(RECORD, pair_id=f"p{i}"), reply, instruct.record_rng(0, f"p{i}"))
                  ["conversations"][0]["value"].startswith("<image>") for i in range(40)}
    assert placements == {True, False}
    with pytest.raises(instruct.ReplyError, match="no usable turns"):
        instruct.to_llava_record(RECORD, "User: Q?\nAssistant: I cannot see the image.", random.Random(0))


def test_alignment_record():
    rec = instruct.alignment_record(RECORD, instruct.record_rng(3, "x"))
    human, gpt = rec["conversations"]
    assert gpt == {"from": "gpt", "value": RECORD["fig_caption"]}
    instr = human["value"].replace("<image>", "").strip()
    assert instr in instruct.DESCRIBE_INSTRUCTIONS and human["value"].count("<image>") == 1


# ------------------------------------------------------------------ record shapes of the released files

def test_in_text_mention_as_tokens_dicts_string_or_null():
    # LLaVA-Med's instruct_generate.py reads {"tokens": sentence} entries as well as plain strings.
    dicts = dict(RECORD, in_text_mention=[{"tokens": "Figure 2 shows the consolidation."}, {"tokens": " "},
                                          "A second mention."])
    assert instruct.figure_context(dicts, True).endswith(
        "Figure Context:\n- Figure 2 shows the consolidation.\n- A second mention.")
    assert instruct.figure_context(dicts, False) == instruct.figure_context(dict(RECORD, in_text_mention=[]), True)
    assert instruct.figure_context(dict(RECORD, in_text_mention="One sentence."), True).endswith("- One sentence.")
    assert instruct.mention_texts(None) == instruct.mention_texts([]) == []
    with pytest.raises(ValueError, match="in_text_mention"):
        instruct.mention_texts([3])


def test_domain_dict_input_and_default_image_name():
    # instruct_generate.py's input is {domain: [records]}, walked round-robin; instruct_postprocess.py names
    # the image pair_id + ".jpg".
    data = {"chest_xray": [{"pair_id": "a1", "fig_caption": "x"}, {"pair_id": "a2", "fig_caption": "x"}],
            "mri": [{"pair_id": "b1", "fig_caption": "y", "domain": "mri", "image": "b1.png"}]}
    recs = instruct.pmc_records(data)
    assert [r["pair_id"] for r in recs] == ["a1", "b1", "a2"]
    assert [r["domain"] for r in recs] == ["chest_xray", "mri", "chest_xray"]
    assert [r["image"] for r in recs] == ["a1.jpg", "b1.png", "a2.jpg"]
    assert instruct.pmc_records([{"pair_id": "c"}]) == [{"pair_id": "c", "image": "c.jpg"}]
    with pytest.raises(ValueError, match="domain"):
        instruct.pmc_records("nope")


def test_generate_data_reads_the_domain_dict_file(tmp_path):
    import json
    sys.path.insert(0, str(Path(__file__).parents[1]))
    import generate_data
    path = tmp_path / "llava_med_instruct_fig_captions.json"
    path.write_text(json.dumps({"ct_scan": [{"pair_id": "p1", "fig_label": "Fig. 1", "fig_caption": "CT.",
                                             "in_text_mention": [{"tokens": "See Fig. 1."}]}]}))
    recs = generate_data.load_records(str(path))
    assert recs == [{"pair_id": "p1", "fig_label": "Fig. 1", "fig_caption": "CT.",
                     "in_text_mention": [{"tokens": "See Fig. 1."}], "domain": "ct_scan", "image": "p1.jpg"}]
    assert "- See Fig. 1." in instruct.build_messages(recs[0], inline_mentions=True)[-1]["content"]
