"""sample.py and the shared answering path against transformers' generate, batched vs one by one, resuming."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from transformers import CLIPImageProcessor

import hf_oracle as hf
import sample
from minillavamed.conversation import build_prompt, get_template, tokenize_prompt
from minillavamed.data import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
from minillavamed import LlavaMed
from minillavamed.inference import Assistant
from minillavamed.tokenizer import train_tokenizer

@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny random llava-hf checkpoint with a SentencePiece tokenizer, as a user would download one."""
    root = tmp_path_factory.mktemp("llava_hf")
    model, tok = hf.llava_hf_checkpoint(root, "model")
    return root, model, tok


@pytest.mark.parametrize("flags", [[], ["--compile"]], ids=["eager", "compiled"])
def test_sample_py_greedy_equals_transformers_generate(checkpoint, capsys, flags):
    root, model, tok = checkpoint
    question = "is there an opacity?"
    assert sample.main(["--model", str(root / "model"), "--image", str(root / "img0.png"), "--prompt", question,
                        "--max_new_tokens", "24", *flags]) == 0
    printed = capsys.readouterr().out.strip()

    template = get_template("mistral_instruct")  # what a Mistral-based llava-hf checkpoint is chatted with
    ids = tokenize_prompt(build_prompt(template, question), tok)
    ids = sum(([tok.vocab_size] * 16 if t == -200 else [t] for t in ids), [])
    processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32},
                                   image_mean=OPENAI_CLIP_MEAN, image_std=OPENAI_CLIP_STD)
    pixels = processor(Image.open(root / "img0.png").convert("RGB"), return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        out = model.generate(input_ids=torch.tensor([ids]), pixel_values=pixels, max_new_tokens=24, do_sample=False,
                             eos_token_id=tok.eos_id, pad_token_id=tok.pad_id)[0, len(ids):].tolist()
    if tok.eos_id in out:
        out = out[: out.index(tok.eos_id)]
    expected = tok.decode(out)
    for stop in template.stop_strings:
        expected = expected.split(stop)[0]
    assert len(out) > 3 and printed == expected.strip()


def test_compile_is_refused_off_the_cpu(monkeypatch, capsys):
    monkeypatch.setattr(sample, "device_arg", str)  # as if this machine had a GPU
    with pytest.raises(SystemExit):
        sample.parse_args(["--prompt", "hi", "--compile", "--device", "cuda"])
    assert "--compile is built and measured for CPU decoding" in capsys.readouterr().err


@pytest.mark.slow
def test_batched_answers_equal_one_by_one(checkpoint):
    root, _, _ = checkpoint
    assistant = Assistant.load(root / "model")
    questions = ["is there an opacity?", "describe the figure in detail please, what is shown in this image?",
                 "where?"]
    images = [Image.open(root / f"img{i}.png") for i in range(3)]
    batched = assistant.answer(questions, images, max_new_tokens=20)
    alone = [assistant.answer([q], [im], max_new_tokens=20)[0] for q, im in zip(questions, images)]
    assert batched == alone and len(set(batched)) > 1


def test_question_file_is_resumable(checkpoint, tmp_path):
    root, _, _ = checkpoint
    questions = tmp_path / "q.jsonl"
    questions.write_text("".join(json.dumps({"question_id": f"q{i}", "image": f"img{i % 3}.png",
                                             "text": f"question number {i}?"}) + "\n" for i in range(5)))
    answers = tmp_path / "answers.jsonl"
    argv = ["--model", str(root / "model"), "--questions", str(questions), "--image_folder", str(root),
            "--answers", str(answers), "--batch_size", "2", "--max_new_tokens", "8"]
    assert sample.main(argv) == 0
    full = [json.loads(line) for line in answers.read_text().splitlines()]
    # As if killed while writing the fourth answer: two whole lines and a torn one.
    answers.write_text("".join(json.dumps(r) + "\n" for r in full[:2]) + json.dumps(full[2])[:15])
    assert sample.main(argv) == 0
    again = [json.loads(line) for line in answers.read_text().splitlines()]
    assert [r["question_id"] for r in again] == [f"q{i}" for i in range(5)]
    assert [r["text"] for r in again] == [r["text"] for r in full]


def test_no_model_says_how_to_get_one(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit, match="python train.py --stage 0"):
        sample.main(["--prompt", "hello"])
    with pytest.raises(SystemExit):
        sample.main(["--prompt", "hello", "--chat"])


def test_chat_session(checkpoint, monkeypatch, capsys):
    root, _, _ = checkpoint
    lines = iter(["is there an opacity?", "/image " + str(root / "missing.png"), "/image " + str(root / "img1.png"),
                  "and now?", "/reset", "where?", "/quit"])
    monkeypatch.setattr("builtins.input", lambda _prompt="": next(lines))
    assert sample.main(["--model", str(root / "model"), "--chat", "--image", str(root / "img0.png"),
                        "--max_new_tokens", "6"]) == 0
    out = capsys.readouterr().out
    assert out.count("assistant> ") == 3
    assert "error: image file not found" in out and "missing.png" in out


def run_sample(*argv: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    root = Path(__file__).resolve().parent.parent
    return subprocess.run([sys.executable, "sample.py", *argv], cwd=root, input=stdin, capture_output=True,
                          text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(root)})


@pytest.mark.slow
def test_generation_never_emits_an_id_the_tokenizer_cannot_decode(checkpoint, tmp_path):
    # llava-hf's extra <image> row made the most likely token: embeddings carry a large constant in dimension 0
    # (so every normalized hidden state points along it) and only the extra output row reads that dimension.
    root, _, tok = checkpoint
    model = tmp_path / "model"
    shutil.copytree(root / "model", model)
    files = list(model.glob("*.safetensors"))
    for f in files:
        w = load_file(f)
        for k in w:
            if k.endswith("embed_tokens.weight"):
                w[k][:, 0] = 1000.0
            if k.endswith("lm_head.weight"):
                w[k][:, 0] = 0.0
                w[k][tok.vocab_size, 0] = 100.0
        save_file(w, f, metadata={"format": "pt"})
    assistant = Assistant.load(model)
    ids = torch.tensor([tokenize_prompt(build_prompt(assistant.template, "hi", with_image=False), tok,
                                        with_image=False)])
    assert assistant.model.generate(ids, max_new_tokens=2)[0][0] == tok.vocab_size  # what decoding died on

    res = run_sample("--model", str(model), "--chat", "--max_new_tokens", "4", stdin="hi\nand again?\n/quit\n")
    assert res.returncode == 0, res.stderr
    assert res.stdout.count("assistant> ") == 2


@pytest.mark.slow
def test_a_tokenizer_larger_than_the_model_is_refused(checkpoint, tmp_path):
    root, _, _ = checkpoint
    model = tmp_path / "model"
    shutil.copytree(root / "model", model)
    big = train_tokenizer(hf.TEXTS * 3 + [f"word{i} token{i}" for i in range(400)], tmp_path / "tok", vocab_size=500)
    shutil.copy(tmp_path / "tok" / "tokenizer.model", model / "tokenizer.model")
    res = run_sample("--model", str(model), "--prompt", "hi")
    assert res.returncode == 1
    rows = LlavaMed.from_pretrained(model).cfg.decoder.vocab_size
    assert big.vocab_size > rows
    assert (f"{model}: the model has {rows} vocabulary rows but its tokenizer.model has {big.vocab_size} "
            "pieces") in res.stderr.strip().splitlines()[-1]
