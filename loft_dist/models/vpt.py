"""VPT-deep: learnable prompt tokens enter each chosen block after the CLS token and leave at its output.

Prompts carry no positional embedding, so where they sit in the sequence does not change the result;
LIFT appends them at the end, we put them after CLS — the CLS feature is the same either way.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn as nn
from open_clip.transformer import Transformer
from torch.utils.checkpoint import checkpoint


class PromptedTransformer(Transformer):
    """open_clip's Transformer whose block i sees `vpt_prompts[row(i)]` between CLS and the patch tokens.

    Made by retyping the tower's transformer (`add_deep_prompts`) so every pretrained parameter keeps its name.
    """

    vpt_prompts: nn.Parameter
    vpt_layers: list  # block index of each prompt row

    def forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        if attn_mask is not None:
            raise ValueError("VPT prompts change the sequence length; an attention mask cannot be applied")
        rows = {layer: row for row, layer in enumerate(self.vpt_layers)}
        n = self.vpt_prompts.shape[1]
        for i, block in enumerate(self.resblocks):
            row = rows.get(i)
            if row is not None:
                p = self.vpt_prompts[row].to(x.dtype).expand(x.shape[0], -1, -1)
                x = torch.cat([x[:, :1], p, x[:, 1:]], dim=1)
            y = x if self.batch_first else x.transpose(0, 1)
            if self.grad_checkpointing and not torch.jit.is_scripting():
                y = checkpoint(block, y, None, None, None, use_reentrant=False)
            else:
                y = block(y)
            x = y if self.batch_first else y.transpose(0, 1)
            if row is not None:
                x = torch.cat([x[:, :1], x[:, 1 + n:]], dim=1)
        return x


def add_deep_prompts(visual: nn.Module, n_tokens: int, layers: list[int]) -> PromptedTransformer:
    """Give the tower's transformer `n_tokens` prompts per listed block, in place; returns the transformer."""
    transformer = visual.transformer
    if type(transformer) is not Transformer:
        raise TypeError(f"peft.method=vpt needs open_clip's Transformer in the image tower, got "
                        f"{type(transformer).__name__}")
    ref = visual.conv1.weight
    patch = math.prod(visual.conv1.kernel_size)
    # VPT's (and LIFT's) init: uniform(±sqrt(6 / (3 * patch_area + d))), Xavier over the patch embedding's fan.
    bound = math.sqrt(6.0 / (3 * patch + transformer.width))
    prompts = torch.empty(len(layers), n_tokens, transformer.width, dtype=ref.dtype, device=ref.device)
    nn.init.uniform_(prompts, -bound, bound)
    transformer.__class__ = PromptedTransformer
    transformer.vpt_prompts = nn.Parameter(prompts)
    transformer.vpt_layers = list(layers)
    return transformer
