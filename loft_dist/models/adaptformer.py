"""AdaptFormer (SPEC A.0.1): a bottleneck branch parallel to each block's MLP, as in the released LoFT/LIFT code.

Per adapted block, with h = x + ls_1(Attn(LN1(x))):
    out = h + ls_2(MLP(LN2(h))) + s * up(ReLU(down(LN(h))))
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn as nn
from open_clip.transformer import ResidualAttentionBlock


def auto_bottleneck(num_classes: int, n_layers: int) -> int:
    """r = 2 ** max(0, int(log2(C / (2 * n_layers)))): the released code's rule when no dimension is given."""
    return 2 ** max(0, int(math.log2(num_classes / (2 * n_layers))))


class AdaptFormer(nn.Module):
    """s * up(ReLU(down(LN(h)))); up starts at zero so the adapted block starts as the frozen one."""

    def __init__(self, dim: int, r: int, scale_init: float = 1.0, dtype: Optional[torch.dtype] = None,
                 device: Optional[torch.device] = None):
        super().__init__()
        kw = {"dtype": dtype, "device": device}
        self.ln = nn.LayerNorm(dim, **kw)
        self.down_proj = nn.Linear(dim, r, **kw)
        self.up_proj = nn.Linear(r, dim, **kw)
        self.scale = nn.Parameter(torch.full((1,), float(scale_init), **kw))
        nn.init.kaiming_normal_(self.down_proj.weight, a=math.sqrt(5))
        nn.init.zeros_(self.down_proj.bias)
        nn.init.zeros_(self.up_proj.weight)
        nn.init.zeros_(self.up_proj.bias)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.scale * self.up_proj(torch.relu(self.down_proj(self.ln(h))))


class AdaptFormerBlock(ResidualAttentionBlock):
    """open_clip's ResidualAttentionBlock with the AdaptFormer branch; same signature, layer scale and masks.

    Made by retyping an existing block (`add_adaptformer`) rather than wrapping it, so the pretrained
    parameter names (`resblocks.N.attn…`) stay where open_clip, peft and state dicts expect them.
    """

    adaptformer: AdaptFormer

    def forward(self, q_x: torch.Tensor, k_x: Optional[torch.Tensor] = None, v_x: Optional[torch.Tensor] = None,
                attn_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        k_x = self.ln_1_kv(k_x) if hasattr(self, "ln_1_kv") and k_x is not None else None
        v_x = self.ln_1_kv(v_x) if hasattr(self, "ln_1_kv") and v_x is not None else None
        h = q_x + self.ls_1(self.attention(q_x=self.ln_1(q_x), k_x=k_x, v_x=v_x, attn_mask=attn_mask))
        return h + self.ls_2(self.mlp(self.ln_2(h))) + self.adaptformer(h)


def add_adaptformer(block: nn.Module, r: int, scale_init: float = 1.0) -> AdaptFormerBlock:
    """Give one open_clip block an AdaptFormer branch in place; returns the same object."""
    if type(block) is not ResidualAttentionBlock:
        raise TypeError(f"peft.method=adaptformer needs open_clip ResidualAttentionBlock blocks, got "
                        f"{type(block).__name__} (models with qk_norm / scaled attention use custom blocks)")
    ref = block.mlp.c_fc.weight
    adapter = AdaptFormer(block.ln_2.normalized_shape[0], r, scale_init, dtype=ref.dtype, device=ref.device)
    block.__class__ = AdaptFormerBlock
    block.adaptformer = adapter
    return block
