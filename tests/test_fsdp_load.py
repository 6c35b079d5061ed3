"""train.py --fsdp from a checkpoint: the model is built on the meta device, sharded, and each process reads only
its own dim-0 shards of each tensor from the memory-mapped safetensors (checkpoint.fill_shards). Two gloo
processes; checked against the whole checkpoint loaded in one process, and against DDP's first loss."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import train
from minillavamed import LlavaMed
from minillavamed.synthetic_world import WorldConfig, generate_world
from minillavamed.curriculum import set_trainable

import hf_oracle as hf
from hf_oracle import llava_hf_checkpoint

ROOT = Path(__file__).resolve().parent.parent
WORLD = WorldConfig(seed=3, image_size=64, n_pmc=24, n_instruct=16, n_vqa_train=4, n_vqa_test=4, n_general=24)
COMMON = ["--micro_batch", "2", "--global_batch", "4", "--max_len", "384", "--log_interval", "1",
          "--eval_questions", "1", "--val_size", "4", "--seed", "5", "--max_iters", "1"]

# Each rank builds the models of CASES as train.py does under --fsdp and writes every parameter gathered whole,
# its dtype, and how many elements its own shards hold.
WORKER = textwrap.dedent("""
    import json, sys
    from pathlib import Path
    import torch, torch.distributed as dist
    import train
    from minillavamed.checkpoint import read_config

    cases, out = json.loads(sys.argv[1]), Path(sys.argv[2])
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    result = {}
    for name, src, tower, stage, dtype in cases:
        torch.manual_seed(0)  # the fresh projector of a bare LLM + CLIP
        cfg = train.TrainConfig(stage=stage, init_from=src, vision_tower=tower, fsdp=True, device="cpu", dtype=dtype,
                                attn="sdpa")
        model = train.build_model(cfg, read_config(src, vision_tower=tower or None), Path(src))
        model, _ = train.parallelize(model, cfg, train.Dist(rank, 2, rank), torch.device("cpu"), Path(src))
        local = sum(p.to_local().numel() for p in model.parameters())
        result[name] = ({n: p.full_tensor() for n, p in model.named_parameters()}, local)
    torch.save(result, out / f"rank{rank}.pt")
    dist.barrier()
    dist.destroy_process_group()
""")


def torchrun(nproc, argv, cwd):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port",
           str(29700 + os.getpid() % 1000), *argv]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=600, env=env)
    # gloo sometimes aborts at process-group teardown, after all work is written; judge by the outputs.
    if proc.returncode != 0 and "terminate called without an active exception" not in proc.stderr:
        raise AssertionError(proc.stdout[-3000:] + proc.stderr[-3000:])
    return proc


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return generate_world(tmp_path_factory.mktemp("world"), WORLD)


def args(world, stage, out, *extra):
    data = {0: "general", 2: "instruct"}[stage]
    return ["--stage", str(stage), "--data", world[data], "--image_folder", world["image_folder"],
            "--eval_data", world["vqa_test"], "--out_dir", str(out), *COMMON, *extra]


@pytest.fixture(scope="module")
def sharded(world, tmp_path_factory):
    """A stage-0 model in our format, written as several safetensors shards with an index, so that filling
    moves from file to file."""
    base = tmp_path_factory.mktemp("stage0")
    assert train.main(args(world, 0, base)) == 0
    out = tmp_path_factory.mktemp("sharded")
    LlavaMed.from_pretrained(base).save_pretrained(out, max_shard_bytes=4 * 2**20)
    shutil.copy(base / "tokenizer.model", out / "tokenizer.model")
    assert len(list(out.glob("model-*.safetensors"))) > 1
    return out


def test_each_process_fills_its_shards_to_the_whole_load(sharded, tmp_path):
    llava_hf_checkpoint(tmp_path, "hf")  # their layout: our fused qkv / gate_up rows come from their separate keys
    hf.mistral().save_pretrained(tmp_path / "mistral")  # a bare LLM + CLIP: the projector starts fresh
    hf.clip().save_pretrained(tmp_path / "clip")
    ours, clip = str(sharded), str(tmp_path / "clip")
    cases = [("ours-1-bf16", ours, "", 1, "bfloat16"), ("ours-2-bf16", ours, "", 2, "bfloat16"),
             ("ours-2-fp32", ours, "", 2, "float32"), ("hf-2-bf16", str(tmp_path / "hf"), "", 2, "bfloat16"),
             ("bare-1-bf16", str(tmp_path / "mistral"), clip, 1, "bfloat16")]
    (tmp_path / "worker.py").write_text(WORKER)
    torchrun(2, [str(tmp_path / "worker.py"), json.dumps(cases), str(tmp_path)], ROOT)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    for name, src, tower, stage, dtype in cases:
        torch.manual_seed(0)
        whole = LlavaMed.from_pretrained(src, vision_tower=tower or None)  # fp32, every tensor read in one process
        set_trainable(whole, stage)
        expected = dict(whole.named_parameters())
        for r in range(2):
            got, local = ranks[r][name]
            assert got.keys() == expected.keys()
            for key, want in expected.items():
                # What trains is the optimizer's fp32 master copy; under bf16 the frozen parts are bf16.
                kind = torch.float32 if want.requires_grad or dtype == "float32" else torch.bfloat16
                assert got[key].dtype == kind, (name, key)
                assert torch.equal(got[key], want.detach().to(kind)), (name, key)
            total = sum(p.numel() for p in expected.values())
            assert local < 0.55 * total, (name, r, local, total)  # each process holds about half


@pytest.mark.slow
def test_a_stage2_fsdp_step_has_ddps_first_loss(world, sharded, tmp_path):
    fsdp, ddp = tmp_path / "fsdp", tmp_path / "ddp"
    torchrun(2, ["train.py", *args(world, 2, fsdp, "--init_from", str(sharded), "--fsdp")], ROOT)
    torchrun(2, ["train.py", *args(world, 2, ddp, "--init_from", str(sharded))], ROOT)
    loss = [json.loads((out / "metrics.jsonl").read_text().splitlines()[0])["loss"] for out in (fsdp, ddp)]
    assert loss[0] == loss[1]
