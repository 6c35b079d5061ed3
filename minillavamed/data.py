"""Training data (paper §3-§4): the images' pixels, LLaVA-Med's JSON datasets, and batches.

Pixels: CLIP's preprocessing as transformers' CLIPImageProcessor does it (resize the short side with PIL
bicubic, center crop, rescale, normalize), after LLaVA's `Image.open(f).convert('RGB')` and, in "pad"
mode, LLaVA's `expand2square` with the mean colour. Two decisions where LLaVA has none or a bad one:
  - 16-bit / 32-bit grey images (modes I;16, I, F): `.convert('RGB')` clips them at 255 (a white image);
    we stretch each such image's own min..max to 0..255 first. 8-bit modes follow LLaVA exactly (RGBA
    drops alpha, P / LA / CMYK / 1 go through `.convert('RGB')`).
  - EXIF orientation is *not* applied: neither LLaVA nor CLIPImageProcessor applies it, and the pixels
    the model was trained on are the stored ones.

Datasets: one `ConversationDataset` reads alignment (stage 1), instruct (stage 2) and VQA records, which
all share {"id", "image", "conversations"}. Text is tokenized once up front so that samples too long or
left with no trained label are dropped (and counted) before training; pixels are read lazily.
`check_data` is the one pass before any work: record shapes, image headers and lengths, every problem named
by file:line (or index) and id. A record the dataset would otherwise change silently (no image but an
`<image>` in the text, a null value, two `<image>`s) is refused, naming it.
"""

from __future__ import annotations

import json
import os
import warnings
from collections import Counter
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch
from PIL import Image

from .config import IGNORE_INDEX, IMAGE_TOKEN_INDEX
from .conversation import IMAGE, Template, tokenize_conversation
from .records import load_records, located_records
from .tokenizer import Tokenizer

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


# Decoded pixels an image may have (about 200 MB as RGB); past it the file is refused before decoding.
MAX_IMAGE_PIXELS = 64 * 2**20
# The longest side pad mode lets an image have before padding: the square canvas of a 60000x20 strip would
# take 10 GB, so such an image is first shrunk (keeping its aspect) to this side. No real figure is affected.
MAX_PAD_SIDE = 4096


class ImageLoadError(ValueError):
    """An image that is missing or cannot be decoded; the message names the file."""


def open_image_header(path: str | os.PathLike) -> tuple[int, int]:
    """(width, height) from the file's header, without decoding pixels; refuses a missing, unreadable or
    oversized file, naming it."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ImageLoadError(f"image file not found: {path}")
    try:
        with Image.open(path) as im:
            size = im.size
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise ImageLoadError(f"cannot read image {path}: {e}") from e
    if size[0] * size[1] > MAX_IMAGE_PIXELS:
        raise ImageLoadError(f"image {path} is {size[0]}x{size[1]} pixels, more than the {MAX_IMAGE_PIXELS:,} "
                             "allowed; downscale it")
    return size


def load_image(path: str | os.PathLike) -> Image.Image:
    """The RGB image LLaVA would train on (see the module docstring for 16-bit images)."""
    path = os.fspath(path)
    open_image_header(path)
    try:
        with Image.open(path) as im:
            im.load()  # decode now: a truncated file fails here, with its name, not deep in an epoch
            return to_rgb(im)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise ImageLoadError(f"cannot read image {path}: {e}") from e


def to_rgb(im: Image.Image) -> Image.Image:
    if im.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        a = np.asarray(im, dtype=np.float64)
        lo, hi = float(a.min()), float(a.max())
        a = (a - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(a)
        im = Image.fromarray(np.rint(a).astype(np.uint8), mode="L")
    return im.convert("RGB")


def expand2square(im: Image.Image, background: tuple[int, ...]) -> Image.Image:
    """LLaVA's pad mode: center the image on a square canvas of the background colour."""
    w, h = im.size
    if w == h:
        return im
    if max(w, h) > MAX_PAD_SIDE:  # bound the canvas (see MAX_PAD_SIDE); the final resize shrinks it anyway
        scale = MAX_PAD_SIDE / max(w, h)
        im = im.resize((max(1, round(w * scale)), max(1, round(h * scale))), resample=Image.BICUBIC)
        w, h = im.size
    out = Image.new(im.mode, (max(w, h),) * 2, background)
    out.paste(im, ((max(w, h) - w) // 2, (max(w, h) - h) // 2))
    return out


@dataclass
class ImageProcessor:
    """CLIP ViT preprocessing (CLIPImageProcessor's numbers) with LLaVA's aspect-ratio modes."""

    size: int = 224  # the short side after resizing
    crop_size: int = 224
    mean: tuple[float, float, float] = OPENAI_CLIP_MEAN
    std: tuple[float, float, float] = OPENAI_CLIP_STD
    aspect: str = "pad"  # "pad" (LLaVA v1.5) | "crop" (CLIP only, LLaVA-Med v1)

    def __post_init__(self):
        if self.aspect not in ("pad", "crop"):
            raise ValueError(f"image aspect must be 'pad' or 'crop', not {self.aspect!r}")

    @classmethod
    def for_model(cls, image_size: int, aspect: str) -> "ImageProcessor":
        return cls(size=image_size, crop_size=image_size, aspect=aspect)

    def __call__(self, im: Image.Image) -> torch.Tensor:
        """(3, crop_size, crop_size) float32 pixels from an image already made RGB by `load_image`."""
        im = to_rgb(im) if im.mode != "RGB" else im
        if self.aspect == "pad":
            im = expand2square(im, tuple(int(x * 255) for x in self.mean))
        w, h = im.size
        short, long = min(w, h), max(w, h)
        # transformers' rounding of the long side: int(), not round().
        new_long = int(self.size * long / short)
        im = im.resize((self.size, new_long) if w <= h else (new_long, self.size), resample=Image.BICUBIC)
        w, h = im.size
        top, left = (h - self.crop_size) // 2, (w - self.crop_size) // 2
        a = np.asarray(im, dtype=np.uint8)[top:top + self.crop_size, left:left + self.crop_size]
        # float64 then float32, in transformers' order, so the numbers agree to the last bit or two.
        a = (a.astype(np.float64) * (1 / 255)).astype(np.float32)
        a = (a - np.asarray(self.mean, dtype=np.float32)) / np.asarray(self.std, dtype=np.float32)
        return torch.from_numpy(np.ascontiguousarray(a.transpose(2, 0, 1)))


# ---------------------------------------------------------------------------------------------- records

def record_problem(record: dict) -> str | None:
    """What is wrong with a record's shape, or None: what the dataset would otherwise train on silently
    changed (the literal text "<image>", the word "None") or fail on later without naming the record."""
    if "id" in record and not isinstance(record["id"], (str, int)):
        return f"'id' is a {type(record['id']).__name__}, not a string"
    conv = record.get("conversations", record.get("conversatons"))
    if conv is None:
        return "no 'conversations' key"
    if not isinstance(conv, list) or not conv:
        return "'conversations' is not a non-empty list"
    image = record.get("image")
    if "image" in record and not (isinstance(image, str) and image.strip()):
        return (f"'image' is {image!r}, not a file name" +
                ("; leave the key out for a text-only record" if image is None else ""))
    tags = 0
    for k, turn in enumerate(conv):
        if not isinstance(turn, dict) or "from" not in turn or "value" not in turn:
            return f"turn {k} is not a {{'from', 'value'}} object"
        if turn["from"] not in ("human", "gpt"):
            return f"turn {k} is from {turn['from']!r}, not 'human' or 'gpt'"
        value = turn["value"]
        if value is None or isinstance(value, bool) or not isinstance(value, (str, int, float)):
            return f"turn {k} has value {value!r}, not text"
        tags += str(value).count(IMAGE)
    if image is None and tags:
        return f"no 'image' but {tags} {IMAGE} in the conversation (it would be trained on as text)"
    if image is not None and tags != 1:
        return f"one image but {tags} {IMAGE} in the conversation; exactly one turn must hold it"
    return None


def conversations_of(record: dict, where: str = "") -> list[dict]:
    """A record's conversation. Some released LLaVA-Med files spell the key "conversatons"."""
    conv = record.get("conversations", record.get("conversatons"))
    if conv is None:
        raise ValueError(f"{where}record {record.get('id', '?')!r} has no 'conversations' key")
    if not isinstance(conv, list) or not conv:
        raise ValueError(f"{where}record {record.get('id', '?')!r} has an empty 'conversations' list")
    return conv


def expanded_length(ids: Sequence[int], num_image_tokens: int) -> int:
    """Positions the sequence takes in the decoder once each sentinel becomes its image patches."""
    return sum(num_image_tokens if i == IMAGE_TOKEN_INDEX else 1 for i in ids)


def truncate(ids: list[int], labels: list[int], max_len: int, num_image_tokens: int):
    """Cut from the right to `max_len` decoder positions, never inside an image: an image that does not
    fit whole is cut out entirely, with everything after it."""
    used = 0
    for k, i in enumerate(ids):
        used += num_image_tokens if i == IMAGE_TOKEN_INDEX else 1
        if used > max_len:
            return ids[:k], labels[:k]
    return ids, labels


class DataError(ValueError):
    """Bad records or settings found by `check_data`; the message names them and says how to go on."""


@dataclass
class DataReport:
    """What `check_data` found: the records to train on (bad ones left out only when asked) and counts."""

    records: list[dict]
    read: int = 0
    skipped: Counter = field(default_factory=Counter)  # reason -> records left out
    truncated: int = 0  # samples longer than max_len, cut from the right

    def summary(self) -> dict:
        """For the log and eval.json."""
        return {"records_read": self.read, "records_skipped": sum(self.skipped.values()),
                "skipped_reasons": dict(self.skipped), "samples_truncated": self.truncated}


def check_data(files: Sequence[str | os.PathLike], image_root: str | os.PathLike | None, template: Template,
               tokenizer: Tokenizer, max_len: int, num_image_tokens: int, max_seq_len: int,
               skip_bad_records: bool = False, skip_bad_images: bool = False, show: int = 3,
               im_start_end: bool = False) -> DataReport:
    """One pass over the data files before any work: each record's shape (`record_problem`, then the
    template's own rules), each referenced image's header (the pixels stay lazy), and each sample's length
    against `max_len` and the model's `max_seq_len`. Raises DataError naming the first `show` bad records
    by file:line (or file[index]) and id, with the flag that skips them; a skipped record is counted.
    `im_start_end`: tokenize as the dataset will for the model (ConversationDataset's)."""
    report = DataReport(records=[])
    bad: dict[str, list[str]] = {"record": [], "image": []}
    images: dict[str, str | None] = {}  # path -> problem, each file opened once
    too_long: list[str] = []
    for path in files:
        for where, record in located_records(path):
            report.read += 1
            name = f"{where} (id {record.get('id', '?')!r})"
            problem = record_problem(record)
            ids = None
            if problem is None:
                try:
                    ids, _ = tokenize_conversation(template, conversations_of(record), tokenizer,
                                                   with_image=record.get("image") is not None,
                                                   im_start_end=im_start_end)
                except ValueError as e:
                    problem = str(e)
            if problem is not None:
                bad["record"].append(f"{name}: {problem}")
                if skip_bad_records:
                    report.skipped["bad record"] += 1
                    continue
            image = record.get("image")
            if ids is not None and image is not None:
                if image_root is None:
                    raise DataError(f"{where}: records have images but no image folder was given "
                                    "(--image_folder)")
                file = os.path.join(os.fspath(image_root), image)
                if file not in images:
                    try:
                        open_image_header(file)
                        images[file] = None
                    except ImageLoadError as e:
                        images[file] = str(e)
                if images[file] is not None:
                    bad["image"].append(f"{name}: {images[file]}")
                    if skip_bad_images:
                        report.skipped["bad image"] += 1
                        continue
            if ids is not None:
                length = expanded_length(ids, num_image_tokens)
                report.truncated += length > max_len
                if length > max_seq_len and max_len > max_seq_len:
                    too_long.append(f"{name}: {length} positions")
            report.records.append(record)
    errors = []
    for kind, flag in (("record", "--skip_bad_records"), ("image", "--skip_bad_images")):
        skipping = skip_bad_records if kind == "record" else skip_bad_images
        if bad[kind] and not skipping:
            errors.append(f"{len(bad[kind])} bad {kind}(s), first: " + "; ".join(bad[kind][:show]) +
                          f" (fix them, or pass {flag} to leave them out)")
    if too_long:
        errors.append(f"{len(too_long)} sample(s) longer than the model's max_seq_len {max_seq_len}, which "
                      f"max_len {max_len} would keep, first: " + "; ".join(too_long[:show]) +
                      f" (pass --max_len {max_seq_len} or less)")
    if errors:
        raise DataError(" | ".join(errors))
    return report


class ConversationDataset(torch.utils.data.Dataset):
    """LLaVA-Med records (alignment, instruct or VQA) → dict(input_ids, labels, pixel_values).

    `num_image_tokens` is how many decoder positions the model gives one image (its VisionConfig's
    tokens_per_image: 256 for CLIP-L/14 at 224, 576 at 336); truncation to `max_len` counts them. `dropped`
    counts the samples left out and why.
    `im_start_end` is the model config's mm_use_im_start_end (LLaVA-Med v1's image layout, conversation.py).
    With `skip_bad_images`, an unreadable image makes the item None (collate drops it and counts it in
    the batch's "skipped"); otherwise the error names the file.
    """

    def __init__(self, records: Sequence[dict], image_root: str | os.PathLike | None, template: Template,
                 tokenizer: Tokenizer, processor: ImageProcessor | None, max_len: int, num_image_tokens: int,
                 skip_bad_images: bool = False, source: str = "", im_start_end: bool = False):
        self.image_root = os.fspath(image_root) if image_root is not None else None
        self.processor, self.skip_bad_images = processor, skip_bad_images
        where = f"{source}: " if source else ""
        self.samples: list[tuple[torch.Tensor, torch.Tensor, str | None]] = []
        self.dropped: Counter = Counter()
        for record in records:
            problem = record_problem(record)
            if problem:
                raise ValueError(f"{where}record {record.get('id', '?')!r}: {problem}")
            conv = conversations_of(record, where)
            image = record.get("image")
            try:
                ids, labels = tokenize_conversation(template, conv, tokenizer, with_image=image is not None,
                                                    im_start_end=im_start_end)
            except ValueError as e:
                raise ValueError(f"{where}record {record.get('id', '?')!r}: {e}") from None
            if image is not None and IMAGE_TOKEN_INDEX not in ids:
                raise ValueError(f"{where}record {record.get('id', '?')!r} has an image but no {IMAGE} "
                                 "in its conversation")
            ids, labels = truncate(ids, labels, max_len, num_image_tokens)
            if image is not None and IMAGE_TOKEN_INDEX not in ids:
                self.dropped["image does not fit in max_len"] += 1
            elif all(y == IGNORE_INDEX for y in labels):
                self.dropped["no trained label"] += 1
            else:
                self.samples.append((torch.tensor(ids), torch.tensor(labels), image))
        if image_root is None and any(s[2] is not None for s in self.samples):
            raise ValueError(f"{where}records have images but no image folder was given")
        if (self.processor is None) and any(s[2] is not None for s in self.samples):
            raise ValueError(f"{where}records have images but no image processor was given")

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, k: int) -> dict | None:
        ids, labels, image = self.samples[k]
        pixels = None
        if image is not None:
            try:
                pixels = self.processor(load_image(os.path.join(self.image_root, image)))
            except ImageLoadError as e:
                if not self.skip_bad_images:
                    raise
                warnings.warn(f"skipped: {e}")
                return None
        return {"input_ids": ids, "labels": labels, "pixel_values": pixels}


def collate(batch: Sequence[dict | None], pad_id: int, pack: bool = False,
            num_image_tokens: int = 0) -> dict | None:
    """Stack samples for training; None items (skipped bad images) are dropped and counted.

    Right padding: input_ids / labels (B, T) padded with pad_id / IGNORE_INDEX, attention_mask (B, T).
    pack=True: one row holding every sample back to back, for the varlen attention kernel, with
    `cu_seqlens` (int32, B+1), the sample boundaries in decoder positions after each sentinel became
    `num_image_tokens` patches (the model restarts positions at each); `max_seqlen` is the longest sample.
    pixel_values: (N, 3, H, W) for the N samples that have an image, in batch order (None if none).
    """
    items = [b for b in batch if b is not None]
    if not items:
        return None
    images = [b["pixel_values"] for b in items if b["pixel_values"] is not None]
    out = {"pixel_values": torch.stack(images) if images else None, "skipped": len(batch) - len(items)}
    if pack:
        if num_image_tokens <= 0 and any(b["pixel_values"] is not None for b in items):
            raise ValueError("packing samples with images needs num_image_tokens")
        lengths = [expanded_length(b["input_ids"].tolist(), num_image_tokens) for b in items]
        out["input_ids"] = torch.cat([b["input_ids"] for b in items])[None]
        out["labels"] = torch.cat([b["labels"] for b in items])[None]
        out["cu_seqlens"] = torch.tensor([0] + lengths, dtype=torch.int32).cumsum(0, dtype=torch.int32)
        out["max_seqlen"] = max(lengths)
        return out
    longest = max(len(b["input_ids"]) for b in items)
    ids = torch.full((len(items), longest), pad_id, dtype=torch.long)
    labels = torch.full((len(items), longest), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(items), longest), dtype=torch.bool)
    for r, b in enumerate(items):
        n = len(b["input_ids"])
        ids[r, :n], labels[r, :n], mask[r, :n] = b["input_ids"], b["labels"], True
    out.update(input_ids=ids, labels=labels, attention_mask=mask)
    return out


# ------------------------------------------------------------------------------------------------- VQA

def questions_from_vqa(records: Sequence[dict]) -> list[dict]:
    """Our VQA records → question dicts for answering, with the reference answer kept as "answer"."""
    out = []
    for r in records:
        conv = conversations_of(r)
        if len(conv) < 2 or conv[0].get("from") != "human" or conv[1].get("from") != "gpt":
            raise ValueError(f"VQA record {r.get('id', '?')!r} is not a human question + gpt answer")
        q = {"question_id": r["id"], "text": conv[0]["value"].replace(IMAGE, "").strip(),
             "answer": str(conv[1]["value"])}
        for k in ("image", "answer_type"):
            if k in r:
                q[k] = r[k]
        out.append(q)
    return out


VQA_RAD_FILE = "VQA_RAD Dataset Public.json"
VQA_RAD_TEST_PHRASES = ("test_freeform", "test_para")  # the release's readme, section 5


def vqa_record(qid: str, image: str, question: str, answer: str, answer_type: str) -> dict:
    return {"id": qid, "image": image,
            "conversations": [{"from": "human", "value": f"{IMAGE}\n{question}"},
                              {"from": "gpt", "value": answer}],
            "answer_type": answer_type}


def vqa_rad_splits(entries: Sequence[dict], source: str) -> dict[str, list[dict]]:
    """The entries of the VQA-RAD release (`VQA_RAD_FILE`) as our VQA records, split the official way:
    test = phrase_type test_freeform or test_para, the rest is training. `source` names the file in errors."""
    splits: dict[str, list[dict]] = {"train": [], "test": []}
    for k, e in enumerate(entries):
        missing = [f for f in ("qid", "image_name", "question", "answer", "answer_type", "phrase_type")
                   if f not in e]
        if missing:
            raise ValueError(f"{source}: entry {k} lacks {missing}")
        answer_type = e["answer_type"].strip().upper()  # two entries say "CLOSED " with a space
        if answer_type not in ("OPEN", "CLOSED"):
            raise ValueError(f"{source}: entry {k} has answer_type {e['answer_type']!r}")
        split = "test" if e["phrase_type"] in VQA_RAD_TEST_PHRASES else "train"
        splits[split].append(vqa_record(str(e["qid"]), e["image_name"], e["question"].strip(),
                                        str(e["answer"]).strip(), answer_type))
    return splits


def convert_vqa_rad(src_dir: str | os.PathLike, out_dir: str | os.PathLike) -> tuple[str, str]:
    """The official VQA-RAD release → `out_dir/{train,test}.json` in our VQA format (images stay in
    `src_dir/images`), split by `vqa_rad_splits`."""
    src = os.path.join(os.fspath(src_dir), VQA_RAD_FILE)
    splits = vqa_rad_splits(load_records(src), src)
    os.makedirs(out_dir, exist_ok=True)
    paths = []
    for name, records in splits.items():
        paths.append(os.path.join(os.fspath(out_dir), f"{name}.json"))
        with open(paths[-1], "w", encoding="utf-8") as f:
            json.dump(records, f, ensure_ascii=False, indent=1)
    return paths[0], paths[1]
