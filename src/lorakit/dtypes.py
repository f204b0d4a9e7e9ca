"""The floating-point dtypes a run may use, under one set of names shared by every command.

Names are torch's own ("float32", "bfloat16", "float16"): what `model.dtype` takes in a run config,
what `--dtype` takes on the command line and what safetensors headers and transformers configs
write. The short forms fp32 / bf16 / fp16 (the planner's and most papers') are accepted aliases.
"""

from __future__ import annotations

import torch

DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
NAMES = tuple(DTYPES)
ALIASES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
BYTES = {name: dtype.itemsize for name, dtype in DTYPES.items()}  # 4, 2, 2


def canonical(name: str) -> str:
    """The dtype's name in lorakit's vocabulary ("bf16" -> "bfloat16"); ValueError naming the choices."""
    name = ALIASES.get(name, name) if isinstance(name, str) else name
    if name not in DTYPES:
        raise ValueError(f"dtype {name!r}: valid choices are {', '.join(NAMES)} "
                         f"(or {', '.join(ALIASES)})")
    return name


def to_torch(name: str) -> torch.dtype:
    """torch.float32 for "float32" (or "fp32"), and so on."""
    return DTYPES[canonical(name)]


def name_of(dtype: torch.dtype) -> str:
    """"bfloat16" for torch.bfloat16; ValueError for a dtype lorakit does not train in."""
    for name, candidate in DTYPES.items():
        if candidate == dtype:
            return name
    raise ValueError(f"dtype {dtype}: valid choices are {', '.join(NAMES)}")
