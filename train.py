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
import signal
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from minillavamed import LlavaMed
from minillavamed.attention import require_triton
from minillavamed.batches import Collate, MicroBatch, default_workers, make_loader, to_device
from minillavamed.checkpoint import CheckpointError, check_vocab, fill_shards, read_config
from minillavamed.config import preset
from minillavamed.conversation import get_template, render
from minillavamed.curriculum import STAGES, TINY_STAGES, peak_tflops, set_trainable
from minillavamed.data import (ConversationDataset, DataError, DataReport, ImageProcessor, check_data, collate,
                               load_records, questions_from_vqa, record_problem)
from minillavamed.distributed import Dist, all_sum, barrier, raw, setup_distributed
from minillavamed.evaluation import score_vqa
from minillavamed.inference import Assistant, answer_questions, default_dtype, device_arg
from minillavamed.resume import (check_free_space, check_resume, latest_checkpoint, restore, save_checkpoint,
                                 stop_signals)
from minillavamed.tokenizer import Tokenizer, train_tokenizer

WORLD = Path("data/synthetic")


def opt(default, help: str):
    """A TrainConfig field with its --help text."""
    return field(default=default, metadata={"help": help})


@dataclass
class TrainConfig:
    stage: int = opt(1, "curriculum stage: 0 general base (tiny preset), 1 concept alignment, 2 instruction "
                        "tuning, 3 VQA fine-tuning")
    out_dir: str = opt("", "where the model, checkpoints/ and metrics go; default: out/tiny/stage{N} on the "
                           "synthetic world (required with --data)")
    init_from: str = opt("", "checkpoint dir this stage starts from (any layout LlavaMed reads); default: the "
                             "previous stage's out_dir")
    vision_tower: str = opt("", "CLIP checkpoint, for layouts that don't hold one")
    preset: str = opt("tiny", "the architecture stage 0 builds from scratch")
    data: str = opt("", "LLaVA-Med JSON/JSONL; default: the synthetic world's file for the stage")
    image_folder: str = opt("", "root of the records' image paths")
    eval_data: str = opt("", "VQA file for the closed/open evaluation; default: the synthetic vqa_test")
    conv: str = opt("", "conversation template; default: plain in stage 1, the model's own otherwise")
    epochs: float = opt(0.0, "passes over the data; 0: the stage's default")
    max_iters: int = opt(0, "optimizer steps; 0: epochs x samples / global batch")
    lr: float = opt(0.0, "peak learning rate, > 0; leave it out for the stage's default")
    min_lr_ratio: float = opt(0.0, "the cosine decays to lr x this, in [0, 1] (HF's cosine schedule: 0)")
    weight_decay: float = opt(0.0, "AdamW weight decay, >= 0")
    warmup_ratio: float = opt(0.03, "fraction of the run spent in linear warmup, in [0, 1]")
    global_batch: int = opt(0, "samples per optimizer step over all processes; 0: the stage's default")
    micro_batch: int = opt(0, "samples per forward pass and process; 0: the stage's default")
    max_len: int = opt(0, "decoder positions per sample (an image counts its patches); longer samples are "
                          "cut and counted; 0: the stage's default")
    grad_clip: float = opt(1.0, "gradient norm clip, > 0")
    val_size: int = opt(64, "records held out of --data for the validation loss")
    train_records: int = opt(0, "train on the first N records left after the validation hold-out (the paper's "
                                "10K of its 60K conversations); 0: all")
    eval_questions: int = opt(0, "VQA questions per evaluation; 0: all")
    log_interval: int = opt(10, "optimizer steps between log lines, >= 1")
    eval_interval: int = opt(0, "optimizer steps between evaluations; 0: only at the end")
    ckpt_interval: int = opt(100, "optimizer steps between checkpoints, >= 1")
    keep_last: int = opt(2, "checkpoints kept in out_dir/checkpoints, >= 1")
    seed: int = opt(1337, "seeds the model, the data order and the validation split")
    device: str = opt("", "torch device; default: cuda if available, else cpu")
    dtype: str = opt("", "bfloat16 | float32; default: bfloat16 on GPUs, float32 on CPUs")
    attn: str = opt("", "naive | sdpa | triton; default: triton on GPUs in bfloat16, sdpa otherwise")
    compile: bool = opt(False, "torch.compile the model")
    grad_ckpt: bool = opt(False, "recompute decoder blocks in the backward pass (less memory)")
    fsdp: bool = opt(False, "shard parameters over processes (torchrun) instead of DDP")
    pack: bool | None = opt(None, "pack each micro-batch's samples back to back in one row (varlen attention) "
                                  "instead of padding them: the same samples and losses without computing on "
                                  "padding; default: packed on the synthetic world, padded with --data")
    peak_tflops: float = opt(0.0, "peak dense bf16 TFLOPS for MFU; 0: from the GPU's name")
    num_workers: int = opt(-1, "data loading processes per rank; -1: up to 4 on GPUs (as the cores allow), 0 on "
                               "CPUs")
    skip_bad_images: bool = opt(False, "leave out (and count) records whose image is missing or unreadable "
                                       "instead of stopping")
    skip_bad_records: bool = opt(False, "leave out (and count) records of a bad shape instead of stopping")
    resume: bool = opt(False, "continue the run in out_dir from its latest checkpoint")
    move_aside: bool = opt(False, "rename an out_dir that holds another run to OUT_DIR.prev-N and start fresh")


def _number(kind, low=None, high=None, above=None, hint=""):
    """An argparse type: a finite number of `kind` in the given bounds, else an error naming the bound."""
    def parse(text: str):
        try:
            x = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a{'n integer' if kind is int else ' number'}")
        if not math.isfinite(x):
            raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
        if (low is not None and x < low) or (high is not None and x > high) or (above is not None and x <= above):
            bound = (f"> {above}" if above is not None else f">= {low}" if high is None else f"in [{low}, {high}]")
            raise argparse.ArgumentTypeError(f"{text} must be {bound}{hint}")
        return x
    return parse


def _flag_types() -> dict:
    from minillavamed.attention import BACKENDS
    from minillavamed.config import PRESETS
    from minillavamed.conversation import TEMPLATES

    at_least_one = _number(int, low=1)
    zero_default = _number(int, low=0, hint=" (0 or leaving it out: the stage's default)")
    return {
        "stage": dict(type=int, choices=sorted(STAGES)), "preset": dict(choices=sorted(PRESETS)),
        "conv": dict(choices=sorted(TEMPLATES)),
        "dtype": dict(choices=["bfloat16", "float32"]), "attn": dict(choices=list(BACKENDS)),
        "epochs": dict(type=_number(float, low=0)), "max_iters": dict(type=_number(int, low=0)),
        "lr": dict(type=_number(float, above=0, hint="; leave --lr out for the stage's default")),
        "min_lr_ratio": dict(type=_number(float, low=0, high=1)), "weight_decay": dict(type=_number(float, low=0)),
        "warmup_ratio": dict(type=_number(float, low=0, high=1)),
        "global_batch": dict(type=zero_default), "micro_batch": dict(type=zero_default),
        "max_len": dict(type=zero_default), "grad_clip": dict(type=_number(float, above=0)),
        "val_size": dict(type=_number(int, low=0)), "train_records": dict(type=_number(int, low=0)),
        "eval_questions": dict(type=_number(int, low=0)),
        "log_interval": dict(type=at_least_one), "eval_interval": dict(type=_number(int, low=0)),
        "ckpt_interval": dict(type=at_least_one), "keep_last": dict(type=at_least_one),
        "peak_tflops": dict(type=_number(float, low=0)), "num_workers": dict(type=_number(int, low=-1)),
        "device": dict(type=lambda text: text and device_arg(text)),  # "", the default: cuda if there is one
    }


class OneLineParser(argparse.ArgumentParser):
    """A flag error is one line naming the flag, without the 40-option usage block in front of it."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def stage_defaults() -> str:
    def listed(table: dict) -> str:
        own = "the model's own"
        return ", ".join(f"{key} {own if v is None else v}" for key, v in table.items())

    rows = [f"  stage {k}: " + ", ".join(f"{key} {v}" for key, v in STAGES[k].items() if v is not None) +
            f" (synthetic world: {listed(TINY_STAGES[k])})" for k in STAGES]
    return "stage defaults, for the options left out (or 0):\n" + "\n".join(rows)


def parse_args(argv=None) -> TrainConfig:
    p = OneLineParser(description=__doc__, epilog=stage_defaults(),
                      formatter_class=argparse.RawDescriptionHelpFormatter)
    types = _flag_types()
    for f in dataclasses.fields(TrainConfig):
        help_text = f.metadata["help"].replace("%", "%%")
        if f.type.startswith("bool"):  # "bool | None": the stage's choice unless --X or --no-X says otherwise
            action = "store_true" if f.type == "bool" else argparse.BooleanOptionalAction
            p.add_argument(f"--{f.name}", action=action, help=help_text)
            continue
        if f.default not in ("", 0, 0.0):
            help_text += " (default: %(default)s)"
        kind = types.get(f.name, {"type": {"int": int, "float": float, "str": str}[f.type]})
        p.add_argument(f"--{f.name}", default=f.default, help=help_text, **kind)
    cfg = TrainConfig(**vars(p.parse_args(argv)))
    if cfg.resume and cfg.move_aside:
        p.error("--resume continues the run in --out_dir and --move_aside puts it away: give one of them")
    return cfg


# ------------------------------------------------------------------------------------------- the stages
def fill_defaults(cfg: TrainConfig) -> TrainConfig:
    """Stage defaults, the synthetic world when no data is given, and the chain of stage directories."""
    synthetic = not cfg.data
    table = {**STAGES[cfg.stage], **(TINY_STAGES[cfg.stage] if synthetic else {})}
    for key in ("epochs", "lr", "global_batch", "micro_batch", "max_len"):
        if not getattr(cfg, key):
            setattr(cfg, key, table[key])
    if cfg.pack is None:
        cfg.pack = table["pack"]
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
    cfg.conv = cfg.conv or (table["conv"] or "")
    cuda = torch.cuda.is_available()
    cfg.device = cfg.device or ("cuda" if cuda else "cpu")
    cfg.dtype = cfg.dtype or default_dtype(cfg.device)
    # The kernels take fp16/bf16 on GPUs: fp32 on a GPU (and any CPU run) defaults to SDPA.
    cfg.attn = cfg.attn or ("triton" if cfg.device.startswith("cuda") and cfg.dtype == "bfloat16" else "sdpa")
    if cfg.attn == "triton":  # refused here, in one line, rather than at the first forward pass
        compute = torch.bfloat16 if cfg.dtype == "bfloat16" else torch.float32
        try:
            require_triton(torch.empty(1, 1, 1, 64, device=cfg.device, dtype=compute))
        except RuntimeError as e:
            raise SystemExit(str(e)) from None
    if cfg.num_workers < 0:
        cfg.num_workers = default_workers() if cfg.device.startswith("cuda") else 0
    return cfg


def synthetic_paths(stage: int) -> tuple[dict, str]:
    from minillavamed.synthetic_world import generate_world

    paths = generate_world(WORLD)
    data = {0: [paths["general"], paths["text"]], 1: [paths["alignment"]], 2: [paths["instruct"]],
            3: [paths["vqa_train"]]}[stage]
    return paths, data


def lr_at(it: int, cfg: TrainConfig, total: int) -> float:
    """Linear warmup over warmup_ratio of the run, then cosine decay (LLaVA's schedule). The warmup is one step
    ahead of transformers' (whose first step has a learning rate of 0 and so does nothing); after it they agree."""
    warmup = math.ceil(cfg.warmup_ratio * total)
    if it < warmup:
        return cfg.lr * (it + 1) / warmup
    progress = (it - warmup) / max(1, total - warmup)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


# ------------------------------------------------------------------------------------ before any work
RUN_FILES = ("train_config.json", "metrics.jsonl", "eval.json", "answers.jsonl", "checkpoints")


def prepare_out_dir(cfg: TrainConfig, d: Dist) -> None:
    """Refuse an out_dir that holds another run unless it is resumed (or moved aside with --move_aside), and
    make sure out_dir can be written, before any model or data is loaded."""
    out = Path(cfg.out_dir)
    if out.exists() and not out.is_dir():
        raise SystemExit(f"--out_dir {out}: exists and is not a directory")
    found = [f for f in RUN_FILES if (out / f).exists()]
    if found and (cfg.move_aside or not cfg.resume or latest_checkpoint(out) is None):
        k = 1
        while Path(f"{out}.prev-{k}").exists():
            k += 1
        aside = Path(f"{out}.prev-{k}")
        if cfg.move_aside:
            if d.master:
                out.rename(aside)
                print(f"--move_aside: the run that was in {out} is now in {aside}")
        else:
            why = "no checkpoint to --resume from" if cfg.resume else "another run"
            raise SystemExit(f"--out_dir {out} holds {why} ({', '.join(found)}); continue it with --resume, "
                             f"pass --move_aside to rename it to {aside} and start fresh, or choose another "
                             "--out_dir")
    barrier(d)
    if d.master:
        probe = out / f".write-probe-{os.getpid()}"
        try:
            out.mkdir(parents=True, exist_ok=True)
            with open(probe, "wb") as f:
                f.write(b"0" * 4096)
                f.flush()
                os.fsync(f.fileno())
            probe.unlink()
        except OSError as e:
            raise SystemExit(f"--out_dir {out}: cannot write there ({e.strerror or e}); choose a writable "
                             "directory") from None
    barrier(d)


def read_records(path: str) -> list[dict]:
    """load_records, its errors (malformed JSON, named by file and line) as one line and a non-zero exit."""
    try:
        return load_records(path)
    except (OSError, ValueError) as e:
        raise SystemExit(str(e)) from None


def validate_data(cfg: TrainConfig, files, image_folder, template, tokenizer, model_cfg, log) -> DataReport:
    """check_data over every file of this stage before training; bad records stop the run (one line naming
    them) unless --skip_bad_records / --skip_bad_images; what was skipped or will be truncated is logged.
    The model's vocabulary must cover its tokenizer's."""
    try:
        check_vocab(model_cfg, tokenizer.vocab_size, cfg.init_from or cfg.out_dir)
        report = check_data(files, image_folder, template, tokenizer, cfg.max_len, model_cfg.vision.tokens_per_image,
                            model_cfg.decoder.max_seq_len, cfg.skip_bad_records, cfg.skip_bad_images,
                            im_start_end=model_cfg.mm_use_im_start_end)
    except (CheckpointError, DataError, OSError) as e:
        raise SystemExit(str(e)) from None
    summary = report.summary()
    log(f"data: {summary['records_read']} records, {summary['records_skipped']} skipped "
        f"{summary['skipped_reasons'] or ''}, {summary['samples_truncated']} truncated to max_len {cfg.max_len}")
    return report


def build_dataset(records, cfg, template, tokenizer, processor, model_cfg, image_folder, source):
    return ConversationDataset(records, image_folder, template, tokenizer, processor, cfg.max_len,
                               model_cfg.vision.tokens_per_image, skip_bad_images=cfg.skip_bad_images, source=source,
                               im_start_end=model_cfg.mm_use_im_start_end)


# ------------------------------------------------------------------------------------------ the run's steps
@dataclass
class Data:
    files: list
    records: list  # filled by validate_data, which reads every file once
    image_folder: str | None
    eval_file: str
    world: dict | None  # the synthetic world's paths, when it is the data


def find_data(cfg: TrainConfig, d: Dist) -> Data:
    """The stage's data files: --data, or the synthetic world's file for the stage (generated by rank 0)."""
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
    return Data(files, [], image_folder, eval_file, world)


def model_config(cfg: TrainConfig, d: Dist, data: Data, source: Path | None, out: Path):
    """(model config, tokenizer), known before any weight is read: the checkpoint's the stage starts from, or
    for stage 0 from scratch the preset's, with a SentencePiece tokenizer trained on the world's text."""
    if source is None:
        tok_dir = out / "tokenizer"
        mcfg = preset(cfg.preset)
        if d.master and not (tok_dir / "tokenizer.model").exists():
            # Rendered conversations, so that the template's own markers ([INST] ...) become pieces too.
            chat = get_template(cfg.conv or mcfg.conv_template)
            # Records of a bad shape are left out here; the validation pass right after names them.
            records = [r for f in data.files for r in read_records(f) if record_problem(r) is None]
            texts = [render(chat, r["conversations"]).replace("<image>", "") for r in records]
            texts += [r["fig_caption"] for r in load_records(data.world["pmc"])] if data.world else []
            train_tokenizer(texts, tok_dir, mcfg.decoder.vocab_size)
        barrier(d)
        tokenizer = Tokenizer(tok_dir / "tokenizer.model")
        mcfg.decoder.vocab_size = tokenizer.vocab_size
        mcfg.decoder.bos_id, mcfg.decoder.eos_id = tokenizer.bos_id, tokenizer.eos_id
        mcfg.decoder.pad_id = tokenizer.pad_id
    else:
        tokenizer_file = source / "tokenizer.model"
        if not tokenizer_file.exists():
            raise SystemExit(f"{tokenizer_file}: missing; the checkpoint needs its SentencePiece tokenizer")
        tokenizer = Tokenizer(tokenizer_file)
        try:
            mcfg = read_config(source, vision_tower=cfg.vision_tower or None)
        except (CheckpointError, OSError) as e:
            raise SystemExit(str(e)) from None
    if cfg.stage != 1 and cfg.conv:  # stage 1's plain template is for alignment only, never the model's
        mcfg.conv_template = cfg.conv  # the chat format this model is tuned to, saved with it
    return mcfg, tokenizer


def build_model(cfg: TrainConfig, mcfg, source: Path | None) -> LlavaMed:
    """A random model of `mcfg` (stage 0 from scratch), the checkpoint the stage starts from, or under --fsdp
    that checkpoint's model on the meta device, for parallelize() to shard and each process to fill its shards
    of: frozen parts bf16 under bf16, what trains fp32 (the optimizer's master copy)."""
    if source is None:
        model = LlavaMed(mcfg)
    elif cfg.fsdp:
        with torch.device("meta"):
            model = LlavaMed(mcfg)
    else:
        # Read tensor by tensor straight onto the device in the training dtype (a 7B model in bf16 is 15 GB
        # on each GPU and never whole on the host); parallelize() then makes what trains fp32.
        weights = torch.bfloat16 if cfg.dtype == "bfloat16" else torch.float32
        model = LlavaMed.from_pretrained(source, vision_tower=cfg.vision_tower or None, dtype=weights,
                                         device=cfg.device)
        model.cfg.conv_template = mcfg.conv_template
    model.set_attention_backend(cfg.attn)
    model.decoder.checkpointing = cfg.grad_ckpt
    set_trainable(model, cfg.stage)
    if cfg.fsdp and source is not None and cfg.dtype == "bfloat16":
        for p in model.parameters():
            if not p.requires_grad:
                p.data = p.data.to(torch.bfloat16)  # on the meta device: sets the dtype fill_shards reads in
    return model


def master_weights(module: torch.nn.Module, prefix: str, source: Path | None, device: torch.device) -> None:
    """Make what trains in `module` (named `prefix` in the model) fp32, the optimizer's master copy: read
    again from one of our checkpoints (which saves it fp32, so a resumed run continues from the same bits),
    or else widened from the bf16 read."""
    from minillavamed.checkpoint import FORMAT, WeightFiles

    narrow = [(n, p) for n, p in module.named_parameters(prefix=prefix) if p.requires_grad and p.dtype != torch.float32]
    if not narrow:
        return
    ours = source is not None and json.loads((source / "config.json").read_text()).get("model_type") == FORMAT
    files = WeightFiles(source) if ours else None
    for name, p in narrow:
        full = files.get(name) if files is not None and name in files.where else p.data
        p.data = full.to(device, torch.float32)


def build_datasets(cfg: TrainConfig, data: Data, model: LlavaMed, template, tokenizer, log):
    """(train, validation): the validation records are a fixed random sample, the same in every run with
    this seed."""
    records = data.records
    if len(records) <= cfg.val_size:
        raise SystemExit(f"{data.files}: {len(records)} records, not enough to hold out {cfg.val_size} for validation")
    processor = ImageProcessor.for_model(model.cfg.vision.image_size, model.cfg.image_aspect_ratio)
    held = set(torch.randperm(len(records), generator=torch.Generator().manual_seed(cfg.seed))[: cfg.val_size].tolist())
    source = ",".join(data.files)
    train = [r for i, r in enumerate(records) if i not in held][: cfg.train_records or None]
    train_set = build_dataset(train, cfg, template, tokenizer, processor, model.cfg, data.image_folder, source)
    val_set = build_dataset([records[i] for i in sorted(held)], cfg, template, tokenizer, processor, model.cfg,
                            data.image_folder, source)
    for name, ds in (("train", train_set), ("val", val_set)):
        if ds.dropped:
            log(f"{name}: dropped {dict(ds.dropped)}")
    return train_set, val_set


def plan_steps(cfg: TrainConfig, d: Dist, samples: int) -> tuple[int, int, int]:
    """(micro-batches per step and process, optimizer steps per epoch, steps in the run)."""
    per_step = cfg.micro_batch * d.world
    if cfg.global_batch % per_step:
        raise SystemExit(f"global batch {cfg.global_batch} is not a multiple of micro_batch x processes = {per_step}")
    steps_per_epoch = samples // cfg.global_batch
    if steps_per_epoch == 0:
        raise SystemExit(f"{samples} training samples: fewer than one global batch of {cfg.global_batch}")
    return cfg.global_batch // per_step, steps_per_epoch, cfg.max_iters or math.ceil(cfg.epochs * steps_per_epoch)


def parallelize(model: LlavaMed, cfg: TrainConfig, d: Dist, device: torch.device, source: Path | None):
    """(the module the loop calls, the trainable parameters): FSDP2 shards per decoder block and the vision
    tower as one unit, DDP replicates, one process runs the model as it is. Under bf16, FSDP gathers
    parameters in bf16 and reduces gradients in fp32 into the fp32 shards of what trains."""
    if cfg.fsdp:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        mp = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
              if cfg.dtype == "bfloat16" else MixedPrecisionPolicy())
        if source is None:
            model.to(device)  # stage 0's model from scratch
        for block in model.decoder.blocks:
            fully_shard(block, mp_policy=mp)
        fully_shard(model.vision, mp_policy=mp)
        fully_shard(model, mp_policy=mp)
        if source is not None:  # sharded on the meta device: each process reads only its own shards
            model.to_empty(device=device)
            fill_shards(model, source, vision_tower=cfg.vision_tower or None)
        return model, [p for p in model.parameters() if p.requires_grad]  # FSDP swapped in sharded parameters
    model.to(device)  # stage 0's model from scratch; a loaded one is there already
    if d.world > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP

        master_weights(model, "", source, device)
        # Stage 0 mixes text-only and image samples: some micro-batches never touch the vision tower.
        wrapped = DDP(model, device_ids=[device.index] if device.type == "cuda" else None,
                      find_unused_parameters=cfg.stage == 0)
    else:
        master_weights(model, "", source, device)
        wrapped = model
    return wrapped, [p for p in model.parameters() if p.requires_grad]


def make_optimizer(trainable: list, cfg: TrainConfig, device: torch.device) -> torch.optim.Optimizer:
    return torch.optim.AdamW(trainable, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.999),
                             eps=1e-8, foreach=device.type == "cuda")


@dataclass
class Run:
    """Everything the loop and the evaluation read, built by main() step by step."""

    cfg: TrainConfig
    d: Dist
    device: torch.device
    out: Path
    model: LlavaMed  # the module itself (FSDP shards it in place)
    wrapped: torch.nn.Module  # what forward passes go through: DDP, or the model
    trainable: list
    optimizer: torch.optim.Optimizer
    tokenizer: Tokenizer
    template: object
    train_set: ConversationDataset
    val_set: ConversationDataset
    data: Data
    data_report: DataReport  # records read, skipped and truncated: logged, and written to eval.json
    accum: int
    steps_per_epoch: int
    max_iters: int

    def log(self, msg: str) -> None:
        if self.d.master:
            print(msg, flush=True)

    @property
    def autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16) if self.cfg.dtype == "bfloat16" else nullcontext()


def evaluate(run: Run, it: int) -> dict:
    """Validation loss (all ranks, each on its slice) and VQA scores (rank 0; every rank under FSDP)."""
    cfg, d, model = run.cfg, run.d, run.model
    run.wrapped.eval()
    total = torch.zeros(2, dtype=torch.float64, device=run.device)  # (sum of batch losses, batches)
    with torch.no_grad(), run.autocast:
        for k in range(d.rank * cfg.micro_batch, len(run.val_set), cfg.micro_batch * d.world):
            rows = range(k, min(k + cfg.micro_batch, len(run.val_set)))
            b = collate([run.val_set[i] for i in rows], run.tokenizer.pad_id)
            if b is not None:
                total += torch.stack([run.wrapped(**to_device(b, run.device))[1].double(), total.new_ones(())])
    losses, batches = all_sum(total, d).tolist()
    result = {"iter": it, "val_loss": losses / max(1.0, batches), **run.data_report.summary()}
    eval_gt = load_records(run.data.eval_file)[: cfg.eval_questions or None] if run.data.eval_file else []
    if eval_gt and (d.master or cfg.fsdp):
        assistant = Assistant.for_model(raw(model), run.tokenizer)
        if cfg.fsdp:  # generate() calls submodules directly, so gather the root's shards by hand
            model.unshard()
        with run.autocast:
            questions = questions_from_vqa(eval_gt)
            answers = answer_questions(assistant, questions, run.data.image_folder, batch_size=32, max_new_tokens=32)
        if cfg.fsdp:
            model.reshard()
        scores = score_vqa(eval_gt, {str(r["id"]): a for r, a in zip(eval_gt, answers)})["scores"]
        closed, opened = scores.get("CLOSED", {}), scores.get("OPEN", {})
        result.update(closed_accuracy=(closed.get("closed_accuracy") or 0) / 100,
                      open_recall=(opened.get("open_recall") or 0) / 100, n_questions=len(eval_gt))
        if d.master:
            (run.out / "eval.json").write_text(json.dumps(result, indent=2))
            # Every answer beside its question, for per-slice scores (bench/curriculum.py) and for reading.
            (run.out / "answers.jsonl").write_text("".join(
                json.dumps({"id": str(q["question_id"]), "question": q["text"], "answer": a, "gt": q["answer"]}) + "\n"
                for q, a in zip(questions, answers)))
    barrier(d)
    run.wrapped.train()
    return result


class Meter:
    """What the loop adds up between log lines: the losses stay on the device and the counts on the host,
    so that nothing waits for the GPU until the line is written."""

    def __init__(self, device: torch.device, max_iters: int):
        self.device, self.max_iters = device, max_iters
        # The first iteration whose loss or gradient norm was not finite (max_iters + 1: none yet), kept on
        # the device and read only at log lines and checkpoints.
        self.first_bad = torch.tensor(max_iters + 1, device=device)
        self.skipped = 0
        self.reset(time.perf_counter())

    def reset(self, now: float) -> None:
        self.t0, self.steps, self.wait, self.flops = now, 0, 0.0, 0.0
        self.text_tokens = self.images = self.padding = 0

    def add(self, mb: MicroBatch) -> None:
        self.text_tokens, self.images = self.text_tokens + mb.text_tokens, self.images + mb.images
        self.padding, self.skipped = self.padding + mb.padding, self.skipped + mb.skipped

    def check(self, it: int, loss: torch.Tensor, grad_norm: torch.Tensor) -> None:
        finite = torch.isfinite(loss) & torch.isfinite(grad_norm)
        self.first_bad = torch.where(finite | (self.first_bad <= it), self.first_bad, it)

    def bad_iteration(self, d: Dist) -> int | None:
        """The first non-finite iteration on any rank so far, or None (this reads the device)."""
        bad = int(all_sum(self.first_bad.clone(), d, op=dist.ReduceOp.MIN))
        return bad if bad <= self.max_iters else None


def train(run: Run, it: int, position: dict) -> int:
    """The loop: gradient accumulation over micro-batches, one optimizer step per global batch, logs,
    evaluations and checkpoints at their intervals; 0 when done, 1 on a non-finite loss, 128 + signal
    when stopped by one."""
    cfg, d, model, device, out = run.cfg, run.d, run.model, run.device, run.out
    image_tokens = model.cfg.vision.tokens_per_image
    loader = make_loader(run.train_set, cfg, d, run.accum, position,
                         Collate(run.tokenizer.pad_id, cfg.pack, image_tokens), pin=device.type == "cuda")
    batches = iter(loader)
    peak = cfg.peak_tflops or peak_tflops(device)
    if d.master:
        out.mkdir(parents=True, exist_ok=True)
        (out / "train_config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=2))
        metrics_path = out / "metrics.jsonl"
        if metrics_path.exists():  # drop lines past the resumed iteration, so none are repeated
            kept = [line for line in metrics_path.read_text().splitlines() if json.loads(line)["iter"] <= it]
            metrics_path.write_text("".join(line + "\n" for line in kept))
        metrics = open(metrics_path, "a")
    run.log(f"stage {cfg.stage}: {len(run.train_set)} samples, {run.max_iters} iters of {cfg.global_batch} "
            f"({run.accum} x {cfg.micro_batch} x {d.world} procs), "
            f"{sum(p.numel() for p in run.trainable) / 1e6:.2f}M trainable of "
            f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f}M, template {run.template.name}, "
            f"{cfg.device} {cfg.dtype}, {cfg.num_workers} data workers")

    def stop_if_not_finite() -> bool:
        bad = meter.bad_iteration(d)
        if bad is not None:
            last = latest_checkpoint(out)
            run.log(f"error: the loss or gradient norm at iter {bad} is not finite; stopping. "
                    f"The last good checkpoint is {last or 'none (no checkpoint was written yet)'}.")
        return bad is not None

    forward = torch.compile(run.wrapped) if cfg.compile else run.wrapped
    epoch, start = position["epoch"], position["step"]
    meter = Meter(device, run.max_iters)
    t_start, steps_timed = time.perf_counter(), 0
    run.wrapped.train()
    with stop_signals() as stop_signal:
        while it < run.max_iters:
            if start >= run.steps_per_epoch:
                epoch, start = epoch + 1, 0
            loss_sum, step_text, step_images, step_scored = torch.zeros((), device=device), 0, 0, 0
            for j in range(run.accum):
                t_wait = time.perf_counter()
                mb = next(batches)
                meter.wait += time.perf_counter() - t_wait
                meter.add(mb)
                step_text, step_images, step_scored = (step_text + mb.text_tokens, step_images + mb.images,
                                                       step_scored + mb.scored)
                # Gradients are reduced across processes once per optimizer step, after the last micro-batch.
                last = j == run.accum - 1
                if cfg.fsdp:
                    model.set_requires_gradient_sync(last)
                no_sync = not last and hasattr(run.wrapped, "no_sync")
                with run.wrapped.no_sync() if no_sync else nullcontext(), run.autocast:
                    if mb.batch is None:  # every image of this micro-batch was unreadable and skipped
                        loss = sum((p * 0).sum() for p in run.trainable)
                    else:
                        _, loss = forward(**to_device(mb.batch, device))
                (loss / run.accum).backward()
                loss_sum += loss.detach() / run.accum
            grad_norm = torch.nn.utils.clip_grad_norm_(run.trainable, cfg.grad_clip)
            if hasattr(grad_norm, "full_tensor"):  # a DTensor under FSDP
                grad_norm = grad_norm.full_tensor()
            meter.check(it + 1, loss_sum, grad_norm)
            for group in run.optimizer.param_groups:
                group["lr"] = lr_at(it, cfg, run.max_iters)
            run.optimizer.step()
            run.optimizer.zero_grad(set_to_none=True)
            it, start = it + 1, start + 1
            meter.steps += 1
            row_length = (step_text + step_images * image_tokens) // (cfg.micro_batch * run.accum)
            meter.flops += model.flops(step_text, step_images, max(1, row_length), step_scored)
            steps_timed += 1

            if it % cfg.log_interval == 0 or it == run.max_iters:
                if stop_if_not_finite():
                    return 1
                loss_avg = float(all_sum(loss_sum, d)) / d.world
                now = time.perf_counter()
                dt = now - meter.t0
                real = meter.text_tokens + meter.images * image_tokens
                counts = all_sum(torch.tensor([real, meter.padding], dtype=torch.float64), d, d.cpu_group)
                tokens, padded = counts.tolist()
                flops = all_sum(torch.tensor([meter.flops], dtype=torch.float64), d, d.cpu_group).item() / dt
                mfu = flops / (peak * 1e12) if peak else None
                eta = (now - t_start) / steps_timed * (run.max_iters - it)
                row = {"iter": it, "loss": loss_avg, "lr": run.optimizer.param_groups[0]["lr"],
                       "grad_norm": float(grad_norm), "tokens_per_s": tokens / dt,
                       "pad_frac": padded / max(1, padded + tokens), "mfu": mfu, "epoch": epoch,
                       "data_wait_frac": meter.wait / dt, "skipped_images": meter.skipped}
                run.log(f"iter {it}/{run.max_iters} loss {loss_avg:.4f} lr {row['lr']:.2e} "
                        f"gnorm {row['grad_norm']:.2f} {row['tokens_per_s']:,.0f} tok/s pad {row['pad_frac']:.0%}"
                        + (f" mfu {mfu:.1%}" if mfu is not None else "")
                        + f" data {row['data_wait_frac']:.0%}" + (f" skipped {meter.skipped}" if meter.skipped else "")
                        + f" eta {eta / 60:.1f}m")
                if d.master:
                    metrics.write(json.dumps(row) + "\n")
                    metrics.flush()
                meter.reset(time.perf_counter())

            position = {"epoch": epoch, "step": start}
            stopping = bool(all_sum(torch.tensor([float(bool(stop_signal))]), d, d.cpu_group))
            if cfg.eval_interval and it % cfg.eval_interval == 0 and it < run.max_iters:
                run.log(f"eval {json.dumps(evaluate(run, it))}")
            if it % cfg.ckpt_interval == 0 or it == run.max_iters or stopping:
                if stop_if_not_finite():
                    return 1
                save_checkpoint(out, it, run.wrapped, run.optimizer, cfg, d, run.tokenizer, position)
            if stopping:
                run.log(f"interrupted at iter {it}: checkpoint saved in {out}; continue with --resume")
                return 128 + (stop_signal[0] if stop_signal else signal.SIGTERM)

    run.log(f"eval {json.dumps(evaluate(run, it))}")
    if d.master:
        metrics.close()
    return 0


# ------------------------------------------------------------------------------------------------ main
def main(argv=None) -> int:
    cfg = fill_defaults(parse_args(argv))
    d = setup_distributed(cfg)
    prepare_out_dir(cfg, d)
    device = torch.device(cfg.device)
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    out = Path(cfg.out_dir)
    log = print if d.master else (lambda *a, **k: None)

    data = find_data(cfg, d)
    resume_from = latest_checkpoint(out) if cfg.resume else None
    check_resume(cfg, resume_from)
    if cfg.resume and resume_from is None:
        log(f"--resume: no checkpoint in {out}/checkpoints; starting fresh")
    source = resume_from or (Path(cfg.init_from) if cfg.init_from else None)
    mcfg, tokenizer = model_config(cfg, d, data, source, out)
    template = get_template(cfg.conv or mcfg.conv_template)
    report = validate_data(cfg, data.files, data.image_folder, template, tokenizer, mcfg, log)
    data.records = report.records
    model = build_model(cfg, mcfg, source)
    train_set, val_set = build_datasets(cfg, data, model, template, tokenizer, log)
    accum, steps_per_epoch, max_iters = plan_steps(cfg, d, len(train_set))
    wrapped, trainable = parallelize(model, cfg, d, device, source)
    optimizer = make_optimizer(trainable, cfg, device)
    check_free_space(out, model, trainable, d)
    it, position = restore(resume_from, model, optimizer, cfg, log)
    run = Run(cfg, d, device, out, model, wrapped, trainable, optimizer, tokenizer, template,
              train_set, val_set, data, report, accum, steps_per_epoch, max_iters)
    return train(run, it, position)


if __name__ == "__main__":
    code = main()
    if dist.is_initialized():
        dist.destroy_process_group()
    sys.exit(code)
