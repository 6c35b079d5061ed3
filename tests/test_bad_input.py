"""Bad input and reused directories, through the scripts as a user runs them: each case ends with one line
naming the flag, file or record, a non-zero exit, and nothing written before lost."""

from __future__ import annotations

import json
import os
import resource
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image
from safetensors.torch import load_file, save_file

import train
from minillavamed import LlavaMed, resume
from minillavamed.distributed import Dist
from minillavamed.synthetic_world import WorldConfig, generate_world

ROOT = Path(__file__).resolve().parent.parent
WORLD = WorldConfig(seed=4, image_size=64, n_pmc=24, n_instruct=16, n_vqa_train=4, n_vqa_test=2, n_general=24)
SMALL = ["--micro_batch", "2", "--global_batch", "4", "--max_len", "384", "--log_interval", "1", "--val_size", "2",
         "--eval_questions", "1", "--seed", "5"]


def run(*argv: str, stdin: str | None = None, **kw) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, *argv], cwd=ROOT, env=env, input=stdin, capture_output=True, text=True,
                          timeout=300, **kw)


def last_line(res: subprocess.CompletedProcess) -> str:
    return res.stderr.strip().splitlines()[-1] if res.stderr.strip() else ""


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(f.relative_to(folder)): f.read_bytes() for f in sorted(folder.rglob("*")) if f.is_file()}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return generate_world(tmp_path_factory.mktemp("world"), WORLD)


@pytest.fixture(scope="module")
def base(world, tmp_path_factory):
    """A tiny stage-0 model, two steps from scratch: what the stage-2 runs below start from."""
    out = tmp_path_factory.mktemp("base")
    assert train.main(["--stage", "0", "--data", world["general"], "--image_folder", world["image_folder"],
                       "--eval_data", world["vqa_test"], "--out_dir", str(out), "--max_iters", "2", *SMALL]) == 0
    return out


def stage2(world, base, out, *extra) -> list[str]:
    return ["train.py", "--stage", "2", "--data", world["instruct"], "--image_folder", world["image_folder"],
            "--eval_data", world["vqa_test"], "--init_from", str(base), "--out_dir", str(out), *SMALL, *extra]


@pytest.fixture(scope="module")
def run_a(world, base, tmp_path_factory):
    """A finished stage-2 run with checkpoints at steps 1 and 2."""
    out = tmp_path_factory.mktemp("runs") / "a"
    res = run(*stage2(world, base, out, "--max_iters", "2", "--ckpt_interval", "1"))
    assert res.returncode == 0, res.stdout + res.stderr
    return out


# ------------------------------------------------------------------------------------------------ train.py
@pytest.mark.slow
@pytest.mark.parametrize("flag,value", [("--global_batch", "-4"), ("--keep_last", "-1"), ("--log_interval", "0"),
                                        ("--lr", "0"), ("--dtype", "banana"), ("--device", "bogus")])
def test_train_rejects_a_bad_flag_naming_it(tmp_path, flag, value):
    res = run("train.py", "--stage", "2", "--out_dir", str(tmp_path / "out"), flag, value)
    assert res.returncode == 2
    assert len(res.stderr.strip().splitlines()) == 1 and f"argument {flag}:" in res.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_train_refuses_triton_where_the_kernels_cannot_run_before_any_work(world, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # a CPU without the interpreter
    res = subprocess.run([sys.executable, "train.py", "--stage", "0", "--data", world["general"], "--image_folder",
                          world["image_folder"], "--out_dir", str(tmp_path / "out"), "--attn", "triton", *SMALL],
                         cwd=ROOT, env={**env, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, timeout=300)
    assert res.returncode == 1
    assert "attention backend 'triton' cannot run here" in last_line(res) and "--attn sdpa" in last_line(res)
    assert not (tmp_path / "out" / "tokenizer").exists()


def test_train_help_describes_every_option():
    res = run("train.py", "--help")
    assert res.returncode == 0
    text = " ".join(res.stdout.split())
    for f in train.dataclasses.fields(train.TrainConfig):
        assert f.metadata["help"].split(";")[0].split("(")[0].strip()[:30] in text, f.name
    assert "--lr LR peak learning rate, > 0; leave it out for the stage's default" in text
    assert "0: the stage's default" in text and "(default: 100)" in text  # --ckpt_interval


@pytest.mark.slow
def test_train_refuses_an_out_dir_holding_another_run(world, base, run_a):
    before = snapshot(run_a)
    res = run(*stage2(world, base, run_a, "--max_iters", "4"))
    assert res.returncode == 1
    assert f"--out_dir {run_a} holds another run" in last_line(res) and "--resume" in last_line(res)
    assert "--move_aside" in last_line(res)
    assert snapshot(run_a) == before


@pytest.mark.slow
def test_train_move_aside_keeps_the_old_run(world, base, run_a, tmp_path):
    out = tmp_path / "b"
    shutil.copytree(run_a, out)
    before = snapshot(out)
    res = run(*stage2(world, base, out, "--max_iters", "1", "--move_aside"))
    assert res.returncode == 0, res.stdout + res.stderr
    assert f"now in {out}.prev-1" in res.stdout
    assert snapshot(tmp_path / "b.prev-1") == before
    assert [json.loads(x)["iter"] for x in (out / "metrics.jsonl").read_text().splitlines()] == [1]


@pytest.mark.slow
def test_train_resume_refuses_another_configuration(world, base, run_a):
    before = snapshot(run_a)
    res = run(*stage2(world, base, run_a, "--max_iters", "4", "--resume", "--lr", "0.5"))
    assert res.returncode == 1
    assert "belongs to another configuration" in last_line(res) and "--lr 2e-05 there, 0.5 now" in last_line(res)
    assert "step-0000002" in last_line(res)
    assert snapshot(run_a) == before


@pytest.mark.slow
def test_train_out_dir_that_cannot_be_written_fails_before_loading(world, base, tmp_path):
    (tmp_path / "file").write_text("not a folder")
    res = run(*stage2(world, base, tmp_path / "file" / "out", "--max_iters", "1"))
    assert res.returncode == 1
    assert f"--out_dir {tmp_path / 'file' / 'out'}: cannot write there" in last_line(res)
    assert "stage 2:" not in res.stdout  # nothing was loaded


@pytest.mark.slow
def test_train_a_failed_checkpoint_write_keeps_the_previous_one(world, base, run_a, tmp_path):
    out = tmp_path / "c"
    shutil.copytree(run_a, out)
    step2 = snapshot(out / "checkpoints" / "step-0000002")
    top = snapshot(out)

    def small_files():  # as a full disk would: every file past 1 MB fails to write (EFBIG)
        resource.setrlimit(resource.RLIMIT_FSIZE, (2**20, 2**20))

    res = run(*stage2(world, base, out, "--max_iters", "3", "--ckpt_interval", "1", "--resume"),
              preexec_fn=small_files)
    assert res.returncode == 1, res.stdout + res.stderr
    line = last_line(res)
    assert "saving the checkpoint of iter 3 failed writing" in line and "File too large" in line
    assert "step-0000002" in line and "--resume" in line
    assert snapshot(out / "checkpoints" / "step-0000002") == step2
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-0000001", "step-0000002"]
    after = snapshot(out)
    assert all(after[k] == top[k] for k in ("model.safetensors", "config.json", "tokenizer.model"))  # step 2's
    LlavaMed.from_pretrained(out)
    LlavaMed.from_pretrained(out / "checkpoints" / "step-0000002")


@pytest.mark.slow
def test_free_space_for_one_checkpoint_is_checked(base, monkeypatch, tmp_path):
    model = LlavaMed.from_pretrained(base)
    need = resume.checkpoint_bytes(model, list(model.parameters()))
    monkeypatch.setattr(shutil, "disk_usage", lambda _p: shutil._ntuple_diskusage(10**12, 10**12, need - 1))
    with pytest.raises(SystemExit, match=f"--out_dir {tmp_path}: 0.* GB free, but one checkpoint needs about"):
        resume.check_free_space(tmp_path, model, list(model.parameters()), Dist())


def bad_records(world, tmp_path) -> Path:
    """The world's instruct records, one line each, with five bad ones among them."""
    records = json.loads(Path(world["instruct"]).read_text())
    good = records[0]
    conv = good["conversations"]
    bad = [
        {**good, "id": "null_value", "conversations": [conv[0], {"from": "gpt", "value": None}]},
        {"id": "no_image", "conversations": conv[:2]},
        {**good, "id": "image_list", "image": [good["image"]]},
        {**good, "id": "two_images", "conversations": [conv[0], conv[1], {**conv[0]}, conv[1]]},
        {**good, "id": "missing_file", "image": "nowhere.png"},
    ]
    path = tmp_path / "bad.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records[:10] + bad + records[10:]))
    return path


@pytest.mark.slow
def test_train_names_bad_records_before_any_work(world, base, tmp_path):
    data = bad_records(world, tmp_path)
    out = tmp_path / "out"
    # A mis-shaped tensor, which only loading the weights finds: the data is checked before the model loads
    # (the checkpoint's config, tokenizer and weight-file headers are all that is read first).
    broken = tmp_path / "base"
    shutil.copytree(base, broken)
    state = load_file(broken / "model.safetensors")
    state["projector.linears.0.weight"] = state["projector.linears.0.weight"][:, :-1].contiguous()
    save_file(state, broken / "model.safetensors")
    res = run(*stage2(world, broken, out, "--max_iters", "1", "--data", str(data)))
    assert res.returncode == 1
    line = last_line(res)
    assert f"4 bad record(s), first: {data}:11 (id 'null_value'): turn 1 has value None" in line
    assert f"{data}:12 (id 'no_image'): no 'image' but 1 <image>" in line
    assert f"{data}:13 (id 'image_list'): 'image' is [" in line
    assert "pass --skip_bad_records" in line
    assert f"1 bad image(s), first: {data}:15 (id 'missing_file'): image file not found" in line
    assert "--skip_bad_images" in line
    assert not (out / "checkpoints").exists() and not (out / "metrics.jsonl").exists()


@pytest.mark.slow
def test_train_skips_bad_records_when_asked_and_counts_them(world, base, tmp_path):
    data = bad_records(world, tmp_path)
    out = tmp_path / "out"
    res = run(*stage2(world, base, out, "--max_iters", "1", "--data", str(data), "--skip_bad_records",
                      "--skip_bad_images", "--max_len", "60"))
    assert res.returncode == 0, res.stdout + res.stderr
    result = json.loads((out / "eval.json").read_text())
    good = len(json.loads(Path(world["instruct"]).read_text()))
    assert result["records_read"] == good + 5 and result["records_skipped"] == 5
    assert result["skipped_reasons"] == {"bad record": 4, "bad image": 1}
    assert result["samples_truncated"] > 0  # every conversation is longer than 60 positions with its image
    assert "5 skipped" in res.stdout and "truncated to max_len 60" in res.stdout


@pytest.mark.slow
def test_train_refuses_samples_past_the_models_positions(world, base, tmp_path):
    records = json.loads(Path(world["instruct"]).read_text())
    long = {**records[0], "id": "long", "conversations": [records[0]["conversations"][0],
                                                          {"from": "gpt", "value": "very long answer " * 300}]}
    data = tmp_path / "long.json"
    data.write_text(json.dumps(records + [long]))
    res = run(*stage2(world, base, tmp_path / "out", "--max_iters", "1", "--data", str(data), "--max_len", "2048"))
    assert res.returncode == 1
    assert "longer than the model's max_seq_len 512" in last_line(res)
    assert f"{data}[{len(records)}] (id 'long')" in last_line(res) and "pass --max_len 512" in last_line(res)


# ----------------------------------------------------------------------------------------------- sample.py
@pytest.mark.slow
@pytest.mark.parametrize("flag,value", [("--batch_size", "-1"), ("--top_p", "0"), ("--device", "bogus")])
def test_sample_rejects_a_bad_flag_naming_it(flag, value):
    res = run("sample.py", "--prompt", "hi", flag, value)
    assert res.returncode == 2 and f"argument {flag}:" in last_line(res)


def questions_file(tmp_path, world, lines: list[dict]) -> Path:
    path = tmp_path / "q.jsonl"
    path.write_text("".join(json.dumps(q) + "\n" for q in lines))
    return path


def image_of(world) -> str:
    return json.loads(Path(world["vqa_test"]).read_text())[0]["image"]


@pytest.mark.slow
def test_sample_names_a_question_without_id_or_text(world, base, tmp_path):
    q = questions_file(tmp_path, world, [{"question_id": 1, "text": "what?"}, {"text": "no id"}])
    res = run("sample.py", "--model", str(base), "--questions", str(q), "--answers", str(tmp_path / "a.jsonl"))
    assert res.returncode == 1 and f"{q}:2: the question has no 'question_id'" in last_line(res)
    assert not (tmp_path / "a.jsonl").exists()


@pytest.mark.slow
def test_sample_refuses_answers_of_another_model(world, base, tmp_path):
    q = questions_file(tmp_path, world, [{"question_id": 1, "text": "what?"}])
    answers = tmp_path / "a.jsonl"
    answers.write_text(json.dumps({"question_id": 0, "text": "x", "model_id": "other-model"}) + "\n")
    before = answers.read_bytes()
    res = run("sample.py", "--model", str(base), "--questions", str(q), "--answers", str(answers))
    assert res.returncode == 1
    assert f"--answers {answers} holds answers of model 'other-model', not '{base.name}'" in last_line(res)
    assert answers.read_bytes() == before


@pytest.mark.slow
def test_sample_bad_image_stops_or_is_skipped(world, base, tmp_path):
    image = image_of(world)
    q = questions_file(tmp_path, world, [{"question_id": 1, "image": image, "text": "what?"},
                                         {"question_id": 2, "image": "missing.png", "text": "and here?"},
                                         {"question_id": 3, "image": image, "text": "again?"}])
    answers = tmp_path / "a.jsonl"
    common = ("sample.py", "--model", str(base), "--questions", str(q), "--image_folder", world["image_folder"],
              "--answers", str(answers), "--batch_size", "1", "--max_new_tokens", "4")
    res = run(*common)
    assert res.returncode == 1
    assert "missing.png" in last_line(res) and "--skip_bad_images" in last_line(res)
    assert [json.loads(x)["question_id"] for x in answers.read_text().splitlines()] == [1]  # kept
    res = run(*common, "--skip_bad_images")
    assert res.returncode == 0, res.stderr
    assert "skipped question 2" in res.stderr and "1 question(s) skipped" in res.stderr
    assert [json.loads(x)["question_id"] for x in answers.read_text().splitlines()] == [1, 3]


@pytest.mark.slow
def test_sample_chat_commands_are_checked(world, base):
    image = os.path.join(world["image_folder"], image_of(world))
    res = run("sample.py", "--model", str(base), "--chat", "--max_new_tokens", "4",
              stdin=f"/help\n/image\n/foo bar\n/image nowhere.png\n/image {image}\nwhat is it?\n/quit\n")
    assert res.returncode == 0, res.stderr
    out = res.stdout
    assert all(c in out for c in ("/image PATH", "/reset", "/help", "/quit"))
    assert "error: /image needs a path" in out
    assert "error: unknown command /foo; /help lists them" in out
    assert "error: image file not found: nowhere.png" in out
    assert out.count("assistant> ") == 1  # only the real question reached the model


@pytest.mark.slow
def test_sample_refuses_nan_weights(base, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(base, model, ignore=shutil.ignore_patterns("checkpoints", "metrics.jsonl"))
    weights = load_file(model / "model.safetensors")
    name = next(k for k in weights if "decoder.blocks.1" in k)
    weights[name][0, 0] = float("nan")
    save_file(weights, model / "model.safetensors", metadata={"format": "pt"})
    res = run("sample.py", "--model", str(model), "--prompt", "hi")
    assert res.returncode == 1
    assert f"{model}: weight {name} holds NaN or inf values" in last_line(res)


def test_huge_image_is_refused_or_bounded_naming_it(tmp_path):
    from minillavamed.data import MAX_IMAGE_PIXELS, ImageLoadError, ImageProcessor, load_image

    strip = tmp_path / "strip.png"
    Image.new("L", (60000, 20), 128).save(strip)  # 3.6 KB; its padded square would take 10 GB
    pixels = ImageProcessor(size=32, crop_size=32)(load_image(strip))
    assert pixels.shape == (3, 32, 32)
    big = tmp_path / "big.png"
    side = int(MAX_IMAGE_PIXELS ** 0.5) + 1
    Image.new("1", (side, side)).save(big)
    with pytest.raises(ImageLoadError, match=f"image {big} is {side}x{side} pixels"):
        load_image(big)
