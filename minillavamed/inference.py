"""Asking a trained LLaVA-Med about images (paper §5: the chatbot and the VQA evaluation).

`Assistant` bundles what a question needs besides the weights: the tokenizer, the conversation template
the model was tuned with, and the image preprocessing it was trained on. `answer()` renders the prompts,
left-pads a batch, runs `LlavaMed.generate` (the project's one sampling routine) and cuts each reply at
the template's stop strings. sample.py, train.py's periodic VQA evaluation and the evaluation CLI all
answer through here, so they can never disagree on how a prompt is built.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch
from PIL import Image

from minillavamed.conversation import Template, build_prompt, get_template, tokenize_prompt
from minillavamed.data import ImageProcessor, load_image
from minillavamed.llava import LlavaMed
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
        model = LlavaMed.from_pretrained(path, vision_tower=vision_tower, dtype=dtype, device=device,
                                         quantize=quantize).eval()
        tokenizer_file = Path(path) / "tokenizer.model"
        if not tokenizer_file.exists():
            raise FileNotFoundError(f"{tokenizer_file}: the checkpoint has no SentencePiece tokenizer.model")
        return cls.for_model(model, Tokenizer(tokenizer_file), conv)

    @classmethod
    def for_model(cls, model: LlavaMed, tokenizer: Tokenizer, conv: str | None = None) -> "Assistant":
        cfg = model.cfg
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
        rows = [tokenize_prompt(build_prompt(self.template, q, h, with_image=im is not None), self.tokenizer,
                                with_image=im is not None)
                for q, im, h in zip(questions, images, histories)]
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), self.tokenizer.pad_id, dtype=torch.long)
        mask = torch.zeros(len(rows), width, dtype=torch.long)
        for i, r in enumerate(rows):  # left padding: every row's next token comes at the same column
            ids[i, width - len(r):], mask[i, width - len(r):] = torch.tensor(r), 1
        pixels = [self.processor(im) for im in images if im is not None]
        pixel_values = torch.stack(pixels).to(self.device) if pixels else None
        dtype = next(self.model.parameters()).dtype
        out = self.model.generate(
            ids.to(self.device), None if pixel_values is None else pixel_values.to(dtype), mask.to(self.device),
            max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
            eos_id=self.tokenizer.eos_id, stop_strings=self.template.stop_strings, decode=self.tokenizer.decode,
            generator=generator, on_token=on_token)
        return [self.cut(self.tokenizer.decode(o)) for o in out]

    def cut(self, text: str) -> str:
        """The reply without its stop string and anything after it."""
        for stop in self.template.stop_strings:
            text = text.split(stop)[0]
        return text.strip()


def answer_questions(
    assistant: Assistant,
    questions: Sequence[dict],
    image_root: str | os.PathLike | None,
    batch_size: int = 8,
    on_batch: Callable[[Sequence[dict], list[str], int, float], None] | None = None,
    **generate_kw,
) -> list[str]:
    """Answers for question dicts {"text", "image"?} in batches; after each batch
    `on_batch(questions, answers, done, seconds)` (to save them at once, or to show progress)."""
    answers: list[str] = []
    start = time.perf_counter()
    for i in range(0, len(questions), batch_size):
        chunk = questions[i:i + batch_size]
        images = [load_image(os.path.join(os.fspath(image_root), q["image"])) if q.get("image") else None
                  for q in chunk]
        new = assistant.answer([q["text"] for q in chunk], images, **generate_kw)
        answers += new
        if on_batch is not None:
            on_batch(chunk, new, len(answers), time.perf_counter() - start)
    return answers
