"""What the run-level commands share: finding the base model and adapter a user points at."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from lorakit import dtypes


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1 (argparse reports `argument --x: ...` and exits 2)."""
    import argparse

    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {value}")
    return value


def temperature(text: str) -> float:
    """argparse type: a sampling temperature, 0 (greedy) or a finite number > 0."""
    import argparse
    import math

    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not (math.isfinite(value) and value >= 0):
        raise argparse.ArgumentTypeError(f"{text} is not a temperature: 0 for greedy decoding, or a number > 0 "
                                         "to sample (e.g. 0.7)")
    return value


def new_output_dir(path: str) -> Path:
    """--out as a Path; an existing one is an error (commands that write models never overwrite)."""
    out = Path(path)
    if out.exists():
        raise ValueError(f"--out {out} already exists; choose a new directory (nothing is overwritten)")
    return out


@dataclass
class Source:
    model: str | None      # base model path or name (None: the default model)
    adapter: Path | None
    quantize: str | None   # "nf4" when the adapter was trained on a 4-bit base (QLoRA)
    dtype: str


def add_model_arguments(p, adapter_required: bool = False) -> None:
    p.add_argument("--model", help="base model directory (default: the adapter's base model, else SmolLM2-135M-Instruct)")
    p.add_argument("--adapter", required=adapter_required,
                   help="adapter directory, or a lorakit run directory (its adapter/ and config.yaml)")
    p.add_argument("--quantize", choices=("none", "nf4"), default=None,
                   help="load the base in NF4 (default: as the run was trained)")
    p.add_argument("--dtype", choices=dtypes.NAMES, default=None, help="base dtype (default: as trained, else float32)")


def resolve_source(args) -> Source:
    """Read a run directory's config.yaml (if given one) for the base model, its quantization and
    dtype; explicit flags win."""
    from lorakit.adapter_io import read_adapter_config
    from lorakit.config import RunConfig, load_yaml

    model, quantize, dtype, adapter = None, None, None, None
    if args.adapter:
        adapter = Path(args.adapter)
        if (adapter / "config.yaml").is_file() and (adapter / "adapter").is_dir():
            run = RunConfig.from_dict(load_yaml((adapter / "config.yaml").read_text()))
            model, quantize, dtype = run.model.path, run.quantize, run.model.dtype
            adapter = adapter / "adapter"
        elif not (adapter / "adapter_config.json").is_file():
            raise ValueError(f"--adapter {adapter}: neither an adapter directory (adapter_config.json) "
                             "nor a lorakit run directory (config.yaml + adapter/)")
        model = model or read_adapter_config(adapter).base_model
    return Source(model=args.model or model, adapter=adapter,
                  quantize=(args.quantize or quantize or "none"), dtype=args.dtype or dtype or "float32")


def load(source: Source):
    """(model, tokenizer) with the adapter applied (not merged)."""
    from lorakit.adapter_io import load_adapter, read_adapter_tensors
    from lorakit.models import load_model

    if source.adapter:
        read_adapter_tensors(source.adapter)  # a broken adapter is refused before the model loads
    model, tokenizer = load_model(source.model, dtype=dtypes.to_torch(source.dtype),
                                  quantize=None if source.quantize == "none" else source.quantize)
    if source.adapter:
        load_adapter(model, source.adapter)
    return model, tokenizer
