"""The GPT-4-judged conversation evaluation (paper §5, Table 2's relative scores).

A text-only model answers each question from the figure caption and context (the reference answer, unless the
question file carries one in "gpt4_answer"); the judge rates both answers 1-10 for helpfulness, relevance,
accuracy and level of detail (0-10: a 0 counts, leaving it out would raise the model's mean); relative score =
mean over questions of model / reference x 100, as LLaVA-Med's scripts average per-question ratios, and beside
it the ratio of the mean scores that LLaVA's summarize_gpt_review.py reports; by question type, by domain (the
first true one in LLaVA-Med's get_domain order) and overall. Its record shapes are qa50's. Requests go through
api.py's client to any OpenAI-compatible endpoint (serve.py's too).

python -m minillavamed.judge --questions Q.jsonl --answers ANSWERS.jsonl --model NAME [--base_url URL]
"""

import argparse
import asyncio
import json
import re
import sys
from collections import defaultdict

from minillavamed.api import APIFailure, ChatClient, ClientConfig, FatalAPIError, redact
from minillavamed.evaluation import format_table, load_answers
from minillavamed.instruct import figure_context
from minillavamed.records import located_records

REFERENCE_SYSTEM = ("You are a biomedical expert. You cannot see the figure, but you are given its caption and "
                    "the sentences of the article that mention it. Answer the user's question about the figure "
                    "as if you were looking at it, without mentioning the caption or the text.")
JUDGE_SYSTEM = "You are a careful, impartial reviewer of answers to questions about biomedical images."
JUDGE_INSTRUCTION = (
    "Two AI assistants answered the question above about a biomedical image. You cannot see the image; the "
    "caption and context describe it. Rate each answer for helpfulness, relevance, accuracy and level of detail, "
    "as one overall score from 1 to 10 (higher is better).\n"
    "On the first line write only the two scores, Assistant 1 first, separated by a space. From the next line "
    "on, explain your rating; the order of the answers must not influence it.")


def _context_text(q: dict) -> str:
    # in_text_mention as a string, a list of strings or of {"tokens": ...} dicts (instruct.mention_texts).
    return figure_context(q, inline_mentions=True)


def question_text(q: dict) -> str:
    """The question without its "<image>" marker (qa50's texts end in "\n<image>", which v1.0's
    eval_multimodal_chat_gpt_score.py cut off with [:-8])."""
    return q["text"].replace("<image>", "").strip()


def reference_messages(q: dict) -> list[dict]:
    """The text-only reference answer's request: caption + context + the question, no image."""
    return [{"role": "system", "content": REFERENCE_SYSTEM},
            {"role": "user", "content": f"{_context_text(q)}\n\nQuestion: {question_text(q)}"}]


def judge_messages(q: dict, reference_answer: str, model_answer: str) -> list[dict]:
    """Assistant 1 is the reference, Assistant 2 the model, as in the reference's fixed order."""
    body = (f"[Context]\n{_context_text(q)}\n\n[Question]\n{question_text(q)}\n\n"
            f"[Assistant 1]\n{reference_answer}\n[End of Assistant 1]\n\n"
            f"[Assistant 2]\n{model_answer}\n[End of Assistant 2]\n\n[Instruction]\n{JUDGE_INSTRUCTION}")
    return [{"role": "system", "content": JUDGE_SYSTEM}, {"role": "user", "content": body}]


def parse_judge_scores(text: str) -> tuple[float, float]:
    """The two scores on the reply's first non-empty line ("8 6", "8/10 6/10", "Assistant 1: 8, Assistant 2: 6").

    0 is a score like any other (the judge gives it to an empty or off-topic answer); leaving it out, as an
    earlier version did, raised the model's mean. The reference scripts take whatever number is there."""
    first = next((line for line in text.splitlines() if line.strip()), "")
    stripped = re.sub(r"/\s*10\b", " ", re.sub(r"assistant\s*[12]", " ", first, flags=re.IGNORECASE))
    nums = [float(x) for x in re.findall(r"\d+(?:\.\d+)?", stripped)]
    if len(nums) != 2 or not all(0 <= x <= 10 for x in nums):
        raise ValueError(f"expected two scores 0-10 on the first line of the review, got {first[:80]!r}")
    return nums[0], nums[1]


# The order in which LLaVA-Med's summary scripts (get_domain) look for the first true domain.
DOMAIN_ORDER = ("chest_xray", "mri", "histology", "gross", "ct_scan")


def question_domain(q: dict) -> str:
    domain = q.get("domain")
    if isinstance(domain, dict):  # LLaVA-Med's {"chest_xray": true, "mri": false, ...}
        ordered = [d for d in DOMAIN_ORDER if d in domain] + [d for d in domain if d not in DOMAIN_ORDER]
        return next((d for d in ordered if domain[d]), "unknown")
    return domain or "unknown"


async def judge_answers(questions: list[dict], answers: dict[str, str], client: ChatClient,
                        concurrency: int = 4) -> list[dict]:
    """One review row per question; errors (API, unparseable review, missing answer) are kept in the row."""
    sem = asyncio.Semaphore(concurrency)

    async def one(q: dict) -> dict:
        qid = str(q["question_id"])
        row = {"question_id": qid, "type": q.get("type", "unknown"), "domain": question_domain(q)}
        if qid not in answers:
            return {**row, "error": "missing answer"}
        async with sem:
            try:
                ref = q.get("gpt4_answer") or await client.complete(reference_messages(q))
                review = await client.complete(judge_messages(q, ref, answers[qid]))
                ref_score, model_score = parse_judge_scores(review)
            except (APIFailure, ValueError) as e:
                return {**row, "error": redact(str(e))}
        return {**row, "reference_answer": ref, "model_answer": answers[qid], "review": review,
                "reference_score": ref_score, "model_score": model_score}

    return list(await asyncio.gather(*(one(q) for q in questions)))


def summarize_judgments(rows: list[dict]) -> dict:
    """Mean scores and the relative score by type, by domain and overall, both ways the reference computes it:
    `relative_score`, the mean of per-question model/reference x 100 (LLaVA-Med's
    eval_multimodal_chat_gpt_score.py, main's summarize_gpt_review.py: the paper's numbers), and
    `relative_of_means`, mean model score / mean reference score x 100 (LLaVA's summarize_gpt_review.py, also
    in v1.0). A question whose reference answer scored 0 has no ratio: it is left out of `relative_score`
    only (the reference scripts would divide by zero) and counted in `n_no_ratio`."""
    groups: dict[str, list[dict]] = defaultdict(list)
    for r in rows:
        if "error" not in r:
            for g in (f"type:{r['type']}", f"domain:{r['domain']}", "overall"):
                groups[g].append(r)
    out = {}
    for g, rs in sorted(groups.items(), key=lambda kv: (kv[0] == "overall", kv[0])):
        ref = sum(r["reference_score"] for r in rs) / len(rs)
        model = sum(r["model_score"] for r in rs) / len(rs)
        ratios = [r["model_score"] / r["reference_score"] for r in rs if r["reference_score"] > 0]
        out[g] = {"n": len(rs), "reference_score": ref, "model_score": model,
                  "relative_score": 100 * sum(ratios) / len(ratios) if ratios else None,
                  "relative_of_means": 100 * model / ref if ref > 0 else None,
                  "n_no_ratio": len(rs) - len(ratios)}
    return {"groups": out, "errors": {r["question_id"]: r["error"] for r in rows if "error" in r}}


def judge_table(summary: dict) -> str:
    keys = ["n", "reference_score", "model_score", "relative_score", "relative_of_means"]
    return format_table(["group"] + keys, [[g] + [s[k] for k in keys] for g, s in summary["groups"].items()])


def load_judge_questions(path: str) -> list[dict]:
    """Judge questions (JSONL, LLaVA-Med's qa50 layout); errors name the file and line."""
    questions = []
    for where, q in located_records(path):
        for key in ("question_id", "text", "fig_caption"):
            if key not in q:
                raise ValueError(f"{where}: missing '{key}'")
        questions.append(q)
    return questions


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--questions", required=True, help="JSONL: question_id, text, type, domain, fig_caption, ...")
    p.add_argument("--answers", required=True, help="JSONL with question_id and text")
    p.add_argument("--model", required=True, help="judge (and reference answer) model or Azure deployment")
    p.add_argument("--base_url", help="OpenAI-compatible endpoint; the key comes from OPENAI_API_KEY")
    p.add_argument("--reviews", help="write one review per question (JSONL)")
    p.add_argument("--out", help="write the summary as JSON")
    p.add_argument("--concurrency", type=int, default=4)
    p.add_argument("--max_retries", type=int, default=5)
    p.add_argument("--timeout", type=float, default=60.0)
    p.add_argument("--backoff_base", type=float, default=1.0)
    args = p.parse_args(argv)
    cfg = ClientConfig(model=args.model, base_url=args.base_url, temperature=0.0, timeout=args.timeout,
                       max_retries=args.max_retries, backoff_base=args.backoff_base)

    async def run() -> list[dict]:
        client = ChatClient(cfg)
        try:
            return await judge_answers(load_judge_questions(args.questions), load_answers(args.answers), client,
                                       args.concurrency)
        finally:
            await client.close()

    try:
        rows = asyncio.run(run())
    except FatalAPIError as e:
        print(f"error: {redact(str(e))}", file=sys.stderr)
        return 2
    summary = summarize_judgments(rows)
    print(judge_table(summary))
    if summary["errors"]:
        print(f"{len(summary['errors'])} questions not scored (excluded): "
              + "; ".join(f"{k}: {v}" for k, v in list(summary["errors"].items())[:5]))
    if args.reviews:
        with open(args.reviews, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            json.dump(summary, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
