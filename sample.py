"""Ask a trained LLaVA-Med about images (paper §5): one question, a chat, or a whole question file.

  python sample.py --image scan.png --prompt "is there an opacity?"          # the quickstart's tiny model
  python sample.py --model DIR --vision_tower CLIP_DIR --image x.png --prompt "..."   # LLaVA-Med v1.5
  python sample.py --chat --image x.png                                       # /help lists the commands
  python sample.py --questions q.jsonl --image_folder imgs --answers answers.jsonl   # batched, resumable
  python sample.py --model DIR --serve --port 8000                            # OpenAI chat API (serve.py)

Question files are JSON lines {"question_id", "image", "text"} or our VQA JSON ({"id", "image",
"conversations"}). Answers are appended as {"question_id", "prompt", "text", "answer_id", "model_id"} as
soon as each batch is done; a re-run skips the questions already answered (by the same model only: an
answers file another model wrote is refused). A user error ends with one line and exit status 1.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import uuid
from pathlib import Path

import torch

from minillavamed.checkpoint import CheckpointError
from minillavamed.conversation import TEMPLATES
from minillavamed.data import ImageLoadError, load_image, located_records, questions_from_vqa, record_problem
from minillavamed.inference import Assistant, answer_questions, default_dtype, device_arg
from minillavamed.records import read_jsonl_resume

DEFAULT_MODEL = Path("out/tiny/stage2")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
QUANTIZE = ["int8", "int4", "int4-32", "int4-64"]


def bounded(kind, low, high=None, above=False):
    """An argparse type for a number in [low, high] (or (low, high] with `above`), naming the bound."""
    def parse(text: str):
        try:
            x = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a{'n integer' if kind is int else ' number'}")
        if not (x > low if above else x >= low) or (high is not None and x > high) or x != x:
            raise argparse.ArgumentTypeError(f"{text} must be {'>' if above else '>='} {low}"
                                             + (f" and <= {high}" if high is not None else ""))
        return x
    return parse


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, default=None, help=f"checkpoint dir (default: {DEFAULT_MODEL})")
    p.add_argument("--vision_tower", type=Path, default=None, help="CLIP checkpoint, for LLaVA-Med v1.5 layouts")
    p.add_argument("--conv", choices=sorted(TEMPLATES), default=None,
                   help="conversation template (default: the checkpoint's)")
    p.add_argument("--image", type=Path, default=None)
    p.add_argument("--prompt", type=str, default=None)
    p.add_argument("--chat", action="store_true")
    p.add_argument("--questions", type=Path, default=None)
    p.add_argument("--image_folder", type=Path, default=None, help="root of the question file's images")
    p.add_argument("--answers", type=Path, default=None)
    p.add_argument("--skip_bad_images", action="store_true",
                   help="with --questions: leave questions whose image is unreadable unanswered (a re-run retries "
                        "them) instead of stopping")
    p.add_argument("--batch_size", type=bounded(int, 1), default=8)
    p.add_argument("--temperature", type=bounded(float, 0), default=0.0, help="0 = greedy")
    p.add_argument("--top_p", type=bounded(float, 0, 1, above=True), default=1.0)
    p.add_argument("--top_k", type=bounded(int, 0), default=0, help="0 = no top-k cut")
    p.add_argument("--max_new_tokens", type=bounded(int, 1), default=256)
    p.add_argument("--seed", type=int, default=0)
    s = p.add_argument_group("--serve: OpenAI's chat-completions API (minillavamed/serve.py)")
    s.add_argument("--serve", action="store_true")
    s.add_argument("--host", type=str, default="127.0.0.1", help="beyond loopback, set --api_key")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--image_root", type=Path, default=None, help="image_url parts may name files under it")
    s.add_argument("--served_name", type=str, default=None, help="the model id (default: the --model dir's name)")
    s.add_argument("--max_batch", type=int, default=8, help="requests decoded together; as many more may wait")
    s.add_argument("--api_key", type=str, default=None, help="require 'Authorization: Bearer KEY'")
    p.add_argument("--device", type=device_arg, default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                   help="default: bfloat16 on GPUs and for --quantize, float32 otherwise")
    p.add_argument("--quantize", choices=QUANTIZE, default=None,
                   help="weight-only quantisation on the CPU as the model loads (int4: groups of 128 inputs)")
    p.add_argument("--compile", action="store_true",
                   help="compile the decode steps (CPU): about 1.4x more tokens/s from small models after tens of "
                        "seconds of compiling, nothing for a 7B (LlavaMed.compile_decoding)")
    args = p.parse_args(argv)
    modes = sum([args.prompt is not None, args.chat, args.questions is not None, args.serve])
    if modes != 1:
        p.error("give exactly one of --prompt, --chat, --questions or --serve")
    if args.max_batch < 1:
        p.error("--max_batch must be at least 1")
    if args.image_root is not None and not args.image_root.is_dir():
        p.error(f"--image_root {args.image_root} is not a directory")
    if args.questions is not None and args.answers is None:
        p.error("--questions needs --answers OUT.jsonl")
    if args.quantize is not None and not args.device.startswith("cpu"):
        p.error(f"--quantize runs on torch's CPU kernels; drop it or pass --device cpu (not {args.device})")
    if args.compile and not args.device.startswith("cpu"):
        p.error(f"--compile is built and measured for CPU decoding; drop it or pass --device cpu (not {args.device})")
    return args


def load_assistant(args) -> Assistant:
    path = args.model or DEFAULT_MODEL
    if not (path / "config.json").exists():
        hint = ("train the tiny model first: python train.py --stage 0 && python train.py --stage 1 && "
                "python train.py --stage 2" if args.model is None else "pass a checkpoint directory")
        raise SystemExit(f"no model at {path}: {hint}")
    dtype = DTYPES[args.dtype or default_dtype(args.device, args.quantize)]
    assistant = Assistant.load(path, vision_tower=args.vision_tower, conv=args.conv, device=args.device,
                               dtype=dtype, quantize=args.quantize)
    if args.compile:
        assistant.model.compile_decoding()
    return assistant


class Streamer:
    """Prints a reply as it is generated: what StopStrings.visible says cannot change any more."""

    def __init__(self, assistant: Assistant):
        self.eos_id, self.stops = assistant.tokenizer.eos_id, assistant.stops()
        self.tokens, self.shown = [], ""

    def __call__(self, tokens: torch.Tensor, active: list[bool]) -> None:
        if not active[0] or int(tokens[0]) == self.eos_id:
            return
        self.tokens.append(int(tokens[0]))
        if self.stops.reached(self.tokens):
            return
        safe = self.stops.visible(self.stops.decode(self.tokens))
        if len(safe) > len(self.shown):
            print(safe[len(self.shown):], end="", flush=True)
            self.shown = safe

    def finish(self, reply: str) -> None:
        print(reply[len(self.shown):], flush=True)  # the reply begins with what was shown


def ask(assistant: Assistant, args, question: str, image, history=()) -> str:
    streamer = Streamer(assistant)
    generator = torch.Generator(device=assistant.device).manual_seed(args.seed)
    reply = assistant.answer([question], [image], [list(history)], max_new_tokens=args.max_new_tokens,
                             temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                             generator=generator, on_token=streamer)[0]
    streamer.finish(reply)
    return reply


CHAT_COMMANDS = {
    "/image PATH": "load an image and start over",
    "/reset": "forget the conversation (the image stays)",
    "/help": "list these commands",
    "/quit": "end the chat (also /exit or Ctrl-D)",
}


def chat(assistant: Assistant, args) -> None:
    image = load_image(args.image) if args.image else None
    history: list[tuple[str, str]] = []
    print("chat: type a question, or /help for the commands")
    while True:
        try:
            line = input("user> ").strip()
        except EOFError:
            return
        command, _, rest = line.partition(" ")
        if command in ("/quit", "/exit"):
            return
        if command == "/help":
            print("\n".join(f"  {c:<12} {what}" for c, what in CHAT_COMMANDS.items()))
        elif command == "/reset":
            history = []
        elif command == "/image":
            if not rest.strip():
                print("error: /image needs a path, e.g. /image scan.png")
                continue
            try:
                image, history = load_image(rest.strip()), []
            except ImageLoadError as e:
                print(f"error: {e}")
        elif command.startswith("/") and not command.startswith("//"):
            print(f"error: unknown command {command}; /help lists them (start a question with // to ask one "
                  "that begins with /)")
        elif line:
            line = line[1:] if line.startswith("//") else line
            print("assistant> ", end="", flush=True)
            history.append((line, ask(assistant, args, line, image, history)))


def read_questions(path: Path) -> list[dict]:
    """Question dicts from a question file or our VQA JSON; a bad entry is named by file:line (or index)."""
    try:
        located = located_records(path)
    except (OSError, ValueError) as e:
        raise SystemExit(f"--questions {path}: {e}") from None
    if located and "conversations" in located[0][1]:
        for where, r in located:
            problem = record_problem(r) or (None if "id" in r else "no 'id'")
            if problem:
                raise SystemExit(f"{where}: {problem}")
        return questions_from_vqa([r for _, r in located])
    for where, q in located:
        for key in ("question_id", "text"):
            if not isinstance(q.get(key), (str, int)) or isinstance(q.get(key), bool) or q.get(key) == "":
                raise SystemExit(f"{where}: the question has no {key!r} (a question is "
                                 '{"question_id", "image", "text"})')
        if "image" in q and not isinstance(q["image"], str):
            raise SystemExit(f"{where}: 'image' is {q['image']!r}, not a file name")
    return [q for _, q in located]


def read_answers(path: Path, model_id: str) -> set[str]:
    """Ids answered in an existing answers file, which this model must have written."""
    try:
        rows = read_jsonl_resume(str(path))
    except ValueError as e:
        raise SystemExit(f"--answers {e}") from None
    for n, r in enumerate(rows, 1):
        if "question_id" not in r:
            raise SystemExit(f"--answers {path}: answer {n} has no 'question_id'; this is not an answers file")
        if r.get("model_id") != model_id:
            raise SystemExit(f"--answers {path} holds answers of model {r.get('model_id')!r}, not {model_id!r}: "
                             "continuing it would mix two models; pass another --answers file")
    return {str(r["question_id"]) for r in rows}


def answer_file(assistant: Assistant, args, questions: list[dict], done: set[str], model_id: str) -> None:
    todo = [q for q in questions if str(q["question_id"]) not in done]
    root = args.image_folder or args.questions.parent
    skipped = []

    def skip(q, error):
        skipped.append(q["question_id"])
        print(f"\nskipped question {q['question_id']!r}: {error}", file=sys.stderr)

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
                         on_bad_image=skip if args.skip_bad_images else None, max_new_tokens=args.max_new_tokens,
                         temperature=args.temperature, top_p=args.top_p, top_k=args.top_k)
    print(file=sys.stderr)
    if skipped:
        print(f"{len(skipped)} question(s) skipped for unreadable images and left unanswered; fix the images and "
              "re-run to answer them", file=sys.stderr)


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    if args.questions is not None:  # both files are checked before the model loads
        questions = read_questions(args.questions)
        model_id = os.path.basename(os.path.normpath(args.model or DEFAULT_MODEL))
        done = read_answers(args.answers, model_id)
    try:
        assistant = load_assistant(args)
        if args.serve:
            from minillavamed.serve import ServeConfig, default_name, serve

            cfg = ServeConfig(args.served_name or default_name(args.model or DEFAULT_MODEL), args.image_root,
                              args.max_batch, api_key=args.api_key)
            serve(assistant, cfg, args.host, args.port)
        elif args.chat:
            chat(assistant, args)
        elif args.questions is not None:
            answer_file(assistant, args, questions, done, model_id)
        else:
            ask(assistant, args, args.prompt, load_image(args.image) if args.image else None)
    except (ImageLoadError, CheckpointError, FileNotFoundError) as e:  # each message names its file
        skip = isinstance(e, ImageLoadError) and args.questions is not None
        raise SystemExit(f"error: {e}" + ("; --skip_bad_images leaves such questions out" if skip else "")) from None
    return 0


if __name__ == "__main__":
    sys.exit(main())
