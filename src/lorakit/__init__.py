"""lorakit: LoRA and QLoRA fine-tuning in PEFT's file format."""

import os as _os
import sys as _sys

# CPU tensors of 2 MiB and more on transparent huge pages (torch's allocator: 2 MiB-aligned and
# madvise(MADV_HUGEPAGE)). torch reads the variable once, at its import, so this takes effect where
# lorakit comes first: every `lorakit` command, and scripts that import lorakit before torch. On
# SmolLM2-135M CPU runs the peak RSS drops by 0.2-0.4 GB at the same speed (bench/README.md,
# session 9). THP_MEM_ALLOC_ENABLE=0 in the environment keeps torch's default.
if "torch" not in _sys.modules:
    _os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

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
