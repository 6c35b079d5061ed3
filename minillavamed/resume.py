"""Nothing lost when a training run is killed: its checkpoints, and resuming from the latest one.

Not part of the paper (LLaVA-Med's stages run in hours on 8 GPUs), but what a long job on shared machines
needs: every save is written aside and renamed, so a kill mid-save leaves the previous checkpoint whole; the
optimizer, the RNGs and the place in the data are saved beside the weights, so `--resume` continues the run
where it stopped; a run checks its disk space before it starts. `cfg` is train.py's TrainConfig throughout.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import shutil
import signal
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError

from minillavamed.checkpoint import save_state
from minillavamed.distributed import Dist, all_sum, barrier, raw
from minillavamed.tokenizer import Tokenizer


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def full_states(model, optimizer, cfg):
    """Model and optimizer state dicts, gathered whole onto rank 0 under FSDP."""
    if cfg.fsdp:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

        return get_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return raw(model).state_dict(), optimizer.state_dict()


def save_checkpoint(out: Path, it: int, model, optimizer, cfg, d: Dist, tokenizer: Tokenizer,
                    position: dict) -> None:
    """checkpoints/step-N written to a temp dir and renamed (a killed save leaves the previous ones whole),
    then the model files at the top of out_dir replaced one by one, so that out_dir always loads. A failed
    write (a full disk, a quota) removes what it left and stops the run naming the file and the reason; the
    previous checkpoint and the top-level model stay loadable."""
    model_state, optim_state = full_states(model, optimizer, cfg)
    failure = None
    if d.master:
        ckpts = out / "checkpoints"
        tmp, final = ckpts / f".tmp-step-{it:07d}", ckpts / f"step-{it:07d}"
        writing = tmp
        try:
            shutil.rmtree(tmp, ignore_errors=True)
            save_state(raw(model).cfg, model_state, tmp)
            writing = tmp / "tokenizer.model"
            tokenizer.save_pretrained(tmp)  # with added_tokens.json / tokenizer_config.json where it has them
            writing = tmp / "train_config.json"
            writing.write_text(json.dumps(dataclasses.asdict(cfg), indent=2))
            writing = tmp / "train_state.pt"
            torch.save({"iter": it, "optimizer": optim_state, "rng": rng_state(), "position": position,
                        "train_config": dataclasses.asdict(cfg)}, writing)
            shutil.rmtree(final, ignore_errors=True)
            writing = final
            tmp.rename(final)
            for f in sorted(final.iterdir(), key=lambda f: f.name == "config.json"):  # weights first
                if f.name not in ("train_state.pt", "train_config.json"):
                    writing = out / f".{f.name}.tmp"
                    shutil.copy(f, writing)
                    os.replace(writing, out / f.name)
        except (OSError, RuntimeError, SafetensorError) as e:  # torch.save: a full disk is a RuntimeError
            shutil.rmtree(tmp, ignore_errors=True)
            for stray in out.glob(".*.tmp"):
                stray.unlink(missing_ok=True)
            reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e).strip().splitlines()[0]
            free = shutil.disk_usage(out).free / 1e9
            previous = latest_checkpoint(out)
            failure = (f"saving the checkpoint of iter {it} failed writing {writing}: {reason} ({free:.2f} GB free "
                       f"in {out}); {previous or 'no earlier checkpoint'} and the model at the top of {out} are "
                       "as before; free space, then continue with --resume")
        else:
            for old in sorted(ckpts.glob("step-*"))[: -cfg.keep_last]:
                shutil.rmtree(old)
    failed = torch.tensor(float(failure is not None), device=next(raw(model).parameters()).device)
    if all_sum(failed, d).item():
        raise SystemExit(failure or "saving a checkpoint failed on rank 0; see its message")
    barrier(d)


def latest_checkpoint(out: Path) -> Path | None:
    steps = sorted((out / "checkpoints").glob("step-*"))
    return steps[-1] if steps else None


# What --resume must share with the run it continues: the data, the model it started from and the
# optimization. Lengths (max_iters, epochs), intervals, devices and kernels may change.
RESUME_KEYS = ("stage", "data", "image_folder", "init_from", "vision_tower", "preset", "conv", "lr",
               "min_lr_ratio", "weight_decay", "warmup_ratio", "global_batch", "max_len", "grad_clip", "val_size",
               "train_records", "seed")
PATH_KEYS = ("data", "image_folder", "init_from", "vision_tower")


def check_resume(cfg, checkpoint: Path | None) -> None:
    """--resume continues a checkpoint of this configuration only (RESUME_KEYS), naming what differs."""
    if checkpoint is None:
        return
    if (checkpoint / "train_config.json").exists():
        saved = json.loads((checkpoint / "train_config.json").read_text())
    else:  # checkpoints written before train_config.json was saved beside the weights
        saved = torch.load(checkpoint / "train_state.pt", map_location="cpu", weights_only=False,
                           mmap=True).get("train_config", {})
    now = dataclasses.asdict(cfg)

    def same(k):
        a, b = saved.get(k, now[k]), now[k]
        if k in PATH_KEYS and a and b:
            return os.path.realpath(a) == os.path.realpath(b)
        return a == b

    diffs = [f"--{k} {saved[k]!r} there, {now[k]!r} now" for k in RESUME_KEYS if not same(k)]
    if diffs:
        raise SystemExit(f"--resume: {checkpoint} belongs to another configuration ({'; '.join(diffs)}); resume "
                         "with its settings, or start fresh with --move_aside or another --out_dir")


def checkpoint_bytes(model, trainable) -> int:
    """Disk one save needs before the old checkpoint is pruned: the weights twice (checkpoints/step-N and the
    copy at the top of out_dir) and AdamW's two moments of every trainable parameter."""
    weights = sum(p.numel() * p.element_size() for p in raw(model).state_dict().values())
    return 2 * weights + 2 * sum(p.numel() * p.element_size() for p in trainable)


def check_free_space(out: Path, model, trainable, d: Dist) -> None:
    """Stop before training if out_dir cannot hold one more checkpoint."""
    if not d.master:
        return
    need, free = checkpoint_bytes(model, trainable), shutil.disk_usage(out).free
    if free < need:
        raise SystemExit(f"--out_dir {out}: {free / 1e9:.2f} GB free, but one checkpoint needs about "
                         f"{need / 1e9:.2f} GB (the weights twice and the optimizer state); free space or choose "
                         "another --out_dir")


@contextmanager
def stop_signals():
    """A list that SIGTERM / SIGINT append to while training runs; the previous handlers come back after."""
    caught: list[int] = []
    previous = {sig: signal.signal(sig, lambda s, _f: caught.append(s)) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield caught
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def restore(resume_from: Path | None, model, optimizer, cfg, log) -> tuple[int, dict]:
    """(iteration, data position) to start from: the checkpoint's optimizer, RNG and place in the data."""
    if resume_from is None:
        return 0, {"epoch": 0, "step": 0}
    state = torch.load(resume_from / "train_state.pt", map_location="cpu", weights_only=False)
    if cfg.fsdp:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        set_optimizer_state_dict(model, optimizer, state["optimizer"], options=StateDictOptions(full_state_dict=True))
    else:
        optimizer.load_state_dict(state["optimizer"])
    set_rng_state(state["rng"])
    log(f"resumed from {resume_from} at iter {state['iter']}")
    return state["iter"], state["position"]
