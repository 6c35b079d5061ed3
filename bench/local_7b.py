"""LLaVA-Med v1.5 (Mistral-7B, CLIP ViT-L/14 at 336 px) on a laptop-class CPU: bf16 against weight-only
int8 and int4 (minillavamed/quantize.py).

Random weights of the real shapes are written once as a real bf16 checkpoint (our format, sharded), then
each mode loads it in a fresh process, so that its peak resident memory is its own: load time (int8/int4
quantise layer by layer as they load), peak RSS, time to first token of an image question (576 image
positions + 52 text tokens = 628, the ViT included) and decode tokens/s. Modes run interleaved, one process
each per repeat; medians are printed. `--layers` keeps fewer decoder layers (full width) where the machine
cannot spare 16 GiB for bf16; time per layer is then printed too, to scale to the real 32.

    python bench/local_7b.py                        # all 32 layers: needs ~17 GiB free for bf16
    python bench/local_7b.py --layers 4 --repeats 3 # a quarter of the time and memory; scale per layer
    python bench/local_7b.py --products             # one 7B product, 1 and 628 rows, every kernel there is
    python bench/local_7b.py --layers 4 --quality   # logits error and greedy agreement against bf16

The checkpoint stays in --dir for the next run; --clean deletes it afterwards.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from minillavamed import LlavaMed, gemm  # noqa: E402
from minillavamed.checkpoint import FORMAT  # noqa: E402
from minillavamed.config import IMAGE_TOKEN_INDEX, preset  # noqa: E402
from minillavamed.quantize import QuantConfig, QuantizedLinear, quantize_int8  # noqa: E402

PRESET = "llava-med-v1.5-mistral-7b"
TEXT_TOKENS = 52  # with 576 image positions: 628, a LLaVA-Med v1.5 image question
MODES = ("bf16", "int8", "int4")


def config(layers: int):
    cfg = preset(PRESET)
    return dataclasses.replace(cfg, decoder=dataclasses.replace(cfg.decoder, layers=layers))


def write_checkpoint(directory: Path, layers: int, shard_bytes: int = 2**30) -> None:
    """Random bf16 weights of the preset's shapes, shard by shard (never the whole model in memory)."""
    from safetensors.torch import save_file

    cfg = config(layers)
    marker = directory / "config.json"
    if marker.exists() and json.loads(marker.read_text())["decoder"]["layers"] == layers:
        return
    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir(parents=True)
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in LlavaMed(cfg).state_dict().items()}
    g = torch.Generator().manual_seed(0)
    shards, current, size = [], {}, 0
    for name, shape in shapes.items():
        if len(shape) == 1 and "norm" in name and name.endswith(".weight"):
            t = torch.ones(shape)
        elif name.endswith(".bias"):
            t = torch.zeros(shape)
        else:
            t = torch.randn(shape, generator=g) * 0.02
        current[name] = t.to(torch.bfloat16)
        size += current[name].numel() * 2
        if size >= shard_bytes:
            shards.append(list(current))
            save_file(current, str(directory / f"shard-{len(shards):05d}.safetensors"))
            current, size = {}, 0
    if current:
        shards.append(list(current))
        save_file(current, str(directory / f"shard-{len(shards):05d}.safetensors"))
    weight_map = {k: f"shard-{i + 1:05d}.safetensors" for i, keys in enumerate(shards) for k in keys}
    (directory / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    marker.write_text(json.dumps({"model_type": FORMAT, **cfg.to_dict()}))


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def load(directory: Path, mode: str) -> LlavaMed:
    return LlavaMed.from_pretrained(directory, dtype=torch.bfloat16,
                                    quantize=None if mode == "bf16" else mode).eval()


def image_question(cfg):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, cfg.decoder.vocab_size, (1, TEXT_TOKENS + 1), generator=g)
    ids[0, 0], ids[0, 5] = cfg.decoder.bos_id, IMAGE_TOKEN_INDEX
    px = torch.randn(1, 3, cfg.vision.image_size, cfg.vision.image_size, generator=g).to(torch.bfloat16)
    return ids, px


def one_run(directory: Path, mode: str, new_tokens: int) -> dict:
    start = time.perf_counter()
    model = load(directory, mode)
    load_s = time.perf_counter() - start
    rss_loaded = peak_rss_gib()
    ids, px = image_question(model.cfg)
    stamps = []
    start = time.perf_counter()
    model.generate(ids, px, max_new_tokens=new_tokens, eos_id=-1, on_token=lambda *_: stamps.append(time.perf_counter()))
    return {"mode": mode, "load_s": load_s, "rss_loaded_gib": rss_loaded, "peak_rss_gib": peak_rss_gib(),
            "ttft_s": stamps[0] - start, "decode_tok_s": (len(stamps) - 1) / (stamps[-1] - stamps[0])}


def run_modes(args) -> None:
    write_checkpoint(args.dir, args.layers)
    runs = {m: [] for m in args.modes}
    for r in range(args.repeats):
        for mode in args.modes:  # interleaved: each repeat runs every mode once, in a fresh process
            cmd = [sys.executable, __file__, "--child", mode, "--dir", str(args.dir), "--new_tokens",
                   str(args.new_tokens), "--threads", str(args.threads)]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
            row = json.loads(out.strip().splitlines()[-1])
            runs[mode].append(row)
            print(f"repeat {r + 1} {mode}: " + " ".join(f"{k} {v:.2f}" for k, v in row.items() if k != "mode"),
                  flush=True)
    print(f"\n{args.layers} decoder layers, {args.threads} threads, prompt {576 + TEXT_TOKENS} positions, "
          f"{args.new_tokens} new tokens, medians of {args.repeats}")
    keys = ["load_s", "peak_rss_gib", "ttft_s", "decode_tok_s"]
    print("| mode | " + " | ".join(keys) + " |\n|---|" + "---|" * len(keys))
    for mode, rows in runs.items():
        print(f"| {mode} | " + " | ".join(f"{statistics.median(r[k] for r in rows):.2f}" for k in keys) + " |")


def child(args) -> None:
    print(json.dumps(one_run(args.dir, args.child, args.new_tokens)))


def quality(args) -> None:
    """Logits of the image question and greedy tokens, int8 / int4 against bf16, one model in memory at a time."""
    write_checkpoint(args.dir, args.layers)
    results = {}
    for mode in MODES:
        model = load(args.dir, mode)
        ids, px = image_question(model.cfg)
        with torch.inference_mode():
            logits = model(ids, px)[0][0, -64:].float()
            tokens = model.generate(ids, px, max_new_tokens=args.new_tokens, eos_id=-1)[0]
        results[mode] = (logits, tokens)
        del model
    ref_logits, ref_tokens = results["bf16"]
    for mode in MODES[1:]:
        logits, tokens = results[mode]
        err = ((logits - ref_logits).norm() / ref_logits.norm()).item()
        top1 = (logits.argmax(-1) == ref_logits.argmax(-1)).float().mean().item()
        agree = next((i for i, (a, b) in enumerate(zip(tokens, ref_tokens)) if a != b), len(tokens))
        print(f"{mode}: logits rel. error {err:.4f}, top-1 agreement over the last 64 positions {top1:.1%}, "
              f"greedy tokens equal to bf16's for the first {agree} of {len(tokens)}")


def products(args) -> None:
    """One 7B MLP product (14336 x 4096) at 1 row (decode) and 628 rows (an image question's prefill); at 1 row the
    down projection's shape (4096 x 14336) too."""
    torch.manual_seed(0)
    w = torch.randn(14336, 4096) * 0.02
    q8, s8 = quantize_int8(w)
    lin = torch.nn.Linear(4096, 14336, bias=False)
    lin.weight.data = w.to(torch.bfloat16)
    int4 = QuantizedLinear.from_linear(lin, QuantConfig("int4", 128))
    int8 = QuantizedLinear.from_linear(lin, QuantConfig("int8"))
    wb, s8b = w.to(torch.bfloat16), s8.to(torch.bfloat16)
    q4 = int4.qweight
    for rows in (1, 628):
        x = torch.randn(rows, 4096)
        xb = x.to(torch.bfloat16)

        def dynamic_int8():  # int8 activations (per row) x int8 weights, int32 accumulation (VNNI)
            sx = x.abs().amax(1, keepdim=True) / 127
            return torch._int_mm((x / sx).round().to(torch.int8), q8.t()).float() * sx * s8

        cases = {
            "fp32 dense": (lambda: F.linear(x, w), 4),
            "bf16 dense (oneDNN)": (lambda: F.linear(xb, wb), 2),
            "int8 weight-only kernel": (lambda: torch.ops.aten._weight_int8pack_mm(xb, q8, s8b), 1),
            "int8 weight-only kernel, fp32 activations": (lambda: torch.ops.aten._weight_int8pack_mm(x, q8, s8), 1),
            "int4 weight-only kernel (g128)": (lambda: torch.ops.aten._weight_int4pack_mm_for_cpu(
                xb, q4, 128, int4.scales), 0.5),
            "int4 weight-only kernel (g128), fp32 activations": (
                lambda: torch.ops.aten._weight_int4pack_mm_for_cpu(x, q4, 128, int4.scales.float()), 0.5),
            "int8 dequantised + bf16 dense": (lambda: F.linear(xb, int8.dequantize(torch.bfloat16)), 1),
            "int4 dequantised + bf16 dense": (lambda: F.linear(xb, int4.dequantize(torch.bfloat16)), 0.5),
        }
        if rows == 1:  # what gemm.linear may run for a bf16 decode step
            cases["bf16 matrix-vector (torch.mv)"] = (lambda: torch.mv(wb, xb[0]), 2)
            cases["bf16 stream kernel (gemm.stream)"] = (lambda: gemm.stream(xb, wb), 2)
            # The MLP's down projection: as many weights in rows of 14336, which the stream kernel sums in 4 chunks.
            wd, xd = wb.reshape(4096, 14336), torch.randn(1, 14336, dtype=torch.bfloat16)
            cases["bf16 dense (oneDNN), 4096 x 14336"] = (lambda: F.linear(xd, wd), 2)
            cases["bf16 stream kernel (gemm.stream), 4096 x 14336"] = (lambda: gemm.stream(xd, wd), 2)
        if rows > 16:
            cases["int8 dequantised + fp32 dense"] = (lambda: F.linear(x, int8.dequantize(torch.float32)), 1)
            cases["int4 dequantised + fp32 dense"] = (lambda: F.linear(x, int4.dequantize(torch.float32)), 0.5)
            cases["int8 x int8 dynamic activations (torch._int_mm)"] = (dynamic_int8, 1)
        times = {k: [] for k in cases}
        for _ in range(args.repeats + 1):  # interleaved; the first round warms up and is dropped
            for name, (fn, _) in cases.items():
                start = time.perf_counter()
                with torch.inference_mode():  # as a decode runs (the stream kernel is built for it)
                    fn()
                times[name].append(time.perf_counter() - start)
        print(f"\n{rows} row(s) x 4096 -> 14336, {args.threads} threads, median of {args.repeats}, "
              f"torch CPU capability {torch.backends.cpu.get_cpu_capability()}")
        print("| product | ms | weight GB/s | GFLOP/s |\n|---|---|---|---|")
        for name, (_, bytes_per) in cases.items():
            t = statistics.median(times[name][1:])
            print(f"| {name} | {t * 1e3:.1f} | {w.numel() * bytes_per / t / 1e9:.1f} | "
                  f"{2 * rows * w.numel() / t / 1e9:.0f} |")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dir", type=Path, default=Path("out/bench-7b"), help="where the random checkpoint goes")
    p.add_argument("--layers", type=int, default=32, help="decoder layers (the real model: 32)")
    p.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--new_tokens", type=int, default=16)
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--products", action="store_true", help="time single products instead of the model")
    p.add_argument("--quality", action="store_true", help="int8 / int4 logits and tokens against bf16")
    p.add_argument("--clean", action="store_true", help="delete the checkpoint afterwards")
    p.add_argument("--child", choices=MODES, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.child:
        child(args)
    elif args.products:
        products(args)
    else:
        print(f"uptime: {os.getloadavg()[0]:.1f} load, torch {torch.__version__}", flush=True)
        quality(args) if args.quality else run_modes(args)
        if args.clean:
            shutil.rmtree(args.dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
