"""The vision encoder of LLaVA-Med (paper §4): a CLIP ViT, read out at a chosen hidden layer.

LLaVA does not use CLIP's pooled output: it takes the hidden states after block `select_layer` (the
penultimate one by default), drops the class token, and hands the patch features to the projector. Layers
after the selected one never influence the output, so `forward` stops there; they are kept as parameters
only so that CLIP checkpoints load and export whole.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from minillavamed.attention import attention
from minillavamed.config import VisionConfig
from minillavamed.gemm import linear


class VisionAttention(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.heads = cfg.heads
        self.wqkv = nn.Linear(cfg.width, 3 * cfg.width)  # CLIP's q, k and v projections in one product
        self.wo = nn.Linear(cfg.width, cfg.width)

    def forward(self, x: torch.Tensor, backend: str) -> torch.Tensor:
        b, t, _ = x.shape
        q, k, v = linear(x, self.wqkv).view(b, t, 3, self.heads, -1).unbind(2)
        return linear(attention(q, k, v, causal=False, backend=backend).reshape(b, t, -1), self.wo)


class VisionBlock(nn.Module):
    """Pre-norm transformer block with CLIP's quick-GELU MLP."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.width, eps=cfg.norm_eps)
        self.attn = VisionAttention(cfg)
        self.norm2 = nn.LayerNorm(cfg.width, eps=cfg.norm_eps)
        self.fc1 = nn.Linear(cfg.width, cfg.mlp_dim)
        self.fc2 = nn.Linear(cfg.mlp_dim, cfg.width)

    def forward(self, x: torch.Tensor, backend: str) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), backend)
        h = linear(self.norm2(x), self.fc1)
        return x + linear(h * torch.sigmoid(1.702 * h), self.fc2)  # quick-GELU, what CLIP was trained with


class VisionTower(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.cfg = cfg
        # A Conv2d for CLIP's weight shape and init; embed_patches applies it as one product (see there).
        self.patch_embed = nn.Conv2d(cfg.channels, cfg.width, cfg.patch_size, stride=cfg.patch_size, bias=False)
        self.cls_token = nn.Parameter(torch.zeros(cfg.width))
        self.pos_embed = nn.Parameter(torch.zeros(cfg.num_patches + 1, cfg.width))
        self.pre_norm = nn.LayerNorm(cfg.width, eps=cfg.norm_eps)
        self.blocks = nn.ModuleList(VisionBlock(cfg) for _ in range(cfg.layers))
        self.post_norm = nn.LayerNorm(cfg.width, eps=cfg.norm_eps)
        # hidden_states[i] is the output of i blocks (0: the normalized embeddings), so select_layer=-2
        # of 24 blocks means running 23 of them.
        self.n_run = cfg.select_layer if cfg.select_layer >= 0 else cfg.layers + 1 + cfg.select_layer
        self.requires_grad_()  # freezes what never runs (below)
        self.backend = "sdpa"

    def requires_grad_(self, requires_grad: bool = True) -> "VisionTower":
        """nn.Module's, except that the blocks past the selected layer and the post-norm, which never reach the
        output, stay frozen whatever is asked: they get no gradient, and DDP would wait for one."""
        super().requires_grad_(requires_grad)
        for p in [*self.blocks[self.n_run:].parameters(), *self.post_norm.parameters()]:
            p.requires_grad_(False)
        return self

    def embed_patches(self, pixels: torch.Tensor) -> torch.Tensor:
        """(batch, 3, H, W) -> (batch, num_patches, width): CLIP's patch convolution, row-major patch order.

        A convolution whose stride equals its kernel is one product over the flattened non-overlapping patches,
        and a CPU runs that product faster than oneDNN's convolution (bench/RESULTS.md, "Speed choices").
        """
        b, c, height, width = pixels.shape
        p = self.cfg.patch_size
        patches = pixels.view(b, c, height // p, p, width // p, p).permute(0, 2, 4, 1, 3, 5)
        patches = patches.reshape(b, (height // p) * (width // p), c * p * p)
        return F.linear(patches, self.patch_embed.weight.flatten(1))

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(batch, 3, H, W) pixels -> (batch, num_patches, width) features of the selected layer."""
        x = self.embed_patches(pixel_values.to(self.patch_embed.weight.dtype))
        cls = self.cls_token.expand(x.shape[0], 1, -1)
        x = self.pre_norm(torch.cat([cls, x], dim=1) + self.pos_embed)
        for block in self.blocks[: self.n_run]:
            x = block(x, self.backend)
        return x[:, 1:] if self.cfg.select_feature == "patch" else x
