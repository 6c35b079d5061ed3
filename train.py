"""The LLaVA-Med curriculum (paper §4.1, Fig. 3), one stage per run.

  stage 0  general-domain base (tiny preset only): everything trains on everyday images and text;
           it stands in for the general LLaVA that LLaVA-Med starts from.
  stage 1  biomedical concept alignment: figure-caption pairs, `plain` template; only the projector trains.
  stage 2  instruction tuning: GPT-4-written conversations; projector + language model train.
  stage 3  VQA fine-tuning (VQA-RAD, SLAKE, PathVQA): as stage 2, on question-answer data.

Each stage starts from the previous stage's output. With no --data, the tiny preset runs on the synthetic
world (generated on first use in data/synthetic). One process:  python train.py --stage 1
Many:  torchrun --nproc_per_node 8 train.py --stage 2 --data ... --fsdp
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import random
import shutil
import signal
import sys
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from minillavamed import LlavaMed
from minillavamed.checkpoint import save_state
from minillavamed.config import IMAGE_TOKEN_INDEX, preset
from minillavamed.conversation import get_template, render
from minillavamed.data import (ConversationDataset, ImageProcessor, collate, image_positions, load_records,
                               questions_from_vqa)
from minillavamed.evaluation import score_vqa
from minillavamed.inference import Assistant, answer_questions
from minillavamed.tokenizer import Tokenizer, train_tokenizer

# Paper recipe (LLaVA-Med v1 scripts) per stage; "tiny" where the paper's numbers don't fit a CPU run.
STAGES = {
    0: dict(epochs=1.0, lr=1e-3, global_batch=128, conv="mistral_instruct"),
    1: dict(epochs=1.0, lr=2e-3, global_batch=128, conv="plain"),
    2: dict(epochs=3.0, lr=2e-5, global_batch=128, conv=None),
    3: dict(epochs=3.0, lr=2e-5, global_batch=128, conv=None),
}
TINY_STAGES = {
    # From scratch, a higher rate lets the decoder fit the text prior before it learns to look at the
    # image, and then no gradient reaches the vision tower: 5e-4 keeps the image in play.
    0: dict(epochs=4.0, lr=5e-4, global_batch=32),
    1: dict(epochs=2.0, lr=2e-3, global_batch=32),
    2: dict(epochs=10.0, lr=1e-3, global_batch=32),
    3: dict(epochs=3.0, lr=1e-4, global_batch=32),
}
for _stage in TINY_STAGES.values():
    _stage.update(max_len=256, micro_batch=16)
for _stage in STAGES.values():
    _stage.update(max_len=2048, micro_batch=16)
WORLD = Path("data/synthetic")
PEAK_TFLOPS = {"A100": 312.0, "H100": 989.0, "H200": 989.0, "L40S": 362.0, "A10G": 125.0}  # dense bf16


@dataclass
class TrainConfig:
    stage: int = 1
    out_dir: str = ""  # default: out/tiny/stage{N} on the synthetic world
    init_from: str = ""  # checkpoint dir (any layout LlavaMed reads); default: the previous stage's out_dir
    vision_tower: str = ""  # CLIP checkpoint for layouts that don't hold one
    preset: str = "tiny"  # the architecture stage 0 builds from scratch
    data: str = ""  # LLaVA-Med JSON/JSONL; default: the synthetic world's file for the stage
    image_folder: str = ""
    eval_data: str = ""  # VQA file for the periodic closed/open evaluation; default: synthetic vqa_test
    conv: str = ""  # conversation template; default: plain in stage 1, the model's own otherwise
    epochs: float = 0.0  # 0: the stage's default
    max_iters: int = 0  # 0: epochs x dataset / global batch
    lr: float = 0.0
    min_lr_ratio: float = 0.0  # cosine decays to lr x this (HF's cosine schedule: 0)
    weight_decay: float = 0.0
    warmup_ratio: float = 0.03
    global_batch: int = 0
    micro_batch: int = 0  # 0: the stage's default
    max_len: int = 0
    grad_clip: float = 1.0
    val_size: int = 64  # records held out of --data for the validation loss
    eval_questions: int = 0  # VQA questions per evaluation (0: all)
    log_interval: int = 10
    eval_interval: int = 0  # 0: only at the end
    ckpt_interval: int = 100
    keep_last: int = 2
    seed: int = 1337
    device: str = ""  # default: cuda if available, else cpu
    dtype: str = ""  # bfloat16 | float32; default: bfloat16 on GPUs, float32 on CPUs
    attn: str = ""  # naive | sdpa | triton; default: triton on GPUs, sdpa on CPUs
    compile: bool = False
    grad_ckpt: bool = False
    fsdp: bool = False
    pack: bool = False
    peak_tflops: float = 0.0  # for MFU; default from the GPU's name
    num_workers: int = 0
    skip_bad_images: bool = False
    resume: bool = False


def parse_args(argv=None) -> TrainConfig:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for f in dataclasses.fields(TrainConfig):
        if f.type == "bool":
            p.add_argument(f"--{f.name}", action="store_true")
        else:
            kind = {"int": int, "float": float, "str": str}[f.type]
            p.add_argument(f"--{f.name}", type=kind, default=f.default)
    cfg = TrainConfig(**vars(p.parse_args(argv)))
    if cfg.stage not in STAGES:
        p.error(f"--stage must be one of {sorted(STAGES)}")
    return cfg


# ------------------------------------------------------------------------------------------- the stages
def fill_defaults(cfg: TrainConfig) -> TrainConfig:
    """Stage defaults, the synthetic world when no data is given, and the chain of stage directories."""
    synthetic = not cfg.data
    table = {**STAGES[cfg.stage], **(TINY_STAGES[cfg.stage] if synthetic else {})}
    for key in ("epochs", "lr", "global_batch", "micro_batch", "max_len"):
        if not getattr(cfg, key):
            setattr(cfg, key, table[key])
    if synthetic:
        cfg.out_dir = cfg.out_dir or f"out/tiny/stage{cfg.stage}"
        if cfg.stage > 0 and not cfg.init_from:
            cfg.init_from = f"out/tiny/stage{cfg.stage - 1 if cfg.stage < 3 else 2}"
    elif not cfg.out_dir:
        raise SystemExit("--out_dir is required with --data")
    if cfg.stage > 0 and not cfg.init_from:
        raise SystemExit("--init_from is required: the checkpoint this stage starts from")
    if cfg.init_from and not Path(cfg.init_from).is_dir():
        raise SystemExit(f"--init_from {cfg.init_from}: no such checkpoint; run the previous stage first")
    cfg.conv = cfg.conv or (STAGES[cfg.stage]["conv"] or "")
    cuda = torch.cuda.is_available()
    cfg.device = cfg.device or ("cuda" if cuda else "cpu")
    cfg.dtype = cfg.dtype or ("bfloat16" if cfg.device.startswith("cuda") else "float32")
    cfg.attn = cfg.attn or ("triton" if cfg.device.startswith("cuda") else "sdpa")
    return cfg


def synthetic_paths(stage: int) -> tuple[dict, str]:
    from minillavamed.synthetic import generate_world

    paths = generate_world(WORLD)
    data = {0: [paths["general"], paths["text"]], 1: [paths["alignment"]], 2: [paths["instruct"]],
            3: [paths["vqa_train"]]}[stage]
    return paths, data


def set_trainable(model: LlavaMed, stage: int) -> None:
    """Which parts learn in each stage (paper §4.1); the vision tower is frozen after stage 0."""
    model.requires_grad_(False)
    parts = {0: [model.vision, model.projector, model.decoder], 1: [model.projector]}.get(
        stage, [model.projector, model.decoder])
    for part in parts:
        part.requires_grad_(True)
    if stage == 0:  # blocks past the selected layer never reach the output
        model.vision.blocks[model.vision.n_run:].requires_grad_(False)
        model.vision.post_norm.requires_grad_(False)


def lr_at(it: int, cfg: TrainConfig, total: int) -> float:
    """Linear warmup over warmup_ratio of the run, then cosine decay (LLaVA's schedule)."""
    warmup = math.ceil(cfg.warmup_ratio * total)
    if it < warmup:
        return cfg.lr * (it + 1) / warmup
    progress = (it - warmup) / max(1, total - warmup)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def flops_per_step(model: LlavaMed, stage: int, text_tokens: int, images: int, seq_len: int) -> float:
    """Model FLOPs of one optimizer step: 2 per MAC forward, 2x more backward for what trains (weights and
    inputs), 1x more for frozen parts that gradients pass through (inputs only), none for frozen parts
    upstream of everything that trains (stage >= 1's vision tower). Attention counted without causal savings."""
    v, d = model.cfg.vision, model.cfg.decoder
    dec_params = sum(p.numel() for n, p in model.decoder.named_parameters() if not n.startswith("embed"))
    vis_params = sum(p.numel() for b in model.vision.blocks[: model.vision.n_run] for p in b.parameters())
    proj_params = sum(p.numel() for p in model.projector.parameters())
    dec_factor = 3 if stage != 1 else 2
    vis_factor = 3 if stage == 0 else 1
    tokens = text_tokens + images * v.num_patches
    decoder = dec_factor * (2 * dec_params * tokens + 4 * d.layers * d.dim * seq_len * tokens)
    vision = vis_factor * images * (2 * vis_params * (v.num_patches + 1) + 4 * model.vision.n_run * v.width *
                                    (v.num_patches + 1) ** 2)
    return decoder + vision + 3 * 2 * proj_params * images * v.num_patches


# ------------------------------------------------------------------------------------------- processes
@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def master(self) -> bool:
        return self.rank == 0


def setup_distributed(cfg: TrainConfig) -> Dist:
    if "RANK" not in os.environ:
        return Dist()
    d = Dist(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"]))
    if cfg.device.startswith("cuda"):
        cfg.device = f"cuda:{d.local_rank}"
        torch.cuda.set_device(cfg.device)
    dist.init_process_group("nccl" if cfg.device.startswith("cuda") else "gloo")
    return d


def barrier(d: Dist) -> None:
    if d.world > 1:
        dist.barrier()


def all_mean(x: float, d: Dist, device) -> float:
    if d.world == 1:
        return x
    t = torch.tensor([x], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.item() / d.world


# ------------------------------------------------------------------------------------------ checkpoints
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


def full_states(model, optimizer, cfg: TrainConfig):
    """Model and optimizer state dicts, gathered whole onto rank 0 under FSDP."""
    if cfg.fsdp:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

        return get_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return raw(model).state_dict(), optimizer.state_dict()


def save_checkpoint(out: Path, it: int, model, optimizer, cfg: TrainConfig, d: Dist, tokenizer_file: Path,
                    position: dict) -> None:
    """checkpoints/step-N written to a temp dir and renamed (a killed save leaves the previous ones whole),
    then the model files at the top of out_dir replaced one by one, so that out_dir always loads."""
    model_state, optim_state = full_states(model, optimizer, cfg)
    if d.master:
        ckpts = out / "checkpoints"
        tmp, final = ckpts / f".tmp-step-{it:07d}", ckpts / f"step-{it:07d}"
        shutil.rmtree(tmp, ignore_errors=True)
        save_state(raw(model).cfg, model_state, tmp)
        shutil.copy(tokenizer_file, tmp / "tokenizer.model")
        torch.save({"iter": it, "optimizer": optim_state, "rng": rng_state(), "position": position,
                    "train_config": dataclasses.asdict(cfg)}, tmp / "train_state.pt")
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        for f in sorted(final.iterdir(), key=lambda f: f.name == "config.json"):  # weights first
            if f.name != "train_state.pt":
                shutil.copy(f, out / f".{f.name}.tmp")
                os.replace(out / f".{f.name}.tmp", out / f.name)
        for old in sorted(ckpts.glob("step-*"))[: -cfg.keep_last]:
            shutil.rmtree(old)
    barrier(d)


def latest_checkpoint(out: Path) -> Path | None:
    steps = sorted((out / "checkpoints").glob("step-*"))
    return steps[-1] if steps else None


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


def raw(model):
    return model.module if hasattr(model, "module") else model


# ------------------------------------------------------------------------------------------------ data
def micro_batches(n: int, cfg: TrainConfig, d: Dist, accum: int, epoch: int, start: int):
    """Index lists for this rank: a seeded permutation per epoch, cut into global batches; micro-batch j of
    rank r takes slice j * world + r, so the same samples meet in the same micro-batches whatever the
    number of processes."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(cfg.seed + epoch)).tolist()
    steps = n // cfg.global_batch
    for step in range(start, steps):
        batch = order[step * cfg.global_batch:(step + 1) * cfg.global_batch]
        for j in range(accum):
            k = j * d.world + d.rank
            yield step, batch[k * cfg.micro_batch:(k + 1) * cfg.micro_batch]


def build_dataset(records, cfg, template, tokenizer, processor, model_cfg, image_folder, source):
    return ConversationDataset(records, image_folder, template, tokenizer, processor, cfg.max_len,
                               image_positions(model_cfg.vision), skip_bad_images=cfg.skip_bad_images, source=source)


# ------------------------------------------------------------------------------------------------ main
def main(argv=None) -> int:
    cfg = fill_defaults(parse_args(argv))
    d = setup_distributed(cfg)
    device = torch.device(cfg.device)
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    out = Path(cfg.out_dir)
    log = print if d.master else (lambda *a, **k: None)

    # ---- data files ----
    world = None
    if cfg.data:
        files, image_folder = [cfg.data], cfg.image_folder or None
    else:
        if d.master:
            synthetic_paths(cfg.stage)
        barrier(d)
        world, files = synthetic_paths(cfg.stage)
        image_folder = world["image_folder"]
    eval_file = cfg.eval_data or (world["vqa_test"] if world else "")

    # ---- model and tokenizer ----
    resume_from = latest_checkpoint(out) if cfg.resume else None
    if cfg.resume and resume_from is None:
        log(f"--resume: no checkpoint in {out}/checkpoints; starting fresh")
    source = resume_from or (Path(cfg.init_from) if cfg.init_from else None)
    records = [r for f in files for r in load_records(f)]
    if source is None:  # stage 0 from scratch: a tokenizer trained on the world's text, then a random model
        tok_dir = out / "tokenizer"
        mcfg = preset(cfg.preset)
        if d.master and not (tok_dir / "tokenizer.model").exists():
            # Rendered conversations, so that the template's own markers ([INST] ...) become pieces too.
            chat = get_template(cfg.conv or mcfg.conv_template)
            texts = [render(chat, r["conversations"]).replace("<image>", "") for r in records]
            texts += [r["fig_caption"] for r in load_records(world["pmc"])] if world else []
            train_tokenizer(texts, tok_dir, mcfg.decoder.vocab_size)
        barrier(d)
        tokenizer_file = tok_dir / "tokenizer.model"
        tokenizer = Tokenizer(tokenizer_file)
        mcfg.decoder.vocab_size = tokenizer.vocab_size
        mcfg.decoder.bos_id, mcfg.decoder.eos_id = tokenizer.bos_id, tokenizer.eos_id
        mcfg.decoder.pad_id = tokenizer.pad_id
        model = LlavaMed(mcfg)
    else:
        tokenizer_file = source / "tokenizer.model"
        if not tokenizer_file.exists():
            raise SystemExit(f"{tokenizer_file}: missing; the checkpoint needs its SentencePiece tokenizer")
        tokenizer = Tokenizer(tokenizer_file)
        model = LlavaMed.from_pretrained(source, vision_tower=cfg.vision_tower or None)
    if cfg.stage != 1 and cfg.conv:  # stage 1's plain template is for alignment only, never the model's
        model.cfg.conv_template = cfg.conv  # the chat format this model is tuned to, saved with it
    template = get_template(cfg.conv or model.cfg.conv_template)
    model.set_attention_backend(cfg.attn)
    model.decoder.checkpointing = cfg.grad_ckpt
    set_trainable(model, cfg.stage)
    model.to(device)
    processor = ImageProcessor.for_model(model.cfg.vision.image_size, model.cfg.image_aspect_ratio)

    if len(records) <= cfg.val_size:
        raise SystemExit(f"{files}: {len(records)} records, not enough to hold out {cfg.val_size} for validation")
    # The validation records are a fixed random sample, the same in every run with this seed.
    held = set(torch.randperm(len(records), generator=torch.Generator().manual_seed(cfg.seed))[: cfg.val_size].tolist())
    train_set = build_dataset([r for i, r in enumerate(records) if i not in held], cfg, template, tokenizer,
                              processor, model.cfg, image_folder, ",".join(files))
    val_set = build_dataset([records[i] for i in sorted(held)], cfg, template, tokenizer, processor, model.cfg,
                            image_folder, ",".join(files))
    for name, ds in (("train", train_set), ("val", val_set)):
        if ds.dropped:
            log(f"{name}: dropped {dict(ds.dropped)}")

    per_step = cfg.micro_batch * d.world
    if cfg.global_batch % per_step:
        raise SystemExit(f"global batch {cfg.global_batch} is not a multiple of micro_batch x processes = {per_step}")
    accum = cfg.global_batch // per_step
    steps_per_epoch = len(train_set) // cfg.global_batch
    if steps_per_epoch == 0:
        raise SystemExit(f"{len(train_set)} training samples: fewer than one global batch of {cfg.global_batch}")
    max_iters = cfg.max_iters or math.ceil(cfg.epochs * steps_per_epoch)

    # ---- optimizer, parallelism ----
    if cfg.fsdp:
        from torch.distributed.fsdp import fully_shard

        for block in model.decoder.blocks:
            fully_shard(block)
        fully_shard(model)
        ddp_model = model
    elif d.world > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP

        # Stage 0 mixes text-only and image samples: some micro-batches never touch the vision tower.
        ddp_model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None,
                        find_unused_parameters=cfg.stage == 0)
    else:
        ddp_model = model
    trainable = [p for p in model.parameters() if p.requires_grad]  # after sharding: FSDP swaps parameters
    optimizer = torch.optim.AdamW(trainable, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.999),
                                  eps=1e-8, foreach=device.type == "cuda")
    forward = torch.compile(ddp_model) if cfg.compile else ddp_model
    it, position = 0, {"epoch": 0, "step": 0}
    if resume_from is not None:
        state = torch.load(resume_from / "train_state.pt", map_location="cpu", weights_only=False)
        if cfg.fsdp:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

            set_optimizer_state_dict(model, optimizer, state["optimizer"],
                                     options=StateDictOptions(full_state_dict=True))
        else:
            optimizer.load_state_dict(state["optimizer"])
        it, position = state["iter"], state["position"]
        set_rng_state(state["rng"])
        log(f"resumed from {resume_from} at iter {it}")
    autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if cfg.dtype == "bfloat16" else nullcontext())
    peak = cfg.peak_tflops or next((v for k, v in PEAK_TFLOPS.items()
                                    if device.type == "cuda" and k in torch.cuda.get_device_name(device)), 0.0)

    if d.master:
        out.mkdir(parents=True, exist_ok=True)
        (out / "train_config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=2))
        metrics_path = out / "metrics.jsonl"
        if metrics_path.exists():  # drop lines past the resumed iteration, so none are repeated
            kept = [line for line in metrics_path.read_text().splitlines() if json.loads(line)["iter"] <= it]
            metrics_path.write_text("".join(line + "\n" for line in kept))
        metrics = open(metrics_path, "a")
    trainable_n = sum(p.numel() for p in trainable)
    log(f"stage {cfg.stage}: {len(train_set)} samples, {max_iters} iters of {cfg.global_batch} "
        f"({accum} x {cfg.micro_batch} x {d.world} procs), {trainable_n / 1e6:.2f}M trainable of "
        f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f}M, template {template.name}, {cfg.device} {cfg.dtype}")

    eval_gt = load_records(eval_file)[: cfg.eval_questions or None] if eval_file else []
    with stop_signals() as stop_signal:

        def evaluate() -> dict:
            """Validation loss (all ranks, each on its slice) and VQA scores (rank 0; every rank under FSDP)."""
            ddp_model.eval()
            losses = []
            with torch.no_grad(), autocast:
                for k in range(d.rank * cfg.micro_batch, len(val_set), cfg.micro_batch * d.world):
                    rows = range(k, min(k + cfg.micro_batch, len(val_set)))
                    b = collate([val_set[i] for i in rows], tokenizer.pad_id)
                    if b is not None:
                        losses.append(float(ddp_model(**to_device(b, device))[1]))
            result = {"iter": it, "val_loss": all_mean(sum(losses) / max(1, len(losses)), d, device)}
            if eval_gt and (d.master or cfg.fsdp):
                assistant = Assistant.for_model(raw(model), tokenizer)
                if cfg.fsdp:  # generate() calls submodules directly, so gather the root's shards by hand
                    model.unshard()
                with autocast:
                    answers = answer_questions(assistant, questions_from_vqa(eval_gt), image_folder, batch_size=32,
                                               max_new_tokens=32)
                if cfg.fsdp:
                    model.reshard()
                scores = score_vqa(eval_gt, {str(r["id"]): a for r, a in zip(eval_gt, answers)})["scores"]
                closed, opened = scores.get("CLOSED", {}), scores.get("OPEN", {})
                result.update(closed_accuracy=(closed.get("closed_accuracy") or 0) / 100,
                              open_recall=(opened.get("open_recall") or 0) / 100, n_questions=len(eval_gt))
                if d.master:
                    (out / "eval.json").write_text(json.dumps(result, indent=2))
            barrier(d)
            ddp_model.train()
            return result

        # ---- the loop ----
        ddp_model.train()
        epoch, start = position["epoch"], position["step"]
        batches = iter(())
        t_start, steps_timed = time.perf_counter(), 0
        while it < max_iters:
            t0 = time.perf_counter()
            loss_sum, padded, text_tokens, images = 0.0, 0, 0, 0
            for j in range(accum):
                nxt = next(batches, None)
                if nxt is None:  # epoch boundary (or first pass)
                    if start >= steps_per_epoch:
                        epoch, start = epoch + 1, 0
                    batches = (
                        (s, collate([train_set[i] for i in idx], tokenizer.pad_id, cfg.pack,
                                    image_positions(model.cfg.vision)))
                        for s, idx in micro_batches(len(train_set), cfg, d, accum, epoch, start))
                    nxt = next(batches)
                step_in_epoch, batch = nxt
                # Gradients are reduced across processes once per optimizer step, after the last micro-batch.
                last = j == accum - 1
                if cfg.fsdp:
                    model.set_requires_gradient_sync(last)
                with (nullcontext() if last or not hasattr(ddp_model, "no_sync") else ddp_model.no_sync()), autocast:
                    if batch is None:  # every image of this micro-batch was unreadable and skipped
                        loss = sum((p * 0).sum() for p in trainable)
                    else:
                        n_text, n_img, n_pad = count_tokens(batch, image_positions(model.cfg.vision))
                        text_tokens, images, padded = text_tokens + n_text, images + n_img, padded + n_pad
                        _, loss = forward(**to_device(batch, device))
                (loss / accum).backward()
                loss_sum += float(loss.detach()) / accum
            start = step_in_epoch + 1
            grad_norm = torch.nn.utils.clip_grad_norm_(trainable, cfg.grad_clip)
            if hasattr(grad_norm, "full_tensor"):  # a DTensor under FSDP
                grad_norm = grad_norm.full_tensor()
            loss_avg = all_mean(loss_sum, d, device)
            if not math.isfinite(loss_avg) or not torch.isfinite(grad_norm):
                last = latest_checkpoint(out)
                log(f"error: loss {loss_avg} / grad norm {float(grad_norm)} at iter {it} is not finite; stopping. "
                    f"The last good checkpoint is {last or 'none (no checkpoint was written yet)'}.")
                return 1
            for group in optimizer.param_groups:
                group["lr"] = lr_at(it, cfg, max_iters)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            it += 1
            dt = time.perf_counter() - t0
            steps_timed += 1

            if it % cfg.log_interval == 0 or it == max_iters:
                real = text_tokens + images * image_positions(model.cfg.vision)
                seq = real / max(1, cfg.micro_batch * accum)
                tps = all_mean(real, d, device) * d.world / dt
                flops = flops_per_step(raw(model), cfg.stage, text_tokens, images, int(seq)) * d.world / dt
                mfu = flops / (peak * 1e12) if peak else None
                eta = (time.perf_counter() - t_start) / steps_timed * (max_iters - it)
                row = {"iter": it, "loss": loss_avg, "lr": optimizer.param_groups[0]["lr"],
                       "grad_norm": float(grad_norm),
                       "tokens_per_s": tps, "pad_frac": padded / max(1, padded + real), "mfu": mfu, "epoch": epoch}
                log(f"iter {it}/{max_iters} loss {loss_avg:.4f} lr {row['lr']:.2e} gnorm {row['grad_norm']:.2f} "
                    f"{tps:,.0f} tok/s pad {row['pad_frac']:.0%}" + (f" mfu {mfu:.1%}" if mfu is not None else "")
                    + f" eta {eta / 60:.1f}m")
                if d.master:
                    metrics.write(json.dumps(row) + "\n")
                    metrics.flush()

            position = {"epoch": epoch, "step": start}
            stopping = bool(all_mean(float(bool(stop_signal)), d, device))
            if cfg.eval_interval and it % cfg.eval_interval == 0 and it < max_iters:
                result = evaluate()
                log(f"eval {json.dumps(result)}")
            if it % cfg.ckpt_interval == 0 or it == max_iters or stopping:
                save_checkpoint(out, it, ddp_model, optimizer, cfg, d, tokenizer_file, position)
            if stopping:
                log(f"interrupted at iter {it}: checkpoint saved in {out}; continue with --resume")
                return 128 + (stop_signal[0] if stop_signal else signal.SIGTERM)

        log(f"eval {json.dumps(evaluate())}")
        if d.master:
            metrics.close()
        return 0


def count_tokens(batch: dict, patches: int) -> tuple[int, int, int]:
    """(text tokens, images, padding positions) of a collated batch, counted after image splicing."""
    ids, mask = batch["input_ids"], batch.get("attention_mask")
    is_image = ids == IMAGE_TOKEN_INDEX
    real_text = (ids >= 0) if mask is None else (mask.bool() & ~is_image)
    per_row = real_text.sum(1) + is_image.sum(1) * patches
    return int(real_text.sum()), int(is_image.sum()), int(per_row.max() * ids.shape[0] - per_row.sum())


def to_device(batch: dict, device) -> dict:
    keep = ("input_ids", "pixel_values", "attention_mask", "labels", "cu_seqlens", "max_seqlen")
    return {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in batch.items() if k in keep}


if __name__ == "__main__":
    code = main()
    if dist.is_initialized():
        dist.destroy_process_group()
    sys.exit(code)
