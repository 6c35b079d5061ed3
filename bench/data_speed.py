"""Throughput of the whole training data path per worker, and the data workers per GPU the MFU targets need.

One worker (this process, one thread) runs what a DataLoader worker of train.py runs for each micro-batch:
JPEG decode, LLaVA's pad-to-square, CLIP's resize / crop / normalise, and collate; the text was tokenised
once up front (ConversationDataset does it when it is built), so a worker only indexes it. Images are the
real VQA-RAD release in ../shared (800-2300 px chest X-rays, CT and MRI).

The workers a GPU needs = (images per second the GPU consumes) / (images per second one worker makes), where
the GPU consumes   MFU x peak FLOP/s / (training FLOPs per sample),   a sample being one image plus
`--text_len` text tokens, FLOPs from LlavaMed.flops at 7B shapes for the stage (meta tensors, nothing is
allocated).

    python bench/data_speed.py                       # 224 and 336 px, 3 repeats of 64 images
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from minillavamed import LlavaMed  # noqa: E402
from minillavamed.batches import Collate  # noqa: E402  (what train.py's loader workers run)
from minillavamed.config import IMAGE_TOKEN_INDEX, preset  # noqa: E402
from minillavamed.curriculum import set_trainable  # noqa: E402
from minillavamed.data import ImageProcessor, load_image  # noqa: E402

PEAKS = {"A100": 312e12, "H100": 989e12}  # dense bf16
PRESET_AT = {224: "llava-med-v1-7b", 336: "llava-med-v1.5-mistral-7b"}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    here = Path(__file__).resolve().parent
    p.add_argument("--images", default=str(here.parent.parent / "shared/data/vqa-rad/images"))
    p.add_argument("--n", type=int, default=64, help="images per repeat")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--micro_batch", type=int, default=16)
    p.add_argument("--text_len", type=int, default=100, help="text tokens per sample besides the image")
    p.add_argument("--mfu", type=float, nargs=2, default=(0.45, 0.50), metavar=("STAGE1", "STAGE2"),
                   help="the MFU targets of stage 1 and stage 2 (bench/RESULTS.md)")
    args = p.parse_args()
    files = sorted(Path(args.images).glob("*.jpg"))[: args.n]
    if not files:
        raise SystemExit(f"{args.images}: no .jpg images (the VQA-RAD release belongs in ../shared/data/vqa-rad)")
    torch.set_num_threads(1)  # a DataLoader worker is one process doing one thing at a time
    ids = torch.cat([torch.tensor([1]), torch.tensor([IMAGE_TOKEN_INDEX]), torch.randint(3, 32000, (args.text_len,))])
    for size in (224, 336):
        processor = ImageProcessor.for_model(size, "pad")
        collate = Collate(pad_id=0, pack=False, image_tokens=(size // 14) ** 2)
        best = float("inf")
        for _ in range(args.repeats):
            start = time.perf_counter()
            for k in range(0, len(files), args.micro_batch):
                items = [{"input_ids": ids, "labels": ids, "pixel_values": processor(load_image(f))}
                         for f in files[k:k + args.micro_batch]]
                collate(items)
            best = min(best, time.perf_counter() - start)
        per_worker = len(files) / best
        cfg = preset(PRESET_AT[size])
        with torch.device("meta"):
            model = LlavaMed(cfg)
        print(f"{size} px ({PRESET_AT[size]}): {per_worker:.1f} images/s per worker "
              f"({best / len(files) * 1e3:.1f} ms per sample, best of {args.repeats} x {len(files)} images)")
        for stage, mfu in zip((1, 2), args.mfu):
            set_trainable(model, stage)
            seq = args.text_len + cfg.vision.tokens_per_image
            flops = model.flops(args.text_len, 1, seq, args.text_len)  # every text token after the image
            for gpu, peak in PEAKS.items():
                need = mfu * peak / flops
                print(f"  stage {stage} on {gpu}: {mfu:.0%} x {peak / 1e12:.0f} TFLOP/s / {flops / 1e12:.2f} TFLOP "
                      f"per sample = {need:.1f} samples/s -> {need / per_worker:.1f} workers per GPU")


if __name__ == "__main__":
    main()
