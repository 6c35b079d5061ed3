"""Tests for minillavamed/evaluation.py: VQA metrics with hand-computed expectations (including the reference's
substring pitfall and the PR #35 bug) and VQA-RAD's official split."""

import json
from pathlib import Path

import pytest

from minillavamed import evaluation as ev

VQA_RAD = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "vqa-rad" / "VQA_RAD Dataset Public.json"


@pytest.mark.parametrize("raw,norm", [
    ("The Left Lung.", "left lung"),
    ("Two", "2"),
    ("none", "0"),
    ("it isnt", "it isn't"),
    ("left/right", "left right"),
    ("x-ray, CT", "x ray ct"),  # "," touches a space: deleted; "-" does not: becomes a space
    ("1,000 cells (approx)", "1000 cells approx"),
    ("3.5 cm.", "3.5 cm"),
])
def test_normalize_answer(raw, norm):
    assert ev.normalize_answer(raw) == norm


@pytest.mark.parametrize("pred,gt,ours,reference", [
    ("not sure", "no", False, True),            # the substring pitfall: "no" inside "not"
    ("abnormal", "no", False, True),            # ... and inside "abnormal"
    ("Yes, but there is no mass", "no", False, True),
    ("No, there is no mass.", "no", True, True),
    ("yes", "Yes", True, True),
    ("the left kidney", "left", True, True),
    ("right", "left", False, False),
    ("", "yes", False, False),
])
def test_closed_rules(pred, gt, ours, reference):
    assert ev.closed_correct(pred, gt) is ours
    assert ev.closed_correct(pred, gt, substring_compat=True) is reference


def test_open_recall_exact_match_and_f1():
    assert ev.open_recall("The left upper lobe", "left lung") == 0.5
    assert ev.open_recall("The left upper lobe", "left lung", substring_compat=True) == 0.5
    # The reference counts the prediction's repeats: "left left" recalls 2/3 of "left lung"; we say 1/2.
    assert ev.open_recall("left left", "left lung") == 0.5
    assert ev.open_recall("left left", "left lung", substring_compat=True) == pytest.approx(2 / 3)
    assert ev.open_recall("", "left lung") == 0.0
    assert ev.exact_match("The Liver.", "liver") == 1.0 and ev.exact_match("liver lobe", "liver") == 0.0
    assert ev.token_f1("left upper lobe", "left lobe") == pytest.approx(0.8)  # P 2/3, R 1
    assert ev.token_f1("kidney", "liver") == 0.0


GT = [
    {"id": "c1", "answer_type": "CLOSED", "conversations": [{"from": "human", "value": "<image>\nq"},
                                                            {"from": "gpt", "value": "yes"}]},
    {"id": "c2", "answer_type": "CLOSED", "conversations": [{"from": "human", "value": "q"},
                                                            {"from": "gpt", "value": "no"}]},
    {"id": "c3", "answer_type": "CLOSED ", "conversations": [{"from": "human", "value": "q"},
                                                             {"from": "gpt", "value": "no"}]},
    {"id": "o1", "answer_type": "OPEN", "conversations": [{"from": "human", "value": "q"},
                                                          {"from": "gpt", "value": "left lung"}]},
    {"id": "o2", "answer_type": "OPEN", "conversations": [{"from": "human", "value": "q"},
                                                          {"from": "gpt", "value": "pleural effusion"}]},
]
ANSWERS = {"c1": "Yes.", "c2": "not sure", "o1": "left lung", "o2": "an effusion on the right", "zz": "extra"}


def test_score_vqa_hand_computed():
    res = ev.score_vqa(GT, ANSWERS)
    s = res["scores"]
    assert res["missing_ids"] == ["c3"] and res["unexpected_answer_ids"] == ["zz"]
    assert s["CLOSED"]["n"] == 3 and s["CLOSED"]["missing"] == 1 and s["overall"]["missing"] == 1
    assert s["CLOSED"]["closed_accuracy"] == pytest.approx(100 / 3)  # c1 right, c2 "not sure" wrong, c3 missing
    assert s["OPEN"]["open_recall"] == pytest.approx(75.0)  # 1 and 1/2
    assert s["OPEN"]["closed_accuracy"] is None and s["CLOSED"]["open_recall"] is None
    assert s["overall"]["exact_match"] == pytest.approx(40.0)  # c1, o1 of 5
    # token F1: c1 1, c2 0, c3 0, o1 1, o2 "effusion on right" vs "pleural effusion": P 1/3, R 1/2 -> 0.4
    assert s["OPEN"]["token_f1"] == pytest.approx(70.0)
    assert s["overall"]["token_f1"] == pytest.approx(48.0)
    compat = ev.score_vqa(GT, ANSWERS, substring_compat=True)["scores"]
    assert compat["CLOSED"]["closed_accuracy"] == pytest.approx(200 / 3)  # "no" found in "not sure"


def test_wrong_closed_answer_counts_as_wrong():
    """LLaVA-Med before PR #35 appended nothing for a wrong answer that contained yes/no, so 1 right + 1 wrong
    scored 100%. It must score 50% in both modes."""
    gt = [dict(GT[0], id="a"), dict(GT[0], id="b")]
    for compat in (False, True):
        res = ev.score_vqa(gt, {"a": "yes", "b": "no, it is not"}, substring_compat=compat)
        assert res["scores"]["CLOSED"]["closed_accuracy"] == 50.0


def test_bad_inputs_name_file_and_line(tmp_path):
    ans = tmp_path / "answers.jsonl"
    ans.write_text('{"question_id": 1, "text": "yes"}\n{"question_id": "1", "text": "no"}\n')
    with pytest.raises(ValueError, match=r"answers.jsonl:2: duplicate question_id '1'"):
        ev.load_answers(str(ans))
    ans.write_text('{"question_id": 1}\n')
    with pytest.raises(ValueError, match=r"answers.jsonl:1: expected a JSON object with question_id and text"):
        ev.load_answers(str(ans))
    gt = tmp_path / "gt.json"
    gt.write_text(json.dumps([dict(GT[0], answer_type="MAYBE")]))
    with pytest.raises(ValueError, match=r"gt.json: record 0: answer_type 'MAYBE'"):
        ev.load_ground_truth(str(gt))


def test_vqa_cli_writes_json_and_table(tmp_path, capsys):
    (tmp_path / "gt.json").write_text(json.dumps(GT))
    # sample.py's answer records carry more fields; only question_id and text are read.
    (tmp_path / "ans.jsonl").write_text("".join(json.dumps({"question_id": k, "prompt": "q", "text": v,
                                                            "answer_id": "x", "model_id": "m"}) + "\n"
                                                for k, v in ANSWERS.items()))
    assert ev.main(["vqa", "--gt", str(tmp_path / "gt.json"), "--answers", str(tmp_path / "ans.jsonl"),
                    "--out", str(tmp_path / "scores.json")]) == 0
    printed = capsys.readouterr().out
    assert "closed_accuracy" in printed and "33.33" in printed and "1 questions have no answer" in printed
    saved = json.loads((tmp_path / "scores.json").read_text())
    assert saved["scores"]["OPEN"]["open_recall"] == 75.0 and len(saved["per_question"]) == 5


def test_vqa_rad_official_test_split():
    if not VQA_RAD.exists():
        pytest.skip(f"VQA-RAD not found at {VQA_RAD} (shared read-only data)")
    gt = ev.load_ground_truth(str(VQA_RAD))
    kinds = [r["answer_type"] for r in gt]
    assert len(gt) == 451 and kinds.count("CLOSED") == 272 and kinds.count("OPEN") == 179
    # Always answering "yes" scores the share of "yes" among closed answers, and 0 recall only where no
    # ground-truth word is "yes".
    closed = [r for r in gt if r["answer_type"] == "CLOSED"]
    n_yes = sum(ev.normalize_answer(r["conversations"][1]["value"]) == "yes" for r in closed)
    res = ev.score_vqa(gt, {r["id"]: "yes" for r in gt})
    assert res["scores"]["CLOSED"]["closed_accuracy"] == pytest.approx(100 * n_yes / 272)
    assert 0.3 < n_yes / 272 < 0.7 and res["missing_ids"] == []


def test_majority_baseline_answers_the_most_common_training_answer_per_type():
    from minillavamed.evaluation import majority_answers

    def rec(i, a, kind):
        return {"id": i, "answer_type": kind, "conversations": [{"from": "human", "value": "q"},
                                                                 {"from": "gpt", "value": a}]}

    train = [rec("a", "No", "CLOSED"), rec("b", "no", "CLOSED"), rec("c", "yes", "CLOSED"),
             rec("d", "left lung", "OPEN"), rec("e", "Left lung.", "OPEN"), rec("f", "liver", "OPEN")]
    test = [rec("x", "no", "CLOSED"), rec("y", "yes", "CLOSED"), rec("z", "left kidney", "OPEN")]
    answers = majority_answers(train, test)
    assert answers == {"x": "no", "y": "no", "z": "left lung"}
    scores = ev.score_vqa(test, answers)["scores"]
    assert scores["CLOSED"]["closed_accuracy"] == 50.0 and scores["OPEN"]["open_recall"] == 50.0


# ----------------------------------------------------------------------------- shapes of the released files

def _gt(i, answer, kind, key="conversations"):
    return {"id": i, "answer_type": kind, key: [{"from": "human", "value": "<image>\nq"},
                                               {"from": "gpt", "value": answer}]}


def test_misspelt_conversatons_key_is_read(tmp_path):
    # LLaVA-Med's run_eval*.py fall back to "conversatons", which some released files use.
    path = tmp_path / "gt.json"
    path.write_text(json.dumps([_gt("1", "yes", "CLOSED", "conversatons"), _gt("2", "left lung", "OPEN")]))
    gt = ev.load_ground_truth(str(path))
    scores = ev.score_vqa(gt, {"1": "yes", "2": "the left lung"})["scores"]
    assert scores["CLOSED"]["closed_accuracy"] == 100.0 and scores["OPEN"]["open_recall"] == 100.0
    assert ev.majority_answers(gt, gt) == {"1": "yes", "2": "left lung"}
    path.write_text(json.dumps([{"id": "1", "answer_type": "OPEN"}]))
    with pytest.raises(ValueError, match="record 0: missing 'conversations'"):
        ev.load_ground_truth(str(path))
    path.write_text(json.dumps([{"id": "1", "answer_type": "OPEN", "conversations": [{"from": "human"}]}]))
    with pytest.raises(ValueError, match="record 0: 'conversations' needs a question and an answer"):
        ev.load_ground_truth(str(path))


def test_pathvqa_answer_types_and_numeric_answers(tmp_path):
    # run_eval_pvqa.py reads "yes/no" as closed and "other"/"number" as open; answers may be bare numbers.
    path = tmp_path / "gt.json"
    path.write_text(json.dumps([_gt("1", "no", "yes/no"), _gt("2", "fibrosis", "other"), _gt("3", 3, "number")]))
    res = ev.score_vqa(ev.load_ground_truth(str(path)), {"1": "No.", "2": "fibrosis", "3": "three"})
    assert res["scores"]["CLOSED"] == pytest.approx({"n": 1, "missing": 0, "closed_accuracy": 100.0,
                                                     "open_recall": None, "exact_match": 100.0, "token_f1": 100.0})
    assert res["scores"]["OPEN"]["n"] == 2 and res["scores"]["OPEN"]["open_recall"] == 100.0
    path.write_text(json.dumps([_gt("1", "no", "maybe")]))
    with pytest.raises(ValueError, match="answer_type 'maybe'"):
        ev.load_ground_truth(str(path))
