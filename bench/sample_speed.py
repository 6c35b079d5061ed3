"""Decode speed of LlavaMed.generate against transformers' LlavaForConditionalGeneration.generate.

Both run the same weights (the tiny preset, random, exported to the llava-hf layout), the same prompt (an
image plus a question) and greedy decoding of a fixed number of tokens. Printed side by side: time to
first token (prefill + one step) and decode tokens/s after it, each the median over repeats, and our speedup
over transformers: the median of the repeats' ratios, the two sides of each repeat run back to back.

    python bench/sample_speed.py                      # tiny preset, batch 1 and 8, 128 new tokens
    python bench/sample_speed.py --preset tiny --batch 1 --new_tokens 256 --repeats 5
    python bench/sample_speed.py --compile            # ours with compiled decode steps (LlavaMed.compile_decoding)
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import LlavaForConditionalGeneration

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from minillavamed import LlavaMed  # noqa: E402
from minillavamed.checkpoint import export_llava_hf  # noqa: E402
from minillavamed.config import IMAGE_TOKEN_INDEX, preset  # noqa: E402


class FirstTokenClock:
    """Notes when the first generated token arrives (transformers' streamer protocol: put, then end)."""

    def __init__(self):
        self.calls, self.first = 0, None

    def put(self, _value):
        self.calls += 1
        if self.calls == 2:  # the first put is the prompt
            self.first = time.perf_counter()

    def end(self):
        pass


def run_ours(model, ids, pixels, new_tokens):
    first = []
    start = time.perf_counter()
    model.generate(ids, pixels, max_new_tokens=new_tokens, eos_id=-1,
                   on_token=lambda *_: first or first.append(time.perf_counter()))
    end = time.perf_counter()
    return first[0] - start, end - first[0]


def run_hf(model, ids, pixels, new_tokens):
    clock = FirstTokenClock()
    start = time.perf_counter()
    with torch.no_grad():
        out = model.generate(input_ids=ids, pixel_values=pixels, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                             do_sample=False, streamer=clock if ids.shape[0] == 1 else None, pad_token_id=0)
    end = time.perf_counter()
    assert out.shape[1] - ids.shape[1] == new_tokens
    if clock.first is None:  # transformers streams batch 1 only: time a one-token run for the batch
        t = time.perf_counter()
        with torch.no_grad():
            model.generate(input_ids=ids, pixel_values=pixels, max_new_tokens=1, do_sample=False, pad_token_id=0)
        clock.first = start + (time.perf_counter() - t)
    return clock.first - start, end - clock.first


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="tiny")
    p.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    p.add_argument("--prompt_tokens", type=int, default=40, help="text tokens besides the image")
    p.add_argument("--new_tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=11)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--compile", action="store_true", help="compile our decode steps (timed separately)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = preset(args.preset)
    ours = LlavaMed(cfg).eval()
    with tempfile.TemporaryDirectory() as d:
        export_llava_hf(ours, d)
        theirs = LlavaForConditionalGeneration.from_pretrained(d).eval()
    if args.compile:
        ours.compile_decoding()
    image_id, patches = cfg.decoder.vocab_size, cfg.vision.num_patches
    print(f"preset {args.preset}: {sum(p.numel() for p in ours.parameters()) / 1e6:.1f}M params, "
          f"{patches} image tokens + {args.prompt_tokens} text tokens, {args.new_tokens} new tokens, "
          f"{args.threads} threads, median of {args.repeats} interleaved repeats"
          + (", our decode steps compiled" if args.compile else ""))
    print(f"{'batch':>5} | {'TTFT ms ours':>12} {'transformers':>12} {'ratio':>6} | "
          f"{'decode tok/s ours':>17} {'transformers':>12} {'ratio':>6}")
    for batch in args.batch:
        text = torch.randint(3, cfg.decoder.vocab_size, (batch, args.prompt_tokens))
        ids = torch.cat([text[:, :4], torch.full((batch, 1), IMAGE_TOKEN_INDEX), text[:, 4:]], dim=1)
        hf_ids = torch.cat([text[:, :4], torch.full((batch, patches), image_id), text[:, 4:]], dim=1)
        pixels = torch.randn(batch, 3, cfg.vision.image_size, cfg.vision.image_size)
        runners = {"ours": (run_ours, ours, ids), "hf": (run_hf, theirs, hf_ids)}
        for name, (fn, model, x) in runners.items():
            start = time.perf_counter()
            fn(model, x, pixels, 4)  # warm-up, and ours compiles its decode steps for this batch size
            if args.compile and name == "ours":
                seconds = time.perf_counter() - start
                print(f"batch {batch}: the warm-up's 4 tokens, compiling included, took {seconds:.1f} s")
        runs = {name: [] for name in runners}
        for r in range(args.repeats):
            # Interleaved, in alternating order: this host's speed drifts by tens of percent over seconds, and
            # a drift then slows both sides of a ratio alike.
            for name in (("ours", "hf") if r % 2 == 0 else ("hf", "ours")):
                fn, model, x = runners[name]
                runs[name].append(fn(model, x, pixels, args.new_tokens))
        ttft = {name: [t for t, _ in rs] for name, rs in runs.items()}
        decode = {name: [batch * (args.new_tokens - 1) / d for _, d in rs] for name, rs in runs.items()}
        ttft_ratio = statistics.median(h / o for o, h in zip(ttft["ours"], ttft["hf"]))
        decode_ratio = statistics.median(o / h for o, h in zip(decode["ours"], decode["hf"]))
        t_o, t_h = (statistics.median(ttft[n]) for n in ("ours", "hf"))
        d_o, d_h = (statistics.median(decode[n]) for n in ("ours", "hf"))
        print(f"{batch:>5} | {t_o * 1e3:>12.1f} {t_h * 1e3:>12.1f} {ttft_ratio:>5.2f}x | "
              f"{d_o:>17.1f} {d_h:>12.1f} {decode_ratio:>5.2f}x")

if __name__ == "__main__":
    main()
