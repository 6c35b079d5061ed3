"""Asking a trained LLaVA-Med about images (paper §5: the chatbot and the VQA evaluation).

`Assistant` bundles what a question needs besides the weights: the tokenizer, the conversation template
the model was tuned with, and the image preprocessing it was trained on. `answer()` renders the prompts,
runs them as one batch through `LlavaMed.generate` (the project's one sampling routine) and cuts each reply
at the template's stop strings (llava.StopStrings). sample.py, train.py's periodic VQA evaluation and the
evaluation CLI all answer through here, so they can never disagree on how a prompt is built.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch
from PIL import Image

from minillavamed.checkpoint import CheckpointError, check_vocab
from minillavamed.conversation import Template, build_prompt, get_template, tokenize_prompt
from minillavamed.data import ImageLoadError, ImageProcessor, load_image
from minillavamed.llava import LlavaMed, StopStrings
from minillavamed.tokenizer import Tokenizer


@dataclass
class Assistant:
    model: LlavaMed
    tokenizer: Tokenizer
    template: Template
    processor: ImageProcessor

    @classmethod
    def load(cls, path, vision_tower=None, conv: str | None = None, device="cpu", dtype=None,
             quantize=None) -> "Assistant":
        """A checkpoint directory in any layout LlavaMed reads, with its tokenizer.model beside the weights."""
        tokenizer_file = Path(path) / "tokenizer.model"
        if not tokenizer_file.exists():
            raise FileNotFoundError(f"{tokenizer_file}: the checkpoint has no SentencePiece tokenizer.model")
        model = LlavaMed.from_pretrained(path, vision_tower=vision_tower, dtype=dtype, device=device,
                                         quantize=quantize).eval()
        check_finite(model, path)
        return cls.for_model(model, Tokenizer(tokenizer_file), conv, where=path)

    @classmethod
    def for_model(cls, model: LlavaMed, tokenizer: Tokenizer, conv: str | None = None,
                  where: str | os.PathLike = "the model") -> "Assistant":
        cfg = model.cfg
        check_vocab(cfg, tokenizer.vocab_size, where)
        return cls(model, tokenizer, get_template(conv or cfg.conv_template),
                   ImageProcessor.for_model(cfg.vision.image_size, cfg.image_aspect_ratio))

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def answer(
        self,
        questions: Sequence[str],
        images: Sequence[Image.Image | None],
        histories: Sequence[Sequence[tuple[str, str]]] | None = None,
        *,
        max_new_tokens: int = 256,
        temperature: float = 0.0,
        top_p: float = 1.0,
        top_k: int = 0,
        generator: torch.Generator | None = None,
        on_token: Callable[[torch.Tensor, list[bool]], None] | None = None,
    ) -> list[str]:
        """One reply per question; `histories` holds earlier (question, answer) turns of each chat."""
        histories = histories or [()] * len(questions)
        prompts = [self.prompt_ids(q, im is not None, h) for q, im, h in zip(questions, images, histories)]
        pixels = [self.processor(im) for im in images if im is not None]
        pixel_values = torch.stack(pixels).to(self.device) if pixels else None
        dtype = next(self.model.parameters()).dtype
        stops = self.stops()
        out = self.model.generate(
            prompts, None if pixel_values is None else pixel_values.to(dtype),
            max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
            eos_id=self.tokenizer.eos_id, stop_strings=stops.strings, decode=stops.decode,
            generator=generator, on_token=on_token, vocab_size=self.tokenizer.vocab_size)
        return [stops.cut(self.tokenizer.decode(o)) for o in out]

    def prompt_ids(self, question: str, with_image: bool, history: Sequence[tuple[str, str]] = (),
                   system: str | None = None) -> list[int]:
        """The prompt's token ids (one image sentinel if `with_image`); `system` replaces the template's."""
        template = self.template if system is None else dataclasses.replace(self.template, system=system)
        v1 = self.model.cfg.mm_use_im_start_end
        return tokenize_prompt(build_prompt(template, question, history, with_image=with_image, im_start_end=v1),
                               self.tokenizer, with_image=with_image, im_start_end=v1)

    def stops(self, extra: Sequence[str] = ()) -> StopStrings:
        """The template's stop strings, then `extra` ones (a request's), read with this tokenizer."""
        return StopStrings(tuple(self.template.stop_strings) + tuple(extra), self.tokenizer.decode)


def device_arg(name: str) -> str:
    """The scripts' --device type: `name` if it is a torch device this machine has, else an error saying why."""
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise argparse.ArgumentTypeError(f"{name!r} is not a torch device ({str(e).splitlines()[0]})") from None
    if device.type == "cuda" and (not torch.cuda.is_available() or (device.index or 0) >= torch.cuda.device_count()):
        raise argparse.ArgumentTypeError(f"{name!r}: this machine has {torch.cuda.device_count()} CUDA GPU(s); "
                                         "use --device cpu")
    if device.type not in ("cpu", "cuda"):
        raise argparse.ArgumentTypeError(f"{name!r}: only cpu and cuda devices are supported")
    return name


def default_dtype(device: str, quantize: str | None = None) -> str:
    """The scripts' --dtype when it is left out: bfloat16 on GPUs (what their fast kernels and LLaVA-Med's
    weights are) and under weight-only quantisation (its layers run fastest on bf16 activations,
    bench/local_7b.py), else float32."""
    return "bfloat16" if device.startswith("cuda") or quantize is not None else "float32"


def check_finite(model: LlavaMed, where) -> None:
    """NaN or inf weights answer with garbage or nothing at all: refuse them, naming the first tensor."""
    for name, p in model.named_parameters():
        if not bool(torch.isfinite(p).all()):
            raise CheckpointError(f"{where}: weight {name} holds NaN or inf values; the checkpoint is broken "
                                  "(a diverged run saves none: take an earlier checkpoint)")


def answer_questions(
    assistant: Assistant,
    questions: Sequence[dict],
    image_root: str | os.PathLike | None,
    batch_size: int = 8,
    on_batch: Callable[[Sequence[dict], list[str], int, float], None] | None = None,
    on_bad_image: Callable[[dict, ImageLoadError], None] | None = None,
    **generate_kw,
) -> list[str | None]:
    """Answers for question dicts {"text", "image"?} in batches; after each batch
    `on_batch(questions, answers, done, seconds)` (to save them at once, or to show progress) with the
    questions answered. An unreadable image raises ImageLoadError naming it, unless `on_bad_image(question,
    error)` is given: then that question is skipped and its answer is None."""
    answers: list[str | None] = []
    start = time.perf_counter()
    for i in range(0, len(questions), batch_size):
        chunk, images, skipped = [], [], set()
        for k, q in enumerate(questions[i:i + batch_size]):
            try:
                images.append(load_image(os.path.join(os.fspath(image_root), q["image"])) if q.get("image") else None)
            except ImageLoadError as e:
                if on_bad_image is None:
                    raise
                on_bad_image(q, e)
                skipped.add(k)
                continue
            chunk.append(q)
        new = assistant.answer([q["text"] for q in chunk], images, **generate_kw) if chunk else []
        replies = iter(new)
        answers += [None if k in skipped else next(replies) for k in range(len(chunk) + len(skipped))]
        if chunk and on_batch is not None:
            on_batch(chunk, new, sum(a is not None for a in answers), time.perf_counter() - start)
    return answers
