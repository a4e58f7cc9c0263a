"""The `optim` section's memory and speed options, applied to a stage's model once its trainable parts
are set: LoRA adapters (`optim.lora`), activation checkpointing (`optim.activation_checkpointing`)
and torch.compile (`optim.compile`). Sample packing (`data.packing`) is the collate function's job."""

from __future__ import annotations

import logging

from torch import nn

from vlmkit.models.lora import add_lora, trainable_parameters
from vlmkit.models.memory import set_activation_checkpointing
from vlmkit.train.config import OptimConfig

log = logging.getLogger("vlmkit.train")


def prepare_model(model: nn.Module, optim: OptimConfig) -> None:
    """Add adapters, switch on checkpointing; `compile_model` comes after the model is on its device."""
    lora = optim.lora_settings()
    if lora is not None:
        targets = add_lora(model, lora.target_modules, lora.r, lora.alpha, lora.dropout)
        trainable, total = trainable_parameters(model)
        log.info("LoRA r=%d alpha=%g on %d linear layers: %.2fM of %.2fM parameters train (%.2f%%)", lora.r,
                 lora.alpha, len(targets), trainable / 1e6, total / 1e6, 100 * trainable / total)
    if optim.activation_checkpointing and not set_activation_checkpointing(model):
        log.warning("optim.activation_checkpointing: the %s has no checkpointable blocks", type(model).__name__)


def compile_model(model: nn.Module, optim: OptimConfig) -> None:
    """torch.compile every transformer block in place (names and state dicts are unchanged).

    Blocks rather than whole models: the blocks of a stack share one compiled graph (their weights are
    its inputs), so compiling takes one block's time, and the glue between them (embedding, image
    splicing, the loss) stays eager. Sequence lengths that vary from batch to batch make the second
    shape compile a graph for any length."""
    if not optim.compile:
        return
    for owner in model.modules():
        if hasattr(owner, "activation_checkpointing"):  # the LM, the ViT, a text tower
            for stack in owner.children():
                if isinstance(stack, nn.ModuleList):
                    for block in stack:
                        block.compile()
