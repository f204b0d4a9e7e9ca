"""The optimizer's parameter groups, LoRA+ included.

LoRA+ (Hayou et al. 2024, "LoRA+: Efficient Low Rank Adaptation of Large Models"): with A and B at
one learning rate, B learns too slowly when the model is wide; B's learning rate should be a
multiple of A's,

    lr_B = ratio · lr,   lr_A = lr      (the paper's ratio: 2^4 = 16)

Here B is every adapter's `lora_B` / `lora_embedding_B`; everything else that trains (A, DoRA
magnitudes, biases, modules_to_save copies) keeps lr. (peft's create_loraplus_optimizer also puts
1-D parameters such as DoRA magnitudes and biases in B's group and gives embedding adapters a
separate learning rate; lorakit keeps the paper's split.)
"""

from __future__ import annotations

from torch import nn


def is_lora_b(parameter_name: str) -> bool:
    """Is this parameter (by its name in the model) an adapter's B matrix?"""
    return ".lora_B." in parameter_name or ".lora_embedding_B." in parameter_name


def parameter_groups(model: nn.Module, lr: float, weight_decay: float,
                     loraplus_ratio: float | None = None) -> list[dict]:
    """The optimizer's parameter groups over the model's trainable parameters, in model order
    within each group: one group at `lr`, or with `loraplus_ratio` (LoRA+) a second group of the
    B matrices at lr × loraplus_ratio. Every group has `weight_decay`."""
    if loraplus_ratio is not None and (isinstance(loraplus_ratio, bool) or not isinstance(loraplus_ratio, (int, float))
                                       or not loraplus_ratio > 0):
        raise ValueError(f"loraplus_ratio={loraplus_ratio!r}: must be a number > 0 (typical: 16), or None for off")
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if loraplus_ratio is None:
        return [{"params": [p for _, p in trainable], "lr": lr, "weight_decay": weight_decay}]
    groups = [{"params": [p for n, p in trainable if not is_lora_b(n)], "lr": lr, "weight_decay": weight_decay},
              {"params": [p for n, p in trainable if is_lora_b(n)], "lr": lr * loraplus_ratio,
               "weight_decay": weight_decay}]
    if not groups[1]["params"]:
        raise ValueError(f"loraplus_ratio={loraplus_ratio!r}: no adapter B matrix trains in this model "
                         "(LoRA+ applies to LoRA adapters; with method full leave it unset)")
    return [g for g in groups if g["params"]]
