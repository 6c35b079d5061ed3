"""Ask a trained LLaVA-Med about images (paper §5): one question, a chat, or a whole question file.

  python sample.py --image scan.png --prompt "is there an opacity?"          # the quickstart's tiny model
  python sample.py --model DIR --vision_tower CLIP_DIR --image x.png --prompt "..."   # LLaVA-Med v1.5
  python sample.py --chat --image x.png                                       # /image PATH, /reset, /quit
  python sample.py --questions q.jsonl --image_folder imgs --answers answers.jsonl   # batched, resumable

Question files are JSON lines {"question_id", "image", "text"} or our VQA JSON ({"id", "image",
"conversations"}). Answers are appended as {"question_id", "prompt", "text", "answer_id", "model_id"} as
soon as each batch is done; a re-run skips the questions already answered.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import uuid
from pathlib import Path

import torch

from minillavamed.data import load_image, load_records, questions_from_vqa
from minillavamed.inference import Assistant, answer_questions
from minillavamed.instruct import read_jsonl_resume

DEFAULT_MODEL = Path("out/tiny/stage2")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
QUANTIZE = ["int8", "int4", "int4-32", "int4-64"]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, default=None, help=f"checkpoint dir (default: {DEFAULT_MODEL})")
    p.add_argument("--vision_tower", type=Path, default=None, help="CLIP checkpoint, for LLaVA-Med v1.5 layouts")
    p.add_argument("--conv", type=str, default=None, help="conversation template (default: the checkpoint's)")
    p.add_argument("--image", type=Path, default=None)
    p.add_argument("--prompt", type=str, default=None)
    p.add_argument("--chat", action="store_true")
    p.add_argument("--questions", type=Path, default=None)
    p.add_argument("--image_folder", type=Path, default=None, help="root of the question file's images")
    p.add_argument("--answers", type=Path, default=None)
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top_p", type=float, default=1.0)
    p.add_argument("--top_k", type=int, default=0)
    p.add_argument("--max_new_tokens", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", type=str, default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                   help="default: bfloat16 on GPUs and for --quantize, float32 otherwise")
    p.add_argument("--quantize", choices=QUANTIZE, default=None,
                   help="weight-only quantisation on the CPU as the model loads (int4: groups of 128 inputs)")
    args = p.parse_args(argv)
    modes = sum([args.prompt is not None, args.chat, args.questions is not None])
    if modes != 1:
        p.error("give exactly one of --prompt, --chat or --questions")
    if args.questions is not None and args.answers is None:
        p.error("--questions needs --answers OUT.jsonl")
    if args.quantize is not None and not args.device.startswith("cpu"):
        p.error(f"--quantize runs on torch's CPU kernels; drop it or pass --device cpu (not {args.device})")
    return args


def load_assistant(args) -> Assistant:
    path = args.model or DEFAULT_MODEL
    if not (path / "config.json").exists():
        hint = ("train the tiny model first: python train.py --stage 0 && python train.py --stage 1 && "
                "python train.py --stage 2" if args.model is None else "pass a checkpoint directory")
        raise SystemExit(f"no model at {path}: {hint}")
    # Quantised layers run fastest on bf16 activations (bench/local_7b.py).
    fast = args.device.startswith("cuda") or args.quantize is not None
    dtype = DTYPES[args.dtype or ("bfloat16" if fast else "float32")]
    return Assistant.load(path, vision_tower=args.vision_tower, conv=args.conv, device=args.device, dtype=dtype,
                          quantize=args.quantize)


class Streamer:
    """Prints a reply as it is generated, holding back text that might be the start of a stop string."""

    def __init__(self, assistant: Assistant):
        self.assistant, self.tokens, self.shown = assistant, [], 0
        self.hold = max(len(s) for s in assistant.template.stop_strings)

    def __call__(self, tokens: torch.Tensor, active: list[bool]) -> None:
        if not active[0] or int(tokens[0]) == self.assistant.tokenizer.eos_id:
            return
        self.tokens.append(int(tokens[0]))
        text = self.assistant.tokenizer.decode(self.tokens).lstrip()  # as the final reply is stripped
        safe = len(text) - self.hold
        if safe > self.shown and not any(s in text for s in self.assistant.template.stop_strings):
            print(text[self.shown:safe], end="", flush=True)
            self.shown = safe

    def finish(self, reply: str) -> None:
        print(reply[self.shown:], flush=True)  # the reply begins with what was shown: stops were held back


def ask(assistant: Assistant, args, question: str, image, history=()) -> str:
    streamer = Streamer(assistant)
    generator = torch.Generator(device=assistant.device).manual_seed(args.seed)
    reply = assistant.answer([question], [image], [list(history)], max_new_tokens=args.max_new_tokens,
                             temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                             generator=generator, on_token=streamer)[0]
    streamer.finish(reply)
    return reply


def chat(assistant: Assistant, args) -> None:
    image = load_image(args.image) if args.image else None
    history: list[tuple[str, str]] = []
    print("chat: /image PATH loads an image (and starts over), /reset forgets the conversation, /quit ends")
    while True:
        try:
            line = input("user> ").strip()
        except EOFError:
            return
        if line in ("/quit", "/exit"):
            return
        if line == "/reset":
            history = []
            continue
        if line.startswith("/image"):
            try:
                image, history = load_image(line.split(maxsplit=1)[1]), []
            except (IndexError, ValueError) as e:
                print(f"error: {e}")
            continue
        if line:
            print("assistant> ", end="", flush=True)
            history.append((line, ask(assistant, args, line, image, history)))


def answer_file(assistant: Assistant, args) -> None:
    records = load_records(args.questions)
    questions = questions_from_vqa(records) if records and "conversations" in records[0] else records
    done = {str(r["question_id"]) for r in read_jsonl_resume(args.answers)} if args.answers.exists() else set()
    todo = [q for q in questions if str(q["question_id"]) not in done]
    root = args.image_folder or args.questions.parent
    model_id = os.path.basename(os.path.normpath(args.model or DEFAULT_MODEL))
    print(f"{len(questions)} questions, {len(done)} already answered in {args.answers}", file=sys.stderr)
    with open(args.answers, "a") as out:
        def save(chunk, answers, done, seconds):
            for q, a in zip(chunk, answers):
                out.write(json.dumps({"question_id": q["question_id"], "prompt": q["text"], "text": a,
                                      "answer_id": uuid.uuid4().hex, "model_id": model_id}) + "\n")
            out.flush()
            rate = done / max(seconds, 1e-9)
            print(f"\r{done}/{len(todo)} questions  {rate:.2f}/s  eta {(len(todo) - done) / rate / 60:.1f} min",
                  end="", file=sys.stderr, flush=True)

        answer_questions(assistant, todo, root, batch_size=args.batch_size, on_batch=save,
                         max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                         top_k=args.top_k)
    print(file=sys.stderr)


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    assistant = load_assistant(args)
    if args.chat:
        chat(assistant, args)
    elif args.questions is not None:
        answer_file(assistant, args)
    else:
        ask(assistant, args, args.prompt, load_image(args.image) if args.image else None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
