"""Training throughput of one stage on random data: tokens/s and MFU, for a preset at a chosen size.

Uses the curriculum's choice of what trains per stage (`curriculum.set_trainable`, as train.py does) and the
model's own FLOP count (`LlavaMed.flops`, behind the MFU train.py logs), so the figure here is the figure a real run reports. The 7B presets fit one H100
for stage 1 (only the projector trains); stage 2 trains the whole decoder, so measure it on a depth-reduced model (--layers).

    python bench/train_speed.py --preset tiny --stage 2                                       # CPU
    python bench/train_speed.py --preset llava-med-v1.5-mistral-7b --stage 1 --batch 8 --grad_ckpt
    python bench/train_speed.py --preset llava-med-v1.5-mistral-7b --stage 2 --layers 8 --batch 8
"""

from __future__ import annotations

import argparse
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from minillavamed import LlavaMed  # noqa: E402
from minillavamed.config import IMAGE_TOKEN_INDEX, preset  # noqa: E402
from minillavamed.curriculum import STAGES, peak_tflops, set_trainable  # noqa: E402
from minillavamed.inference import default_dtype  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="tiny")
    p.add_argument("--stage", type=int, default=2, choices=sorted(STAGES))
    p.add_argument("--layers", type=int, default=0, help="decoder depth (0: the preset's)")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--text_len", type=int, default=100, help="text tokens per sample besides the image")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=["bfloat16", "float32"], default=None)
    p.add_argument("--attn", choices=["naive", "sdpa", "triton"], default=None)
    p.add_argument("--grad_ckpt", action="store_true")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--peak_tflops", type=float, default=0.0, help="default: from the GPU's name")
    args = p.parse_args()
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    dtype = args.dtype or default_dtype(args.device)
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True

    cfg = preset(args.preset)
    if args.layers:
        cfg.decoder.layers = args.layers
    with torch.device(device):
        model = LlavaMed(cfg)
    model.set_attention_backend(args.attn or ("triton" if cuda else "sdpa"))
    model.decoder.checkpointing = args.grad_ckpt
    set_trainable(model, args.stage)
    trainable = [q for q in model.parameters() if q.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-5, fused=cuda)
    forward = torch.compile(model) if args.compile else model
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if dtype == "bfloat16" else nullcontext()

    text = torch.randint(3, cfg.decoder.vocab_size, (args.batch, args.text_len), device=device)
    ids = torch.cat([text[:, :5], torch.full((args.batch, 1), IMAGE_TOKEN_INDEX, device=device), text[:, 5:]], 1)
    pixels = torch.randn(args.batch, 3, cfg.vision.image_size, cfg.vision.image_size, device=device)
    labels = ids.clone().masked_fill(ids == IMAGE_TOKEN_INDEX, -100)
    seq = args.text_len + cfg.vision.tokens_per_image
    flops = model.flops(args.batch * args.text_len, args.batch, seq, args.batch * (args.text_len - 1))
    peak = args.peak_tflops or peak_tflops(device)

    def step():
        with autocast:
            _, loss = forward(ids, pixels, labels=labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(args.warmup):
        step()
    if cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    if cuda:
        torch.cuda.synchronize()
    dt = (time.perf_counter() - start) / args.steps
    tokens = args.batch * seq
    mfu = f"{flops / dt / (peak * 1e12):.1%}" if peak else "n/a (give --peak_tflops)"
    print(f"{args.preset} stage {args.stage}: decoder {cfg.decoder.layers} layers, "
          f"{sum(q.numel() for q in model.parameters()) / 1e6:,.1f}M params "
          f"({sum(q.numel() for q in trainable) / 1e6:,.1f}M trainable), batch {args.batch} x {seq} tokens, "
          f"{dtype}, {args.device}{', grad ckpt' if args.grad_ckpt else ''}")
    print(f"step {dt * 1e3:.1f} ms | {tokens / dt:,.0f} tokens/s | {flops / dt / 1e12:.2f} TFLOP/s | MFU {mfu}")
    if cuda:
        print(f"peak memory {torch.cuda.max_memory_allocated(device) / 2**30:.1f} GiB")


if __name__ == "__main__":
    main()
