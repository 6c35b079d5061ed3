"""Memory of train.py at 7B shapes: peak host RSS per process of a real run, and GPU memory per rank from torch's
fake-tensor memory tracker (no real memory, no GPU). Figures go in bench/RESULTS.md.

    # a bf16 checkpoint of the 7B shape (here with one decoder layer) and the tiny world's tokenizer
    python bench/train_memory.py checkpoint --out /tmp/7b-1layer --layers 1 --tokenizer out/tiny/stage0/tokenizer.model
    # peak RSS of each of 2 gloo processes, of the train.py in --code (a checkout of any commit)
    python -m torch.distributed.run --nproc_per_node 2 bench/train_memory.py rss --code . -- --stage 1 ...
    # GPU memory per rank, full 7B, micro-batch 16 x 2048 tokens, gradient checkpointing, bf16
    python bench/train_memory.py gpu --stage 1      # DDP: one replica
    python bench/train_memory.py gpu --stage 2      # FSDP2 over 8 ranks (a fake process group)

`gpu` runs on fake CPU tensors: this CPU-only torch makes fake "cuda" tensors, but recording autograd on one
aborts the process ("PyTorch is not linked with support for cuda devices", from AccumulateGrad's device guard).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import threading
import time
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def status(field: str) -> float:
    """A memory field of /proc/self/status (VmHWM: the peak resident set so far; RssAnon: resident memory not
    backed by a file), in GB (1e9 bytes)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024 / 1e9
    raise RuntimeError(f"no {field} in /proc/self/status")


def vm_hwm() -> float:
    return status("VmHWM")


class AnonPeak(threading.Thread):
    """The peak of RssAnon, sampled every 10 ms: VmHWM also counts the pages of memory-mapped safetensors files
    that were read, which are the kernel's page cache, shared by the processes and dropped when unmapped."""

    def __init__(self):
        super().__init__(daemon=True)
        self.peak = 0.0

    def run(self) -> None:
        while True:
            self.peak = max(self.peak, status("RssAnon"))
            time.sleep(0.01)


def write_checkpoint(out: Path, layers: int, tokenizer: Path) -> None:
    import torch

    sys.path.insert(0, str(ROOT))
    from minillavamed import LlavaMed
    from minillavamed.config import preset
    from minillavamed.tokenizer import Tokenizer

    cfg = preset("llava-med-v1.5-mistral-7b")
    cfg.decoder.layers = layers
    tok = Tokenizer(tokenizer)
    cfg.decoder.bos_id, cfg.decoder.eos_id, cfg.decoder.pad_id = tok.bos_id, tok.eos_id, tok.pad_id
    with torch.device("meta"):
        model = LlavaMed(cfg)
    model.to_empty(device="cpu").to(torch.bfloat16)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.fill_(1.0) if "norm" in name else p.normal_(0, 0.02, generator=gen)
    model.save_pretrained(out)
    shutil.copy(tokenizer, out / "tokenizer.model")
    print(f"{out}: {sum(p.numel() for p in model.parameters()) / 1e9:.2f}B parameters, bf16")


def run_train(code: Path, argv: list[str]) -> int:
    """train.main(argv) of the train.py in `code`, printing this process's peak RSS once parallelize() returns
    (the model loaded and placed), before its first checkpoint write (load and step) and at the end (the write
    gathers whole fp32 states on rank 0 under FSDP)."""
    sys.path.insert(0, str(code.resolve()))
    import torch.distributed as dist
    import train

    rank = os.environ.get("RANK", "0")
    anon = AnonPeak()
    anon.start()
    loaded, before = [], []
    if hasattr(train, "parallelize"):  # the model is loaded, sharded or replicated, and what trains is fp32
        parallelize = train.parallelize

        def measured_parallelize(*args, **kwargs):
            out = parallelize(*args, **kwargs)
            loaded.append((vm_hwm(), anon.peak))
            return out

        train.parallelize = measured_parallelize
    if hasattr(train, "save_checkpoint"):
        save = train.save_checkpoint

        def measured(*args, **kwargs):
            if not before:
                before.append((vm_hwm(), anon.peak))
            return save(*args, **kwargs)

        train.save_checkpoint = measured
    code_rc = train.main(argv)
    def gb(seen):
        return f"{seen[0][0]:.2f} GB (anonymous {seen[0][1]:.2f})" if seen else "n/a"

    print(f"rank {rank}: peak RSS once the model is loaded {gb(loaded)}, before the first checkpoint write "
          f"{gb(before)}, whole run {gb([(vm_hwm(), anon.peak)])}", flush=True)
    if dist.is_initialized():
        dist.destroy_process_group()
    return code_rc


def gpu_memory(stage: int, world: int, micro_batch: int, seq: int, layers: int) -> None:
    """One rank's peak memory over a training step (the second: the first creates AdamW's state), by category,
    for the 7B preset as train.py trains it on GPUs: bf16 autocast, gradient checkpointing, frozen parts bf16,
    what trains fp32; stage 2 under FSDP2 as parallelize() shards it, stage 1 one DDP replica."""
    import torch
    import torch.distributed as dist
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.distributed._tools.fsdp2_mem_tracker import FSDPMemTracker
    from torch.distributed._tools.mem_tracker import MemTracker
    from torch.distributed.device_mesh import init_device_mesh
    from torch.testing._internal.distributed.fake_pg import FakeStore

    sys.path.insert(0, str(ROOT))
    from minillavamed import LlavaMed
    from minillavamed.config import preset
    from minillavamed.curriculum import set_trainable

    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world)
    mesh = init_device_mesh("cpu", (world,))  # outside the fake mode: the mesh reads real rank tensors
    cfg = preset("llava-med-v1.5-mistral-7b")
    cfg.decoder.layers = layers
    with FakeTensorMode():
        model = LlavaMed(cfg)
        model.set_attention_backend("sdpa")  # the Triton kernels cannot run on fake tensors; same saved tensors
        model.decoder.checkpointing = True
        set_trainable(model, stage)
        for p in model.parameters():
            p.data = p.data.to(torch.float32 if p.requires_grad else torch.bfloat16)
        model.splice = types.MethodType(front_image_splice, model)
        if stage >= 2:
            from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

            mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
            for block in model.decoder.blocks:
                fully_shard(block, mp_policy=mp, mesh=mesh)
            fully_shard(model.vision, mp_policy=mp, mesh=mesh)
            fully_shard(model, mp_policy=mp, mesh=mesh)
        trainable = [p for p in model.parameters() if p.requires_grad]
        # foreach=False (train.py uses foreach on GPUs): the tracker counts the temporaries of foreach ops on
        # DTensors at their global size, 8x what a rank allocates; one parameter at a time they are negligible.
        optimizer = torch.optim.AdamW(trainable, lr=1e-5, foreach=False)
        pixels = torch.randn(micro_batch, 3, cfg.vision.image_size, cfg.vision.image_size)
        ids = torch.randint(0, cfg.decoder.vocab_size, (micro_batch, seq - cfg.vision.num_patches))
        if stage >= 2:
            tracker = FSDPMemTracker(model, optimizer)
        else:
            tracker = MemTracker()
            tracker.track_external(model, optimizer)
        tracker._param_to_grad_hook_handles = FrozenHasNoHooks()
        for step in range(2):  # each entry into the tracker restarts its peak: the second step's is reported
            with tracker:
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    _, loss = model(ids, pixels, labels=ids)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(trainable, 1.0)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            if step == 0:
                tracker.reset_mod_stats()
        (peak,) = tracker.get_tracker_snapshot("peak").values()
        # The innermost module running when the peak was reached, and in which pass.
        at = [(stats.mod_fqn, state.value) for stats in tracker.memory_tracking.values()
              for state, snaps in stats.snapshots.items() if state.value.startswith("Peak")
              for snap in snaps for dev_snap in snap.values() if dev_snap["Total"] == peak["Total"]]
    parts = {str(k).split(".")[-1]: v / 1e9 for k, v in peak.items() if v}
    print(f"stage {stage}, {'FSDP over %d ranks' % world if stage >= 2 else 'DDP replica'}, micro-batch "
          f"{micro_batch} x {seq}, {layers} layers: peak " + ", ".join(f"{k} {v:.2f}" for k, v in parts.items())
          + " GB" + (", in {} ({})".format(*max(at, key=lambda a: len(a[0]))) if at else ""))


class _NoHook:
    def remove(self) -> None:
        pass


class FrozenHasNoHooks:
    """torch's MemTracker hooks every parameter's gradient, and a frozen one cannot take a hook: report frozen
    parameters as already hooked (their memory is still counted, as parameters)."""

    def __init__(self):
        from torch.utils.weak import WeakIdKeyDictionary

        self.handles = WeakIdKeyDictionary()

    def get(self, param, default=None):
        return self.handles.get(param, default) if param.requires_grad else (_NoHook(), _NoHook())

    def __setitem__(self, param, value):
        self.handles[param] = value

    def values(self):
        return self.handles.values()

    def clear(self):
        self.handles.clear()


def front_image_splice(self, input_ids, pixel_values=None, attention_mask=None, labels=None, pad_left=False):
    """LlavaMed.splice for a batch whose image comes first (v1.5's layout) and that has no padding, without its
    data-dependent indexing (fake tensors hold no values): the same embeddings, minus splice's per-row copies."""
    import torch

    from minillavamed.config import IGNORE_INDEX

    text = self.decoder.embed(input_ids)
    features = self.image_features(pixel_values).to(text.dtype)
    embeds = torch.cat([features, text], 1)
    batch, length = embeds.shape[:2]
    labels = torch.cat([labels.new_full((batch, features.shape[1]), IGNORE_INDEX), labels], 1)
    positions = torch.arange(length)[None].expand(batch, length)
    return embeds, torch.ones(batch, length, dtype=torch.bool), positions, labels


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    ck = sub.add_parser("checkpoint", help="write a random bf16 checkpoint of the 7B shape")
    ck.add_argument("--out", type=Path, required=True)
    ck.add_argument("--layers", type=int, default=1, help="decoder layers (32 in the real model)")
    ck.add_argument("--tokenizer", type=Path, required=True, help="a tokenizer.model of at most 32000 pieces")
    rss = sub.add_parser("rss", help="train.py (from --code) with each process's peak RSS printed; train.py's "
                                     "arguments after --")
    rss.add_argument("--code", type=Path, default=ROOT, help="the checkout whose train.py runs")
    rss.add_argument("train_args", nargs=argparse.REMAINDER)
    gpu = sub.add_parser("gpu", help="GPU memory per rank under fake tensors")
    gpu.add_argument("--stage", type=int, choices=(1, 2), required=True)
    gpu.add_argument("--world", type=int, default=8, help="FSDP ranks (stage 2)")
    gpu.add_argument("--micro_batch", type=int, default=16)
    gpu.add_argument("--seq", type=int, default=2048, help="decoder positions per sample, the image's included")
    gpu.add_argument("--layers", type=int, default=32)
    a = parser.parse_args()
    if a.cmd == "checkpoint":
        write_checkpoint(a.out, a.layers, a.tokenizer)
    elif a.cmd == "rss":
        return run_train(a.code, [x for x in a.train_args if x != "--"])
    else:
        gpu_memory(a.stage, a.world, a.micro_batch, a.seq, a.layers)
    return 0


if __name__ == "__main__":
    sys.exit(main())
