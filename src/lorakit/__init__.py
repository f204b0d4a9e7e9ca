"""lorakit: LoRA and QLoRA fine-tuning in PEFT's file format."""

from .adapter_io import load_adapter, save_adapter
from .config import ConfigError, LoraConfig
from .hf_trainer import ChunkedLoss
from .inject import (
    active_adapters,
    add_lora,
    adapter_configs,
    combine_adapters,
    delete_adapter,
    disable_adapters,
    merge,
    merge_and_unload,
    set_adapter,
    trainable_parameters,
    unmerge,
)

__version__ = "0.1.0"

__all__ = [
    "ChunkedLoss",
    "ConfigError",
    "LoraConfig",
    "active_adapters",
    "add_lora",
    "adapter_configs",
    "combine_adapters",
    "delete_adapter",
    "disable_adapters",
    "load_adapter",
    "merge",
    "merge_and_unload",
    "save_adapter",
    "set_adapter",
    "trainable_parameters",
    "unmerge",
]
