"""The projection layer of LLaVA-Med (paper §4): vision features -> the language model's word embeddings.

LLaVA-Med v1 uses one linear layer (paper Eq. 1); v1.5 uses `mlp2x_gelu`, two linear layers with a GELU
between. In general `mlp{N}x_gelu` stacks N linear layers with GELUs between, as LLaVA's builder does. In
stage 1 (biomedical concept alignment) this is the only part that trains.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from minillavamed.config import ProjectorConfig
from minillavamed.gemm import linear


class Projector(nn.Module):
    def __init__(self, cfg: ProjectorConfig, vision_width: int, text_dim: int):
        super().__init__()
        self.linears = nn.ModuleList(
            nn.Linear(vision_width if i == 0 else text_dim, text_dim) for i in range(cfg.depth)
        )

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        x = linear(features, self.linears[0])
        for layer in self.linears[1:]:
            x = linear(F.gelu(x), layer)  # exact (erf) GELU, as nn.GELU() in LLaVA's builder
        return x
