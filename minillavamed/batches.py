"""The training data's order and batches: which samples each process sees at each step (paper §4.1's global
batch of 128 over 8 GPUs, cut into micro-batches and gradient accumulation).

The order depends on the seed and the epoch only, and micro-batches are dealt out across processes, so the
same samples meet in the same optimizer steps whatever the number of processes, and a resumed run continues
from its saved (epoch, step). `cfg` is train.py's TrainConfig.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from minillavamed.config import IGNORE_INDEX, IMAGE_TOKEN_INDEX
from minillavamed.data import collate
from minillavamed.distributed import Dist


def micro_batches(n: int, cfg, d: Dist, accum: int, epoch: int, start: int):
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


class RunBatches(torch.utils.data.Sampler):
    """This rank's micro-batches from (epoch, step) to the end of the run, epoch after epoch, in the order
    `micro_batches` defines: one DataLoader iterator serves the whole run, so its workers start once and
    keep prefetching across epoch boundaries."""

    def __init__(self, n: int, cfg, d: Dist, accum: int, position: dict):
        self.n, self.cfg, self.d, self.accum, self.position = n, cfg, d, accum, position

    def __iter__(self):
        epoch, start = self.position["epoch"], self.position["step"]
        while True:
            for _, indices in micro_batches(self.n, self.cfg, self.d, self.accum, epoch, start):
                yield indices
            epoch, start = epoch + 1, 0


@dataclass
class MicroBatch:
    """What a data worker hands the loop: the collated batch (None when every image in it was unreadable)
    and its counts, taken on the host so that the loop never reads them back from the device."""

    batch: dict | None
    skipped: int
    text_tokens: int = 0
    images: int = 0
    padding: int = 0
    scored: int = 0  # positions the loss scores, each through the output layer

    def pin_memory(self) -> "MicroBatch":  # what DataLoader(pin_memory=True) calls on a custom type
        if self.batch is not None:
            self.batch = {k: v.pin_memory() if torch.is_tensor(v) else v for k, v in self.batch.items()}
        return self


@dataclass
class Collate:
    pad_id: int
    pack: bool
    image_tokens: int  # decoder positions per image

    def __call__(self, items: list) -> MicroBatch:
        batch = collate(items, self.pad_id, self.pack, self.image_tokens)
        if batch is None:
            return MicroBatch(None, len(items))
        return MicroBatch(batch, batch["skipped"], *count_tokens(batch, self.image_tokens))


def default_workers() -> int:
    """Data workers per process on a GPU: the cores this node gives each of its processes, one left for
    the training loop itself, at most 4 (twice what bench/data_speed.py finds an H100 needs at 7B)."""
    per_process = len(os.sched_getaffinity(0)) // int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    return max(1, min(4, per_process - 1))


def make_loader(train_set, cfg, d: Dist, accum: int, position: dict, collate_fn: Collate,
                pin: bool):
    """The training micro-batches in `micro_batches` order from `position` on, decoded by cfg.num_workers
    processes (0: this one), each 4 micro-batches ahead, into pinned memory when `pin` (GPUs)."""
    sampler = RunBatches(len(train_set), cfg, d, accum, dict(position))
    workers = cfg.num_workers
    return torch.utils.data.DataLoader(
        train_set, batch_sampler=sampler, collate_fn=collate_fn, num_workers=workers, pin_memory=pin,
        prefetch_factor=4 if workers else None,
        # Workers forked here inherit nothing random that matters (the data path is deterministic); a
        # private generator keeps the loader from drawing its worker seed from the training RNG.
        generator=torch.Generator().manual_seed(cfg.seed))


def count_tokens(batch: dict, patches: int) -> tuple[int, int, int, int]:
    """(text tokens, images, padding positions, scored positions) of a collated batch, counted after image
    splicing."""
    ids, mask = batch["input_ids"], batch.get("attention_mask")
    is_image = ids == IMAGE_TOKEN_INDEX
    real_text = (ids >= 0) if mask is None else (mask.bool() & ~is_image)
    per_row = real_text.sum(1) + is_image.sum(1) * patches
    return (int(real_text.sum()), int(is_image.sum()), int(per_row.max() * ids.shape[0] - per_row.sum()),
            # A position is scored where its next label is not ignored (an image's label never is: splicing
            # replaces it with ignored ones).
            int(((batch["labels"][:, 1:] != IGNORE_INDEX) & ~is_image[:, 1:]).sum()))


def to_device(batch: dict, device) -> dict:
    keep = ("input_ids", "pixel_values", "attention_mask", "labels", "cu_seqlens", "max_seqlen")
    return {k: (v.to(device, non_blocking=True) if torch.is_tensor(v) else v) for k, v in batch.items() if k in keep}
