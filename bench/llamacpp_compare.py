"""llama.cpp on the same decoder weights as bench/local_7b.py: F16, Q8_0 and Q4_0 against our bf16, int8, int4.

Not part of the paper, and never a dependency of the project: llama.cpp is what people sample 7B models with on
a laptop, so it is the yardstick for minillavamed/quantize.py. This script

1. makes a bench-only virtual environment, bench/.venv-llamacpp (gitignored), with `llama-cpp-python` (built
   from its sdist: cmake and a C++ compiler, 10-20 min on 2 cores) and `gguf`, unless it is there already;
2. writes the decoder of the checkpoint local_7b.py made (out/bench-7b, the same random bf16 weights) to an
   F16 GGUF with `gguf` (Mistral is llama.cpp's "llama" architecture; queries and keys permuted to its rotary
   layout as convert_hf_to_gguf.py does; a placeholder vocabulary of the model's size), and quantises it to
   Q8_0 and Q4_0 with llama.cpp's own quantiser;
3. in a fresh process per format and repeat (interleaved): load time, peak RSS, time to first token of a
   628-token prompt (the length of an image question: llama.cpp gets text tokens where ours has 576 image
   positions from the ViT, so ours also pays the vision tower), and decode tokens/s.

    python bench/local_7b.py --layers 4 --modes bf16 --repeats 1   # writes out/bench-7b if missing
    python bench/llamacpp_compare.py --layers 4 --repeats 3 --threads 2
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VENV = ROOT / "bench" / ".venv-llamacpp"
PYTHON = VENV / "bin" / "python"
FORMATS = ("F16", "Q8_0", "Q4_0")
PROMPT = 628


def ensure_venv() -> None:
    if PYTHON.exists() and subprocess.run([str(PYTHON), "-c", "import llama_cpp, gguf"]).returncode == 0:
        return
    subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
    env = {**os.environ, "CMAKE_BUILD_PARALLEL_LEVEL": str(os.cpu_count()),
           "CMAKE_ARGS": "-DGGML_NATIVE=ON -DLLAVA_BUILD=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF "
                         "-DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF"}
    subprocess.run([str(PYTHON), "-m", "pip", "install", "llama-cpp-python", "gguf"], check=True, env=env)


def write_gguf(checkpoint: Path, out: Path) -> None:
    """Our decoder (bf16 safetensors, our key names) -> an F16 GGUF of llama.cpp's llama architecture."""
    import numpy as np
    import torch

    sys.path.insert(0, str(ROOT))
    sys.path.insert(0, next(str(p) for p in (VENV / "lib").glob("python*/site-packages")))
    import gguf

    from minillavamed.checkpoint import WeightFiles
    from minillavamed.config import LlavaConfig

    meta = json.loads((checkpoint / "config.json").read_text())
    cfg = LlavaConfig.from_dict({k: v for k, v in meta.items() if k != "model_type"}).decoder
    files = WeightFiles(checkpoint)
    head_dim = cfg.dim // cfg.heads

    def permute(w: torch.Tensor, heads: int) -> torch.Tensor:  # convert_hf_to_gguf.py's LlamaModel.permute
        return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)

    partial = out.with_suffix(".partial")  # renamed when complete, so that a killed write is never reused
    # Each tensor goes to a temporary file as it is converted: held in memory, a 7B model's would be 14.5 GB.
    writer = gguf.GGUFWriter(str(partial), "llama", use_temp_file=True)
    writer.add_name("minillavamed-bench")
    writer.add_context_length(cfg.max_seq_len)
    writer.add_embedding_length(cfg.dim)
    writer.add_block_count(cfg.layers)
    writer.add_feed_forward_length(cfg.mlp_dim)
    writer.add_head_count(cfg.heads)
    writer.add_head_count_kv(cfg.kv_heads)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(cfg.rope_theta)
    writer.add_layer_norm_rms_eps(cfg.norm_eps)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
    writer.add_tokenizer_model("llama")
    writer.add_token_list([b"<unk>", b"<s>", b"</s>"] + [f"t{i}".encode() for i in range(3, cfg.vocab_size)])
    writer.add_token_scores([0.0] * cfg.vocab_size)
    writer.add_token_types([gguf.TokenType.UNKNOWN, gguf.TokenType.CONTROL, gguf.TokenType.CONTROL]
                           + [gguf.TokenType.NORMAL] * (cfg.vocab_size - 3))
    writer.add_bos_token_id(cfg.bos_id)
    writer.add_eos_token_id(cfg.eos_id)

    def add(name: str, t: torch.Tensor) -> None:
        t = t.float()
        writer.add_tensor(name, t.numpy().astype(np.float16 if t.dim() == 2 else np.float32))

    add("token_embd.weight", files.get("decoder.embed.weight"))
    kv = cfg.kv_heads * head_dim
    for i in range(cfg.layers):
        p = f"decoder.blocks.{i}."
        q, k, v = files.get(p + "attn.wqkv.weight").split([cfg.dim, kv, kv])
        gate, up = files.get(p + "gate_up.weight").split([cfg.mlp_dim, cfg.mlp_dim])
        add(f"blk.{i}.attn_norm.weight", files.get(p + "attn_norm.weight"))
        add(f"blk.{i}.attn_q.weight", permute(q, cfg.heads))
        add(f"blk.{i}.attn_k.weight", permute(k, cfg.kv_heads))
        add(f"blk.{i}.attn_v.weight", v)
        add(f"blk.{i}.attn_output.weight", files.get(p + "attn.wo.weight"))
        add(f"blk.{i}.ffn_norm.weight", files.get(p + "mlp_norm.weight"))
        add(f"blk.{i}.ffn_gate.weight", gate)
        add(f"blk.{i}.ffn_up.weight", up)
        add(f"blk.{i}.ffn_down.weight", files.get(p + "down.weight"))
    add("output_norm.weight", files.get("decoder.norm.weight"))
    add("output.weight", files.get("decoder.lm_head.weight"))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    os.replace(partial, out)


def quantise(f16: Path, out: Path, fmt: str) -> None:
    """llama.cpp's own quantiser (llama_model_quantize), run in the bench venv."""
    code = ("import llama_cpp, sys\n"
            "p = llama_cpp.llama_model_quantize_default_params()\n"
            f"p.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_{fmt}\n"
            "sys.exit(llama_cpp.llama_model_quantize(sys.argv[1].encode(), sys.argv[2].encode(), p))\n")
    partial = out.with_suffix(".partial")
    subprocess.run([str(PYTHON), "-c", code, str(f16), str(partial)], check=True)
    os.replace(partial, out)


def child(path: Path, threads: int, new_tokens: int, extra_bufts: bool) -> dict:
    """One format in this (venv) process: load, prefill of PROMPT tokens + first token, then decode."""
    import llama_cpp
    import llama_cpp.llama_cpp as low_level

    if not extra_bufts:  # Llama() does not expose the flag: it builds its parameters from this default
        default = low_level.llama_model_default_params

        def plain_buffers():
            params = default()
            params.use_extra_bufts = False
            return params

        low_level.llama_model_default_params = plain_buffers

    start = time.perf_counter()
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=PROMPT + new_tokens + 8, n_batch=1024, n_ubatch=1024,
                          n_threads=threads, n_threads_batch=threads, verbose=False)
    load_s = time.perf_counter() - start
    vocab = llm.n_vocab()
    tokens = [1] + [3 + (i * 7919) % (vocab - 3) for i in range(PROMPT - 1)]
    start = time.perf_counter()
    llm.eval(tokens)
    token = int(llm.scores[llm.n_tokens - 1].argmax())
    ttft = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(new_tokens - 1):
        llm.eval([token])
        token = int(llm.scores[llm.n_tokens - 1].argmax())
    decode = (new_tokens - 1) / (time.perf_counter() - start)
    return {"load_s": load_s, "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
            "ttft_s": ttft, "decode_tok_s": decode}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dir", type=Path, default=ROOT / "out" / "bench-7b", help="bench/local_7b.py's checkpoint")
    p.add_argument("--layers", type=int, default=32, help="decoder layers the checkpoint has (a check)")
    p.add_argument("--formats", nargs="+", choices=FORMATS, default=list(FORMATS))
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--new_tokens", type=int, default=16)
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--no_extra_bufts", action="store_true",
                   help="load without llama.cpp's extra buffer types (its AMX and repacked-weight paths): with "
                        "AMX-INT8 (Sapphire Rapids and later) its Q8_0 / Q4_0 prefill crashed on this GGUF")
    p.add_argument("--child", type=Path, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child is not None:
        print(json.dumps(child(args.child, args.threads, args.new_tokens, not args.no_extra_bufts)))
        return 0
    config = args.dir / "config.json"
    if not config.exists():
        print(f"{args.dir}: no checkpoint; run bench/local_7b.py --layers {args.layers} first", file=sys.stderr)
        return 1
    if json.loads(config.read_text())["decoder"]["layers"] != args.layers:
        print(f"{args.dir} holds another layer count than --layers {args.layers}; rerun local_7b.py", file=sys.stderr)
        return 1
    ensure_venv()
    f16 = args.dir / "decoder-F16.gguf"
    if not f16.exists():
        write_gguf(args.dir, f16)
    paths = {}
    for fmt in args.formats:
        paths[fmt] = args.dir / f"decoder-{fmt}.gguf"
        if not paths[fmt].exists():
            quantise(f16, paths[fmt], fmt)
    runs = {fmt: [] for fmt in args.formats}
    for r in range(args.repeats):
        for fmt in args.formats:
            out = subprocess.run([str(PYTHON), __file__, "--child", str(paths[fmt]), "--threads", str(args.threads),
                                  "--new_tokens", str(args.new_tokens)] + ["--no_extra_bufts"] * args.no_extra_bufts,
                                 check=True, capture_output=True, text=True)
            row = json.loads(out.stdout.strip().splitlines()[-1])
            runs[fmt].append(row)
            print(f"repeat {r + 1} {fmt}: " + " ".join(f"{k} {v:.2f}" for k, v in row.items()), flush=True)
    print(f"\nllama.cpp, {args.layers} decoder layers, {args.threads} threads, prompt {PROMPT} tokens, "
          f"{args.new_tokens} new tokens, medians of {args.repeats}")
    keys = ["load_s", "peak_rss_gib", "ttft_s", "decode_tok_s"]
    print("| format | " + " | ".join(keys) + " |\n|---|" + "---|" * len(keys))
    for fmt, rows in runs.items():
        print(f"| {fmt} | " + " | ".join(f"{statistics.median(r[k] for r in rows):.2f}" for k in keys) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
