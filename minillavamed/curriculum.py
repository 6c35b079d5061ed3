"""The curriculum of LLaVA-Med (paper §4.1, Fig. 3): what each stage trains, and with which recipe.

  stage 0  general-domain base (tiny preset only): everything trains on everyday images and text;
           it stands in for the general LLaVA that LLaVA-Med starts from.
  stage 1  biomedical concept alignment: figure-caption pairs, `plain` template; only the projector trains.
  stage 2  instruction tuning: GPT-4-written conversations; projector + language model train.
  stage 3  VQA fine-tuning (VQA-RAD, SLAKE, PathVQA): as stage 2, on question-answer data.

train.py runs one stage per call with these defaults; bench/train_speed.py measures a stage with the same
choice of what trains, so that its MFU is the one a run logs.
"""

from __future__ import annotations

import torch

from minillavamed.llava import LlavaMed

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
    # The stage-0 decoder writes legends from notes in a chat turn (synthetic.text_conversation), so stage 1
    # keeps the sampled instruction in that template, as LLaVA-Med v1's stage 1 did (`plain` drops it).
    # Three epochs of 12,000 pairs (after one, at batch 32, its captions stated lesions, sides and sizes at
    # chance), in batches of 8: four times the steps of batches of 32 in about the same time, since only the
    # projector's update is added, and 2.4 points more closed after stage 2 (the README's table, two seeds).
    1: dict(epochs=3.0, lr=5e-3, global_batch=8, micro_batch=8, conv=None),
    # A twenty-fifth of stage 1's rate (the paper's is a hundredth): at 1e-3 stage 2 overwrote what stage 1
    # aligned and scored as if it had started without it; at 5e-4 it no longer named a caption-only concept.
    # Five epochs of 1,200 conversations: as many steps as ten of 600, which scored 3 points lower closed.
    2: dict(epochs=5.0, lr=2e-4, global_batch=32),
    3: dict(epochs=3.0, lr=1e-4, global_batch=32),
}
# The tiny stages pack each micro-batch into one row: the same samples and losses as padded rows, and a
# stage-2 step a third shorter on a CPU (bench/RESULTS.md). The paper's stages pad, as LLaVA-Med does.
for _stage in TINY_STAGES.values():
    _stage.update(max_len=256, micro_batch=_stage.get("micro_batch", 16), pack=True)
for _stage in STAGES.values():
    _stage.update(max_len=2048, micro_batch=16, pack=False)

# Dense bf16 peak of the GPUs a run may land on, the denominator of MFU.
PEAK_TFLOPS = {"A100": 312.0, "H100": 989.0, "H200": 989.0, "L40S": 362.0, "A10G": 125.0}


def set_trainable(model: LlavaMed, stage: int) -> None:
    """Which parts learn in each stage (paper §4.1); the vision tower is frozen after stage 0 (its blocks past
    the selected layer always are: VisionTower.requires_grad_)."""
    model.requires_grad_(False)
    parts = {0: [model.vision, model.projector, model.decoder], 1: [model.projector]}.get(
        stage, [model.projector, model.decoder])
    for part in parts:
        part.requires_grad_(True)


def peak_tflops(device: torch.device) -> float:
    """PEAK_TFLOPS of the GPU `device` is, found by its name; 0 when unknown (or not a GPU): no MFU then."""
    if device.type != "cuda":
        return 0.0
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_TFLOPS.items() if k in name), 0.0)
