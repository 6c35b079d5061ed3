"""Evaluation (paper §5): LLaVA-Med's VQA metrics (the GPT-4-judged conversations are judge.py's).

VQA. The reference (microsoft/LLaVA-Med v1.0.0, llava/eval/run_eval_batch.py + eval_metrics/) lower-cases and
normalises both answers (VQA-style: punctuation, number words, articles, contractions), then reports
  closed questions: "yes/no accuracy", hit = `normalized_gt in normalized_pred`, a CHARACTER substring test, so
                    the answer "no" matches "not sure" and "abnormal"; (its first run_eval.py also skipped wrong
                    closed answers that contained yes/no instead of counting them as wrong, fixed in PR #35);
  open questions:   "recall" from calculate_f1score: tp / (tp + fn) over words, where tp adds the PREDICTION's
                    count of each shared word (so "left left" recalls 2/3 of "left lung").
Our default rules are word-level: a closed yes/no answer is correct when the first yes/no word of the prediction
is the ground truth; other closed answers when the ground-truth words appear contiguously in the prediction;
open recall = clipped word overlap / ground-truth words. `substring_compat=True` reproduces the reference's two
published numbers exactly (its substring hit and its recall formula) for comparison with the paper's tables.
That closed rule is run_eval_batch.py's. v1.0's run_eval.py and the PathVQA scripts also need "yes" or "no"
somewhere in the prediction for any closed hit, so a closed question with another answer never scores there
(perfect answers get 93.38%, 254 of 272, on VQA-RAD's test split); we do not reproduce that rule, it scores
the answer's form rather than its content.
Exact match (normalised strings equal) and token F1 (SQuAD-style, clipped counts) are ours; the reference's
"exact match score" is a different quantity and is not reproduced.

python -m minillavamed.evaluation vqa --gt GT.json --answers ANSWERS.jsonl [--out SCORES.json]
"""

import argparse
import json
import re
import sys
from collections import Counter, defaultdict

from minillavamed.data import conversations_of, vqa_rad_splits
from minillavamed.records import load_records, located_records

# ----------------------------------------------------------------------------- answer normalisation

_PUNCT = [";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!"]
# Kept as the reference wrote it: "(?!<=\d)" was meant as a look-behind, so only periods followed by a digit
# survive ("3.5" stays, "1." loses its period).
_PERIOD_RE = re.compile(r"(?!<=\d)(\.)(?!\d)")
_NUMBER_IN_COMMAS_RE = re.compile(r"(\d)(,)(\d)")
_NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
                 "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_ARTICLES = {"a", "an", "the"}
# Contractions written without apostrophes are restored (the VQA evaluation's table): every form below, with
# any of its apostrophes dropped, maps back to it. The reference's "I" forms are keyed in capitals and never fire
# after lower-casing, so they are left out here too.
_CONTRACTED = ("ain't aren't can't could've couldn't couldn't've didn't doesn't don't hadn't hadn't've hasn't "
               "haven't he'd he'd've he's how'd how'll how's isn't it'd it'd've it'll ma'am "
               "mightn't mightn't've might've mustn't must've needn't not've o'clock oughtn't shan't she'd've "
               "should've shouldn't shouldn't've somebody'd've somebody'll somebody's someone'd someone'd've "
               "someone'll someone's something'd something'd've something'll that's there'd there'd've there're "
               "there's they'd they'd've they'll they're they've 'twas wasn't we'd've we've weren't what'll "
               "what're what's what've when's where'd where's where've who'd who'd've who'll who's who've why'll "
               "why're why's won't would've wouldn't wouldn't've y'all y'all'll y'all'd've you'd you'd've you'll "
               "you're you've").split()


def _apostrophe_variants(form: str) -> set[str]:
    parts = form.split("'")
    variants = {""}
    for i, part in enumerate(parts):
        variants = {v + part for v in variants} if i == 0 else {v + sep + part for v in variants for sep in ("", "'")}
    return variants - {form}


_CONTRACTIONS = {v: form for form in _CONTRACTED for v in _apostrophe_variants(form)}


def normalize_answer(text: str) -> str:
    """The reference's answer normalisation: lower-case, punctuation, number words, articles, contractions."""
    text = str(text).lower()
    # A mark touching a space anywhere in the answer is deleted (so "left / right" leaves no empty word),
    # otherwise it becomes a space ("left/right" -> two words); an answer holding a number written with commas
    # has every mark deleted.
    number_with_commas = _NUMBER_IN_COMMAS_RE.search(text) is not None
    out = text
    for p in _PUNCT:
        out = out.replace(p, "" if (p + " " in text or " " + p in text or number_with_commas) else " ")
    out = _PERIOD_RE.sub("", out)
    words = [_NUMBER_WORDS.get(w, w) for w in out.split()]
    words = [_CONTRACTIONS.get(w, w) for w in words if w not in _ARTICLES]
    return " ".join(words).replace(",", "")


def _tokens(text: str) -> list[str]:
    return normalize_answer(text).split()


# ----------------------------------------------------------------------------- VQA metrics

def closed_correct(pred: str, gt: str, substring_compat: bool = False) -> bool:
    """Closed-set hit. Word-level by default; substring_compat is the reference's `gt in pred` on strings."""
    if substring_compat:
        return normalize_answer(gt) in normalize_answer(pred)
    p, g = _tokens(pred), _tokens(gt)
    if not g:
        return False
    if g in (["yes"], ["no"]):
        # The first yes/no word is the answer: "no, there is no mass" is no; "not sure" answers nothing.
        first = next((w for w in p if w in ("yes", "no")), None)
        return first == g[0]
    return any(p[i:i + len(g)] == g for i in range(len(p) - len(g) + 1))


def open_recall(pred: str, gt: str, substring_compat: bool = False) -> float:
    """Fraction of ground-truth words found in the prediction (clipped counts; see module doc for compat)."""
    p, g = Counter(_tokens(pred)), Counter(_tokens(gt))
    if not p or not g:
        return 0.0
    if substring_compat:
        tp = sum(p[w] for w in p if w in g)
        fn = sum(g[w] for w in g if w not in p)
        return tp / (tp + fn) if tp else 0.0
    return sum((p & g).values()) / sum(g.values())


def exact_match(pred: str, gt: str) -> float:
    return float(normalize_answer(pred) == normalize_answer(gt))


def token_f1(pred: str, gt: str) -> float:
    p, g = Counter(_tokens(pred)), Counter(_tokens(gt))
    common = sum((p & g).values())
    if common == 0:
        return 0.0
    precision, recall = common / sum(p.values()), common / sum(g.values())
    return 2 * precision * recall / (precision + recall)


# answer_type values of the released files: VQA-RAD/SLAKE use CLOSED/OPEN; LLaVA-Med's PathVQA scripts
# (run_eval_pvqa.py) also read "yes/no" as closed and "other"/"number" as open.
ANSWER_KINDS = {"CLOSED": "CLOSED", "YES/NO": "CLOSED", "OPEN": "OPEN", "OTHER": "OPEN", "NUMBER": "OPEN"}


def answer_kind(record: dict) -> str:
    return ANSWER_KINDS[str(record["answer_type"]).strip().upper()]


def load_ground_truth(path: str) -> list[dict]:
    """LLaVA-format VQA ground truth (a JSON array or JSON lines), or the VQA-RAD release file (its official
    test split); errors name the file and the record."""
    data = load_records(path)
    if data and "phrase_type" in data[0]:
        return vqa_rad_splits(data, path)["test"]
    for i, r in enumerate(data):
        for key in ("id", "answer_type"):
            if key not in r:
                raise ValueError(f"{path}: record {i}: missing '{key}'")
        if "conversations" not in r and "conversatons" not in r:
            raise ValueError(f"{path}: record {i}: missing 'conversations'")
        turns = conversations_of(r)
        if not isinstance(turns, list) or len(turns) < 2 or not isinstance(turns[1], dict) or "value" not in turns[1]:
            raise ValueError(f"{path}: record {i}: 'conversations' needs a question and an answer turn")
        if str(r["answer_type"]).strip().upper() not in ANSWER_KINDS:
            raise ValueError(f"{path}: record {i}: answer_type {r['answer_type']!r} is not one of "
                             f"{sorted(ANSWER_KINDS)}")
    return data


def load_answers(path: str) -> dict[str, str]:
    """question_id -> text from a JSONL answers file (sample.py's output); duplicates are an error."""
    answers = {}
    for where, row in located_records(path):
        try:
            qid, text = str(row["question_id"]), row["text"]
        except KeyError as e:
            raise ValueError(f"{where}: expected a JSON object with question_id and text ({e})") from None
        if qid in answers:
            raise ValueError(f"{where}: duplicate question_id {qid!r}")
        answers[qid] = text
    return answers


def score_vqa(ground_truth: list[dict], answers: dict[str, str], substring_compat: bool = False) -> dict:
    """Scores in percent per answer type and overall; a missing answer scores zero and is listed."""
    groups: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    missing, rows = [], []
    for r in ground_truth:
        qid, kind = str(r["id"]), answer_kind(r)
        gt = str(conversations_of(r)[1]["value"])
        pred = answers.get(qid)
        is_missing = pred is None
        if is_missing:
            missing.append(qid)
            pred = ""
        em, f1 = exact_match(pred, gt), token_f1(pred, gt)
        row = {"id": qid, "answer_type": kind, "gt": gt, "pred": pred, "exact_match": em, "token_f1": f1}
        if kind == "CLOSED":
            row["correct"] = float(closed_correct(pred, gt, substring_compat))
            groups[kind]["closed_accuracy"].append(row["correct"])
        else:
            row["recall"] = open_recall(pred, gt, substring_compat)
            groups[kind]["open_recall"].append(row["recall"])
        for g in (kind, "overall"):
            groups[g]["exact_match"].append(em)
            groups[g]["token_f1"].append(f1)
            groups[g]["missing"].append(float(is_missing))
        rows.append(row)
    summary = {}
    for g in ("CLOSED", "OPEN", "overall"):
        if g not in groups:
            continue
        m = groups[g]
        summary[g] = {"n": len(m["exact_match"]), "missing": int(sum(m["missing"]))}
        for key in ("closed_accuracy", "open_recall", "exact_match", "token_f1"):
            summary[g][key] = 100 * sum(m[key]) / len(m[key]) if m.get(key) else None
    unexpected = sorted(set(answers) - {str(r["id"]) for r in ground_truth})
    return {"substring_compat": substring_compat, "scores": summary, "missing_ids": missing,
            "unexpected_answer_ids": unexpected, "per_question": rows}


def majority_answers(train: list[dict], ground_truth: list[dict]) -> dict[str, str]:
    """The majority-answer baseline: every question gets the most common training answer of its type."""
    counts: dict[str, Counter] = defaultdict(Counter)
    for r in train:
        counts[answer_kind(r)][normalize_answer(str(conversations_of(r)[1]["value"]))] += 1
    best = {kind: c.most_common(1)[0][0] for kind, c in counts.items()}
    return {str(r["id"]): best.get(answer_kind(r), "") for r in ground_truth}


def format_table(header: list[str], rows: list[list]) -> str:
    cells = [[f"{v:.2f}" if isinstance(v, float) else "-" if v is None else str(v) for v in row] for row in rows]
    widths = [max(len(str(x)) for x in col) for col in zip(header, *cells)]
    line = lambda row: "  ".join(str(x).rjust(w) for x, w in zip(row, widths))  # noqa: E731
    return "\n".join([line(header), line(["-" * w for w in widths])] + [line(r) for r in cells])


def vqa_table(result: dict) -> str:
    keys = ["n", "missing", "closed_accuracy", "open_recall", "exact_match", "token_f1"]
    return format_table(["type"] + keys, [[g] + [s[k] for k in keys] for g, s in result["scores"].items()])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    v = sub.add_parser("vqa", help="closed accuracy, open recall, exact match and token F1")
    v.add_argument("--gt", required=True, help="LLaVA-format VQA JSON, or the VQA-RAD release file")
    given = v.add_mutually_exclusive_group(required=True)
    given.add_argument("--answers", help="JSONL with question_id and text")
    given.add_argument("--majority", help="score the majority-answer baseline fitted on this training VQA file")
    v.add_argument("--out", help="write the scores (and per-question rows) as JSON")
    v.add_argument("--substring_compat", action="store_true", help="the reference's substring rule and recall")
    args = p.parse_args(argv)

    gt = load_ground_truth(args.gt)
    answers = (majority_answers(load_ground_truth(args.majority), gt) if args.majority
               else load_answers(args.answers))
    result = score_vqa(gt, answers, args.substring_compat)
    print(vqa_table(result))
    if result["missing_ids"]:
        print(f"{len(result['missing_ids'])} questions have no answer (scored as wrong): "
              f"{', '.join(result['missing_ids'][:10])}{' ...' if len(result['missing_ids']) > 10 else ''}")
    if result["unexpected_answer_ids"]:
        print(f"{len(result['unexpected_answer_ids'])} answers match no question and were ignored")
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=1, ensure_ascii=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
