"""Throughput and time to first token of `sample.py --serve` (continuous batching) against serial answering.

The tiny preset with random weights and a small SentencePiece tokenizer is saved to a temporary checkpoint;
`python sample.py --model DIR --serve` runs it in a subprocess on 127.0.0.1, and C concurrent clients (threads
with the openai client, streaming) each send R greedy requests back to back: an image plus a question, all
different, `max_tokens` fixed. Beside it the same clients are served one request at a time,
first come first served, by `Assistant.answer` in this process (what `sample.py --prompt` runs): a server
without batching.

Throughput is completion tokens (the server's `usage`) over the wall time of all requests; time to first
token (TTFT) is from sending a request to its first streamed chunk (the server sends it at the first sampled
token); on the serial side from the request's arrival (its client's previous answer) to its first `on_token`
call, which includes the wait behind the other clients' requests.

    python bench/serve_speed.py                          # 1, 4 and 16 clients, 2 requests each, 64 tokens
    python bench/serve_speed.py --clients 1 4 16 --requests 2 --max_tokens 64
"""

from __future__ import annotations

import argparse
import base64
import io
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import openai
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from minillavamed import LlavaMed  # noqa: E402
from minillavamed.config import preset  # noqa: E402
from minillavamed.inference import Assistant  # noqa: E402
from minillavamed.tokenizer import train_tokenizer  # noqa: E402

WORDS = ("opacity lesion heart lung lobe left right small large chest abdomen scan figure shown enlarged "
         "nodule mass liver kidney brain tissue cell stain density margin").split()


def make_checkpoint(path: Path) -> None:
    torch.manual_seed(0)
    model = LlavaMed(preset("tiny")).eval()
    model.save_pretrained(path)
    rng = np.random.default_rng(0)
    texts = [" ".join(rng.choice(WORDS, 12)) for _ in range(2000)]
    train_tokenizer(texts, path, vocab_size=400)


def requests(n: int, image_size: int) -> list[tuple[str, str, Image.Image]]:
    """n different (question, PNG data URL, image) triples."""
    rng = np.random.default_rng(1)
    out = []
    for k in range(n):
        image = Image.fromarray(rng.integers(0, 255, (image_size, image_size, 3), dtype=np.uint8))
        buf = io.BytesIO()
        image.save(buf, format="PNG")
        question = " ".join(rng.choice(WORDS, 8)) + f" {k}?"
        out.append((question, "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode(), image))
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def percentile(xs: list[float], q: float) -> float:
    return float(np.percentile(xs, q))


def run_server(url: str, name: str, clients: int, reqs, max_tokens: int) -> tuple[float, list[float], int]:
    """(wall seconds, TTFTs, completion tokens) for `clients` threads splitting `reqs` among them."""
    client = openai.OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=600)
    ttft, tokens, errors, lock = [], [0], [], threading.Lock()
    start = threading.Barrier(clients + 1)

    def worker(mine):
        start.wait()
        try:
            ask_all(mine)
        except openai.OpenAIError as e:
            errors.append(repr(e))

    def ask_all(mine):
        for question, image_url, _ in mine:
            sent = time.perf_counter()
            first = None
            for chunk in client.chat.completions.create(
                    model=name, max_tokens=max_tokens, temperature=0, stream=True,
                    stream_options={"include_usage": True},
                    messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": image_url}},
                                                           {"type": "text", "text": question}]}]):
                if first is None:
                    first = time.perf_counter() - sent
                if chunk.usage is not None:
                    with lock:
                        tokens[0] += chunk.usage.completion_tokens
            with lock:
                ttft.append(first)

    threads = [threading.Thread(target=worker, args=(reqs[k::clients],)) for k in range(clients)]
    for t in threads:
        t.start()
    start.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    if errors:
        raise SystemExit(f"{len(errors)} of {clients} clients failed: {errors[0]}")
    return time.perf_counter() - t0, ttft, tokens[0]


def run_serial(assistant: Assistant, reqs, clients: int, max_tokens: int) -> tuple[float, list[float], int]:
    """The same clients against a server that answers one request at a time, first come first served: request
    i (client i % clients) arrives when that client's previous one is answered, and waits for those before it."""
    ttft, tokens, done = [], 0, []
    t0 = time.perf_counter()
    for i, (question, _, image) in enumerate(reqs):
        arrived = t0 if i < clients else done[i - clients]
        first, counted = [], []

        def on_token(t, active):
            if not first:
                first.append(time.perf_counter())
            if active[0] and int(t[0]) != assistant.tokenizer.eos_id:
                counted.append(1)

        assistant.answer([question], [image], max_new_tokens=max_tokens, on_token=on_token)
        done.append(time.perf_counter())
        ttft.append(first[0] - arrived)
        tokens += len(counted)
    return time.perf_counter() - t0, ttft, tokens


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16])
    p.add_argument("--requests", type=int, default=2, help="requests per client")
    p.add_argument("--max_tokens", type=int, default=64)
    p.add_argument("--max_batch", type=int, default=16)
    p.add_argument("--server_log", type=Path, default=None, help="write the server's stderr here")
    p.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch threads, both sides")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as d:
        ckpt = Path(d) / "tiny-random"
        make_checkpoint(ckpt)
        assistant = Assistant.load(ckpt)
        port = free_port()
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
        server = subprocess.Popen([sys.executable, str(ROOT / "sample.py"), "--model", str(ckpt), "--serve",
                                   "--port", str(port), "--max_batch", str(args.max_batch), "--device", "cpu"],
                                  env=env, stderr=open(args.server_log, "w") if args.server_log else subprocess.DEVNULL)
        url = f"http://127.0.0.1:{port}/v1"
        try:
            probe = openai.OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=5)
            for _ in range(600):  # bounded: about a minute
                try:
                    probe.models.list()
                    break
                except openai.APIConnectionError:
                    time.sleep(0.1)
            else:
                raise SystemExit("the server did not come up within a minute")
            size = assistant.model.cfg.vision.image_size
            run_server(url, ckpt.name, 1, requests(2, size), 8)  # warm-up
            run_serial(assistant, requests(2, size), 1, 8)
            print(f"tiny preset (random), {args.max_tokens} new tokens per request, greedy, {args.requests} requests "
                  f"per client, max_batch {args.max_batch}, {args.threads} torch threads")
            print(f"{'clients':>7} | {'served tok/s':>12} {'TTFT p50 ms':>11} {'p95 ms':>8} | "
                  f"{'serial tok/s':>12} {'TTFT p50 ms':>11} {'p95 ms':>8} | {'throughput':>10}")
            for clients in args.clients:
                reqs = requests(clients * args.requests, size)
                s_wall, s_ttft, s_tokens = run_server(url, ckpt.name, clients, reqs, args.max_tokens)
                r_wall, r_ttft, r_tokens = run_serial(assistant, reqs, clients, args.max_tokens)
                if s_tokens != r_tokens:
                    print(f"  note: served {s_tokens} tokens, serial {r_tokens}")
                s_rate, r_rate = s_tokens / s_wall, r_tokens / r_wall
                print(f"{clients:>7} | {s_rate:>12.1f} {percentile(s_ttft, 50) * 1e3:>11.0f} "
                      f"{percentile(s_ttft, 95) * 1e3:>8.0f} | {r_rate:>12.1f} {percentile(r_ttft, 50) * 1e3:>11.0f} "
                      f"{percentile(r_ttft, 95) * 1e3:>8.0f} | {s_rate / r_rate:>9.2f}x")
        finally:
            server.terminate()
            server.wait(timeout=30)


if __name__ == "__main__":
    main()
