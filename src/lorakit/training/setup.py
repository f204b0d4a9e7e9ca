"""Setting a run up: the base model and its adapters, the data, and what is checked before any
weight is read (the data, the LoRA rank, the memory plan)."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch

from .. import distributed
from ..config import BUILTIN_PREFIX, ConfigError, RunConfig
from ..data import DataError, Dataset, build_dataset, pack, read_data, split_validation
from ..dtypes import to_torch
from ..inject import add_lora


@dataclass
class Prepared:
    """A run's inputs: the model to train (adapters added), its tokenizer and the data."""

    model: torch.nn.Module
    tokenizer: object
    train: Dataset
    validation: Dataset | None
    test: Dataset | None


def load_base(config: RunConfig, lazy: bool = False):
    """(model, tokenizer, fill) for the run's base model. lazy: the model is still on the meta
    device and fill(part) loads it part by part (models.CheckpointLoader), for FSDP to shard each
    part as it arrives; otherwise it is loaded and fill is None."""
    from ..models import CheckpointLoader, load_model, load_tokenizer, resolve_model_dir

    dtype, quantize = to_torch(config.model.dtype), config.quantize
    if lazy:
        path = resolve_model_dir(config.model.path)
        loader = CheckpointLoader(path, dtype, quantize)
        return loader.model.eval(), load_tokenizer(path), loader.fill
    return *load_model(config.model.path, dtype=dtype, quantize=quantize), None


def prepare_model(model: torch.nn.Module, config: RunConfig) -> torch.nn.Module:
    """The base made trainable as config.method says: adapters added (LoRA, QLoRA) or every weight
    trained (full); gradient checkpointing switched on where asked."""
    from ..models import DEFAULT_MODEL

    if config.method == "full":
        model.requires_grad_(True)
    else:
        add_lora(model, config.lora.lora_config(base_model=config.model.path or DEFAULT_MODEL))
    if config.train.gradient_checkpointing:
        model.activation_checkpointing_enable({"use_reentrant": False})
        model.config.use_cache = False
        if config.method != "full":
            model.enable_input_require_grads()  # frozen embeddings: let gradients reach the adapters
    return model


def prepare(config: RunConfig, tokenizer, data: tuple, ctx: distributed.Context):
    """(Prepared, fill): the base loaded and prepared for training. Under FSDP the base stays on the
    meta device and fill(part) loads it part by part while distributed.wrap shards it: no rank ever
    holds the whole model (fill is None otherwise)."""
    model, _, fill = load_base(config, lazy=ctx.active and config.train.strategy == "fsdp")
    torch.manual_seed(config.train.seed)  # the same adapter initialisation on every rank, however loaded
    prepare_model(model, config)
    return Prepared(model, tokenizer, *data), fill


def load_data(config: RunConfig, tokenizer) -> tuple[Dataset, Dataset | None, Dataset | None]:
    """(train, validation, test) as config.data says: files or built-in tasks, tokenized; without
    data.validation, a seeded data.validation_fraction of the training records is held out."""
    d = config.data

    def records(key: str, split: str):
        try:
            return read_data(getattr(d, key), split, d.n_train, d.n_test)
        except DataError as e:
            raise DataError(f"data.{key}: {e}") from None

    train_records = records("train", "train")
    if d.validation:
        val_records = records("validation", "train")
    else:
        n = len(train_records)
        train_records, val_records = split_validation(train_records, d.validation_fraction, config.train.seed)
        if not train_records:
            raise DataError(f"data.train={d.train}: its {n} record(s) all go to validation "
                            f"(data.validation_fraction={d.validation_fraction} holds out at least one), "
                            "none is left to train on; add records, give data.validation, or set "
                            "data.validation_fraction=0")
    test_key = "test" if d.test else ("train" if d.train.startswith(BUILTIN_PREFIX) else None)
    test_records = records(test_key, "test") if test_key else []

    def build(rows):
        return build_dataset(rows, tokenizer, d.format, d.max_length, d.train_on_inputs) if rows else None

    train = build(train_records)
    if d.packing:
        train = pack(train, d.max_length)
    return train, build(val_records), build(test_records)


def check_data(config: RunConfig, train: Dataset, validation: Dataset | None, world: int = 1) -> None:
    """What the run needs of its data, checked before the model loads (every problem at once)."""
    d, t = config.data, config.train
    problems = []
    if train.supervised_tokens == 0:
        problems.append(f"data.train: none of its {len(train.examples)} examples has a token left to learn "
                        f"(0 supervised tokens; {train.truncated} cut at data.max_length={d.max_length}): "
                        "raise data.max_length, shorten the prompts, or set data.train_on_inputs=true")
    if validation is not None and validation.supervised_tokens == 0:
        problems.append(f"validation: none of its {len(validation.examples)} examples has a token to score "
                        f"(0 supervised tokens; {validation.truncated} cut at data.max_length={d.max_length}), "
                        "so there is no held-out loss: raise data.max_length or shorten the prompts")
    batch = t.batch_size * world
    if len(train.examples) < batch:
        held = f" (after holding out {len(validation.examples)} for validation)" if validation and not d.validation else ""
        problems.append(f"{len(train.examples)} training examples{held} is fewer than one batch of {batch} "
                        f"(train.batch_size={t.batch_size}" + (f" x {world} ranks" if world > 1 else "")
                        + "): lower train.batch_size or add data")
    if problems:
        raise ConfigError("training data", problems)


def skeleton(config: RunConfig) -> torch.nn.Module:
    """The base model on the meta device: its modules and shapes, with no weights read."""
    from transformers import AutoModelForCausalLM

    from ..models import load_config, resolve_model_dir

    model_config = load_config(resolve_model_dir(config.model.path))
    if hasattr(model_config, "quantization_config"):  # a 4-bit checkpoint: the shapes are those of the layers
        del model_config.quantization_config
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(model_config)


def check_rank(model: torch.nn.Module, config: RunConfig, device: torch.device, log) -> None:
    """lora.r against the layers it adapts, before any weight is loaded (`model` may be a skeleton).

    A layer W: (out, in) has rank at most min(in, out), so a larger r adds parameters but no
    capacity: a warning. Adapters that cannot fit the device's memory at all are an error, instead
    of an allocation failure after the base has loaded.
    """
    from ..inject import resolve_targets
    from ..planner import GiB

    if config.method == "full":
        return
    r = config.lora.r
    shapes = {name: _in_out(model.get_submodule(name)) for name in resolve_targets(model, config.lora.lora_config())}
    # float32 A and B, their gradients and AdamW's two moments: 16 bytes per parameter
    parameters = sum(r * (n_in + n_out) for n_in, n_out in shapes.values())
    largest = max(min(s) for s in shapes.values())
    total = (torch.cuda.get_device_properties(device).total_memory if device.type == "cuda"
             else os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    if 16 * parameters > total:
        raise ValueError(f"lora.r={r}: the adapters alone would need {16 * parameters / GiB:,.1f} GiB "
                         f"({parameters:,} parameters over {len(shapes)} layers, with gradients and AdamW "
                         f"states) but the {device.type} has {total / GiB:.1f} GiB; a layer here can use "
                         f"a rank of at most {largest} (min(in, out) of its weight)")
    narrow = {name: s for name, s in shapes.items() if r > min(s)}
    if narrow:
        name, (n_in, n_out) = next(iter(narrow.items()))
        log(f"warning: lora.r={r} is more than {len(narrow)} of the {len(shapes)} adapted layers can use: "
            f"a weight (out, in) has rank at most min(in, out) (e.g. {name}: {n_in} -> {n_out}, at most "
            f"{min(n_in, n_out)}); the extra rank adds parameters and memory, not capacity: lower lora.r "
            f"to {min(min(s) for s in shapes.values())} or less")


def _in_out(module: torch.nn.Module) -> tuple[int, int]:
    if isinstance(module, torch.nn.Embedding):
        return module.num_embeddings, module.embedding_dim
    if hasattr(module, "in_features"):
        return module.in_features, module.out_features
    n_in, n_out = module.weight.shape  # transformers' Conv1D keeps its weight as (in, out)
    return n_in, n_out


def lr_lambda(config: RunConfig):
    """Linear warm-up to the peak, then cosine / linear decay to 0 (or constant)."""
    t = config.train

    def factor(step: int) -> float:
        if step < t.warmup_steps:
            return (step + 1) / t.warmup_steps
        progress = (step - t.warmup_steps) / max(1, t.steps - t.warmup_steps)
        if t.schedule == "cosine":
            return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
        if t.schedule == "linear":
            return max(0.0, 1 - progress)
        return 1.0

    return factor


def optimizer_and_schedule(model: torch.nn.Module, config: RunConfig):
    """(the trainable parameters, AdamW over them, the learning-rate schedule of lr_lambda)."""
    t = config.train
    params = [p for p in model.parameters() if p.requires_grad]
    # fused: one kernel for the whole update (0.26x the time of foreach on the adapters,
    # bench/README.md); FSDP's DTensor shards take the foreach path
    optimizer = torch.optim.AdamW(params, lr=t.lr, weight_decay=t.weight_decay,
                                  **({"foreach": True} if distributed.sharded(model) else {"fused": True}))
    return params, optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(config))


def memory_check(model, config: RunConfig, log, device: torch.device, n_gpus: int = 1) -> int | None:
    """Run the planner for this run and warn when the step will not fit the device; returns the
    predicted peak in bytes (None when the planner does not know the architecture). n_gpus > 1:
    FSDP sharding over that many ranks (DDP replicates: plan it with n_gpus=1)."""
    from ..planner import GiB, arch_from_config, available_memory, device_warning, memory_plan_line, plan_run

    try:
        p = plan_run(config, arch_from_config(model.config.to_dict()), "cuda" if device.type == "cuda" else "cpu",
                     n_gpus)
    except (ValueError, KeyError, AttributeError) as e:  # an architecture or setup it does not model
        log(f"memory plan: skipped ({e})")
        return None
    available = available_memory(device)
    log(memory_plan_line(p, available, device.type))
    warning = device_warning(p, available / GiB)
    if warning:
        log(warning)
    return p.peak

