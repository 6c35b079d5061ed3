"""Quality of weight-only int8 / int4 (minillavamed/quantize.py) on a trained tiny model, against fp32.

For each of fp32 (the reference), bf16, int8 and int4 (both on bf16 activations, as sample.py --quantize
runs them): the logits error and top-1 agreement against fp32 on the world's figure captions (teacher-forced,
given their images) and their perplexity; greedy answers equal to fp32's on held-out VQA questions; and closed
accuracy / open recall on the synthetic VQA test set.

    python bench/quantize_quality.py --model out/tiny/stage2 --questions 200 --captions 200
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from minillavamed.config import IGNORE_INDEX, IMAGE_TOKEN_INDEX  # noqa: E402
from minillavamed.data import load_image, load_records, questions_from_vqa  # noqa: E402
from minillavamed.evaluation import score_vqa  # noqa: E402
from minillavamed.inference import Assistant, answer_questions  # noqa: E402

MODES = {"fp32": (torch.float32, None), "bf16": (torch.bfloat16, None), "int8": (torch.bfloat16, "int8"),
         "int4": (torch.bfloat16, "int4"), "int4-32": (torch.bfloat16, "int4-32")}


def caption_batch(assistant, records, root):
    """(ids, labels, pixels) of image + caption rows: stage 1's plain format, loss on the caption only."""
    tok, proc = assistant.tokenizer, assistant.processor
    for r in records:
        caption = tok.encode(r["fig_caption"]) + [tok.eos_id]
        ids = torch.tensor([[tok.bos_id, IMAGE_TOKEN_INDEX] + caption])
        labels = torch.tensor([[IGNORE_INDEX, IGNORE_INDEX] + caption])
        yield ids, labels, proc(load_image(root / r["image"]))[None]


def caption_logits(model, batches, dtype) -> tuple[torch.Tensor, float, int]:
    """Teacher-forced logits of every caption token given its image, (tokens, vocab) in caption order, with the
    summed negative log-likelihood and the token count."""
    logits, nll, n = [], 0.0, 0
    with torch.inference_mode():
        for ids, labels, px in batches:
            out, loss = model(ids, px.to(dtype), labels=labels)
            k = int((labels[:, 1:] != IGNORE_INDEX).sum())
            # With labels the model returns the scored positions' logits alone, (k, vocab) in order.
            assert out.shape[0] == k, f"{out.shape[0]} rows of logits for {k} caption tokens"
            logits.append(out.float())
            nll, n = nll + float(loss) * k, n + k
    return torch.cat(logits), nll, n


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, default=Path("out/tiny/stage2"))
    p.add_argument("--world", type=Path, default=Path("data/synthetic"))
    p.add_argument("--questions", type=int, default=200, help="first N questions of vqa_test (0: all)")
    p.add_argument("--captions", type=int, default=200, help="last N figure captions of the world")
    p.add_argument("--modes", nargs="+", choices=sorted(MODES), default=["fp32", "bf16", "int8", "int4"])
    args = p.parse_args(argv)
    gt = load_records(args.world / "vqa_test.json")
    gt = gt[:args.questions] if args.questions else gt
    questions = questions_from_vqa(gt)
    captions = load_records(args.world / "pmc_captions.jsonl")[-args.captions:]
    images = args.world / "images"
    ref = {}
    rows = []
    for mode in args.modes:
        dtype, quantize = MODES[mode]
        start = time.perf_counter()
        assistant = Assistant.load(args.model, dtype=dtype, quantize=quantize)
        model = assistant.model
        logits, nll, n = caption_logits(model, caption_batch(assistant, captions, images), dtype)
        with torch.inference_mode():
            answers = answer_questions(assistant, questions, images, batch_size=8, max_new_tokens=32)
        scores = score_vqa(gt, {str(q["question_id"]): a for q, a in zip(questions, answers)})["scores"]
        if mode == "fp32":
            ref = {"logits": logits, "answers": answers}
        err = ((logits - ref["logits"]).norm() / ref["logits"].norm()).item()
        top1 = (logits.argmax(-1) == ref["logits"].argmax(-1)).float().mean().item()
        same = sum(a == b for a, b in zip(answers, ref["answers"])) / len(answers)
        rows.append([mode, f"{err:.4f}", f"{top1:.1%}", f"{same:.1%}", f"{math.exp(nll / n):.3f}",
                     f"{scores['CLOSED']['closed_accuracy']:.1f}", f"{scores['OPEN']['open_recall']:.1f}"])
        print(f"{mode}: {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
    print(f"{args.model}: {len(captions)} captions ({n} tokens), {len(gt)} VQA test questions")
    print("| weights | caption logits rel. error vs fp32 | top-1 = fp32 | VQA answer = fp32's | caption perplexity "
          "| closed accuracy | open recall |\n|---|---|---|---|---|---|---|")
    for r in rows:
        print("| " + " | ".join(r) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
