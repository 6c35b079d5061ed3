"""Tests for minillavamed/judge.py: the judged evaluation against a local stub server, score parsing, qa50's
record shapes and the summary's relative scores."""

import json
import sys
from pathlib import Path

import pytest

from minillavamed import judge

sys.path.insert(0, str(Path(__file__).parent))
from openai_stub import StubServer  # noqa: E402


def test_bad_question_file_names_file_and_line(tmp_path):
    q = tmp_path / "q.jsonl"
    q.write_text('{"question_id": "a", "text": "t", "fig_caption": "c"}\n{"question_id": "b", "text": "t"}\n')
    with pytest.raises(ValueError, match=r"q.jsonl:2: missing 'fig_caption'"):
        judge.load_judge_questions(str(q))


QUESTIONS = [
    {"question_id": "q1", "text": "What is shown?", "type": "conversation", "domain": {"chest_xray": True, "mri": False},
     "fig_label": "Fig. 1", "fig_caption": "Chest X-ray with cardiomegaly.", "in_text_mention": "Fig. 1 shows it."},
    {"question_id": "q2", "text": "Describe the image.", "type": "detailed_description", "domain": "mri",
     "fig_caption": "Brain MRI with a lesion.", "gpt4_answer": "A brain MRI showing a lesion."},
    {"question_id": "q3", "text": "Any finding?", "type": "conversation", "domain": "mri",
     "fig_caption": "MRI of the knee."},
    {"question_id": "q4", "text": "Unanswered?", "type": "conversation", "domain": "ct_scan", "fig_caption": "CT."},
]
MODEL_ANSWERS = {"q1": "An enlarged heart.", "q2": "A brain scan.", "q3": "A knee."}


def judge_reply(messages):
    if messages[0]["content"] == judge.REFERENCE_SYSTEM:
        return "REFERENCE: the heart looks enlarged."
    body = messages[-1]["content"]
    if "Chest X-ray" in body:
        return "8 6\nAssistant 1 is more detailed."
    if "Brain MRI" in body:
        return "Assistant 1: 5/10, Assistant 2: 5/10\nEqual."
    return "I would rather not score these."


def test_judge_against_local_server(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-judge-SECRET")
    (tmp_path / "q.jsonl").write_text("".join(json.dumps(q) + "\n" for q in QUESTIONS))
    (tmp_path / "a.jsonl").write_text("".join(json.dumps({"question_id": k, "text": v}) + "\n"
                                              for k, v in MODEL_ANSWERS.items()))
    with StubServer(reply=judge_reply) as stub:
        rc = judge.main(["--questions", str(tmp_path / "q.jsonl"), "--answers", str(tmp_path / "a.jsonl"),
                      "--model", "judge-gpt-4", "--base_url", stub.url, "--backoff_base", "0.01",
                      "--max_retries", "1", "--reviews", str(tmp_path / "reviews.jsonl"),
                      "--out", str(tmp_path / "summary.json")])
        assert rc == 0
        # q1 and q3 need a reference answer first; q2 brings its own; q4 has no model answer: no request.
        assert len(stub.requests) == 5
        judged_q1 = next(r["messages"][-1]["content"] for r in stub.requests if "Chest X-ray" in r["query"]
                         and r["messages"][0]["content"] == judge.JUDGE_SYSTEM)
    assert "[Assistant 1]\nREFERENCE: the heart looks enlarged." in judged_q1
    assert "[Assistant 2]\nAn enlarged heart." in judged_q1 and "Fig. 1 shows it." in judged_q1
    summary = json.loads((tmp_path / "summary.json").read_text())
    g = summary["groups"]
    assert g["overall"] == {"n": 2, "reference_score": 6.5, "model_score": 5.5, "relative_score": 87.5,
                            "relative_of_means": pytest.approx(100 * 5.5 / 6.5), "n_no_ratio": 0}
    assert g["type:conversation"]["relative_score"] == 75.0 and g["type:detailed_description"]["relative_score"] == 100.0
    assert g["domain:chest_xray"]["n"] == 1 and g["domain:mri"]["relative_score"] == 100.0
    assert set(summary["errors"]) == {"q3", "q4"} and summary["errors"]["q4"] == "missing answer"
    assert "two scores" in summary["errors"]["q3"]
    reviews = [json.loads(line) for line in (tmp_path / "reviews.jsonl").read_text().splitlines()]
    assert [r["question_id"] for r in reviews] == ["q1", "q2", "q3", "q4"]
    assert "relative_score" in capsys.readouterr().out


@pytest.mark.parametrize("text,scores", [("8 6\nwhy", (8.0, 6.0)), ("\n7.5 9", (7.5, 9.0)),
                                         ("Assistant 1: 8/10 Assistant 2: 3/10", (8.0, 3.0))])
def test_parse_judge_scores(text, scores):
    assert judge.parse_judge_scores(text) == scores


@pytest.mark.parametrize("text", ["8\n6", "Both are good.", "11 3", "8 6 4"])
def test_parse_judge_scores_rejects(text):
    with pytest.raises(ValueError, match="two scores"):
        judge.parse_judge_scores(text)


def test_judge_reads_qa50_shapes():
    q = {"question_id": 7, "text": "What is shown in the image?\n<image>", "fig_label": "Fig. 2",
         "fig_caption": "CT of the chest.", "in_text_mention": [{"tokens": "Fig. 2 shows a nodule."}],
         "domain": {"ct_scan": True, "chest_xray": True, "mri": False}, "type": "conversation"}
    body = judge.judge_messages(q, "ref", "ours")[-1]["content"]
    assert "[Question]\nWhat is shown in the image?\n\n" in body and "<image>" not in body
    assert "Fig. 2 shows a nodule." in body
    assert "<image>" not in judge.reference_messages(q)[-1]["content"]
    # Two domains true: the summary scripts' get_domain order (chest_xray before ct_scan), not the dict's.
    assert judge.question_domain(q) == "chest_xray"
    assert judge.question_domain({"domain": {"gross": True, "histology": True}}) == "histology"
    assert judge.question_domain({"domain": {"other": True}}) == "other"


def test_judge_score_zero_counts():
    row = {"type": "conversation", "domain": "mri"}
    rows = [{**row, "question_id": "a", "reference_score": 8.0, "model_score": 0.0},
            {**row, "question_id": "b", "reference_score": 8.0, "model_score": 8.0},
            {**row, "question_id": "c", "reference_score": 0.0, "model_score": 4.0}]
    assert judge.parse_judge_scores("8 0\nthe answer is empty") == (8.0, 0.0)
    g = judge.summarize_judgments(rows)["groups"]["overall"]
    # The 0 pulls the model down; the question whose reference scored 0 has no ratio but counts in the means.
    assert g["relative_score"] == 50.0 and g["n_no_ratio"] == 1 and g["n"] == 3
    assert g["model_score"] == 4.0 and g["relative_of_means"] == pytest.approx(100 * 4 / (16 / 3))
