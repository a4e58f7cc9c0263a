"""Activation checkpointing: transformer blocks that keep no activations for the backward pass.

A model whose `activation_checkpointing` attribute is true runs each of its blocks through
`torch.utils.checkpoint` (non-reentrant) whenever gradients are being recorded: the forward pass keeps
only each block's input, and the backward pass runs the block's forward again to get the rest. Peak
memory then grows with the number of blocks times one block's input instead of times everything
inside a block, for about one more forward pass of compute. Gradients are the same (the recomputed
forward is the same computation; dropout masks are replayed from the saved RNG state).

Frozen blocks are checkpointed too: their activations are needed as long as anything before them trains
(e.g. the connector under a frozen LM).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint


def run_block(owner: nn.Module, block: nn.Module, *args: Any) -> Any:
    """``block(*args)``, checkpointed when `owner` asks for it and gradients are being recorded."""
    if getattr(owner, "activation_checkpointing", False) and torch.is_grad_enabled():
        return checkpoint(block, *args, use_reentrant=False)
    return block(*args)


def set_activation_checkpointing(model: nn.Module, enabled: bool = True) -> list[str]:
    """Switch checkpointing on (or off) in every part of `model` that supports it (the LM, the ViT, a
    text tower); returns those parts' names."""
    parts = [name or type(model).__name__ for name, module in model.named_modules()
             if hasattr(module, "activation_checkpointing")]
    for module in model.modules():
        if hasattr(module, "activation_checkpointing"):
            module.activation_checkpointing = enabled
    return parts
