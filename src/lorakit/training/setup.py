"""Setting a run up: the base model and its adapters, the data, and what is checked before any
weight is read (the data, the LoRA rank, the memory plan)."""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass

import torch

from .. import distributed
from ..config import BUILTIN_PREFIX, MAX_LENGTH_AUTO_CAP, ConfigError, RunConfig
from ..data import (HF_PREFIX, PADDING_HINT, DataError, Dataset, auto_max_length, build_dataset, derive_max_new_tokens,
                    map_columns, pack, padding_share, read_data, split_validation)
from ..dtypes import to_torch
from ..inject import add_lora, resolve_targets
from ..optim import parameter_groups
from ..surgery import DEFAULT_LAYERS_PATTERNS


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
    if config.method == "qlora" and config.lora.init == "loftq":
        # LoftQ quantizes the layers it adapts itself, from their full-precision weights
        # (prepare_model); the base is read in full precision first
        if lazy:
            raise ValueError("lora.init=loftq needs every adapted weight in full precision on one process to "
                             "quantize it, but train.strategy=fsdp loads the base part by part: use "
                             "train.strategy=ddp (or one process), or another lora.init")
        quantize = None
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
        lora = config.lora.lora_config(base_model=config.model.path or DEFAULT_MODEL)
        if config.method == "qlora" and lora.init == "loftq":
            _quantize_all_but(model, set(resolve_targets(model, lora)), to_torch(config.model.dtype))
        add_lora(model, lora)
    if config.train.gradient_checkpointing:
        model.activation_checkpointing_enable({"use_reentrant": False})
        model.config.use_cache = False
        if config.method != "full":
            model.enable_input_require_grads()  # frozen embeddings: let gradients reach the adapters
    return model


def decoder_blocks(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The decoder blocks of `model`, in order: the modules named <container>.<i> whose container is
    one of surgery.DEFAULT_LAYERS_PATTERNS ("model.layers.3", GPT-2's "transformer.h.3"), as
    surgery.layer_index reads block indices; a numbered module inside a block (a mixture of experts'
    "experts.0") is part of its block, not a block."""
    blocks: list[tuple[str, torch.nn.Module]] = []
    for name, module in model.named_modules():  # parents before their children
        parts = name.split(".")
        numbered = len(parts) >= 2 and parts[-2] in DEFAULT_LAYERS_PATTERNS and parts[-1].isdigit()
        if numbered and not (blocks and name.startswith(blocks[-1][0] + ".")):
            blocks.append((name, module))
    return [module for _, module in blocks]


def compile_blocks(model: torch.nn.Module) -> int:
    """train.compile: each decoder block of `model` compiled in place (nn.Module.compile: the block
    keeps its parameters, so names, state-dict keys and checkpoints stay those of the eager model);
    returns how many. Blocks of one class share their compiled graphs (their parameters are inputs
    to them): a model compiles a few graphs (one per input shape, and one more for the first block,
    whose input needs no gradient under LoRA), not one per block.

    Compilation happens at a block's first call. Inductor compiles with one thread unless
    TORCHINDUCTOR_COMPILE_THREADS says otherwise: no pool of compile worker processes outlives the
    run (bench/compile_step.py measured the compile cost this way). Inductor reads the variable when
    it is imported, which transformers has done by now, so its setting is set too. A model without
    decoder blocks is an error rather than one whole-model graph, which would take the loss in.
    """
    import torch._inductor.config

    blocks = decoder_blocks(model)
    if not blocks:
        raise ValueError(f"train.compile=true: {type(model).__name__} has no decoder blocks to compile (numbered "
                         f"modules in a container named {', '.join(DEFAULT_LAYERS_PATTERNS)}); "
                         "set train.compile=false")
    torch._inductor.config.compile_threads = int(os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1"))
    for block in blocks:
        block.compile()
    return len(blocks)


def check_compile(config: RunConfig, world: int) -> None:
    """train.compile on more than one process: DDP and FSDP around compiled blocks are not tested."""
    if config.train.compile is True and world > 1:
        raise ConfigError("run configuration", [
            f"train.compile=true with {world} ranks (train.strategy={config.train.strategy!r} under torchrun): "
            "compiled decoder blocks are supported in one process only; run one process or set train.compile=false"])


def _quantize_all_but(model: torch.nn.Module, adapted: set[str], compute_dtype: torch.dtype) -> None:
    """QLoRA's 4-bit base for the layers LoftQ leaves alone (those it adapts it quantizes itself):
    every linear but the output head, and mixture-of-experts weights, as models.load_model does."""
    from ..nf4 import quantize_linears, quantize_parameter_
    from ..surgery import expert_parameters, output_head_names

    quantize_linears(model, compute_dtype, skip=adapted | output_head_names(model))
    for module, leaf in expert_parameters(model):
        quantize_parameter_(model.get_submodule(module), leaf, compute_dtype)


def prepare(config: RunConfig, tokenizer, data: tuple, ctx: distributed.Context):
    """(Prepared, fill): the base loaded and prepared for training. Under FSDP the base stays on the
    meta device and fill(part) loads it part by part while distributed.wrap shards it: no rank ever
    holds the whole model (fill is None otherwise)."""
    model, _, fill = load_base(config, lazy=ctx.active and config.train.strategy == "fsdp")
    torch.manual_seed(config.train.seed)  # the same adapter initialisation on every rank, however loaded
    prepare_model(model, config)
    return Prepared(model, tokenizer, *data), fill


def read_datasets(config: RunConfig, tokenizer) -> tuple[Dataset, Dataset | None, Dataset | None]:
    """(train, validation, test) as config.data says, tokenized and unpacked: files, Hugging Face
    datasets or built-in tasks, data.columns applied; without data.validation, a seeded
    data.validation_fraction of the training records is held out. data.max_length "auto" is
    resolved on the training examples (train.max_length) and cuts validation and test alike."""
    d = config.data

    def records(key: str, split: str):
        spec = getattr(d, key)
        try:
            return map_columns(read_data(spec, key if spec.startswith(HF_PREFIX) else split, d.n_train, d.n_test),
                               d.columns)
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

    train = build_dataset(train_records, tokenizer, d.format, d.max_length, d.train_on_inputs)
    cut = longest(train) if d.max_length == "auto" else d.max_length

    def build(rows):
        return build_dataset(rows, tokenizer, d.format, cut, d.train_on_inputs) if rows else None

    return train, build(val_records), build(test_records)


def load_data(config: RunConfig, tokenizer, log=None) -> tuple[Dataset, Dataset | None, Dataset | None]:
    """(train, validation, test) for a run: read_datasets, checked by the data pre-flight check
    (training.datacheck: a summary is logged, its errors stop the run), packed with data.packing,
    batched by length with data.group_by_length (data.grouped_batches). Padded batches that would
    be mostly padding (data.PADDING_HINT) get a line suggesting data.padding_free.

    What the config leaves to the data is filled in, in `config` itself, so that the run, its
    config.yaml and a resumed run see the numbers: data.max_length "auto" (the longest training
    example) and eval.max_new_tokens when not set (derive_max_new_tokens of the test split)."""
    from .. import datacheck

    log = log or _rank0_print
    d = config.data
    train, validation, test = read_datasets(config, tokenizer)
    report = datacheck.check(tokenizer, train, validation, test, max_leakage(config), samples=0)
    for line in datacheck.summary(report):
        log(line)
    if report.errors:
        raise ConfigError("training data (the data check)", [datacheck.finding_line(f) for f in report.errors]
                          + ["lorakit data CONFIG shows the examples as the model sees them"])
    if d.max_length == "auto":
        d.max_length = longest(train)
        log(f"data.max_length=auto: {d.max_length} tokens (the longest training example, at most "
            f"{MAX_LENGTH_AUTO_CAP})")
    if config.eval.max_new_tokens is None and test is not None:
        config.eval.max_new_tokens = derive_max_new_tokens(test, tokenizer)
        if config.eval.max_new_tokens is not None:
            log(f"eval.max_new_tokens: {config.eval.max_new_tokens} (the longest test reference + 2)")
    if d.packing:
        if not isinstance(train, Dataset):
            raise ConfigError("training data", ["data.packing=true packs single sequences (objective sft); "
                                                "preference pairs are not packed: set data.packing=false"])
        train = pack(train, d.max_length)
    if d.group_by_length:
        if not isinstance(train, Dataset):
            raise ConfigError("training data", ["data.group_by_length=true groups single sequences (objective sft); "
                                                "preference pairs are not grouped: set data.group_by_length=false"])
        train = dataclasses.replace(train, group_by_length=True)
    if isinstance(train, Dataset) and not (d.packing or d.padding_free) and config.train.batch_size > 1:
        share = padding_share(train, config.train.batch_size, config.train.seed)
        if share >= PADDING_HINT:
            log(f"data: {share:.0%} of the tokens of padded batches of {config.train.batch_size} are padding; "
                "data.padding_free=true trains the same batches without computing on it")
    return train, validation, test


def longest(dataset) -> int:
    """data.max_length "auto" for a built dataset: where build_dataset cut it (pairs: their longest
    sequence, at most config.MAX_LENGTH_AUTO_CAP)."""
    if isinstance(dataset, Dataset) and dataset.max_length is not None:
        return dataset.max_length
    lengths = [len(ids) for e in dataset.examples
               for ids in ((e.chosen_ids, e.rejected_ids) if hasattr(e, "chosen_ids") else (e.input_ids,))]
    return auto_max_length(lengths)


def max_leakage(config: RunConfig) -> float:
    """data.max_leakage, or the data check's default (datacheck.MAX_LEAKAGE) when not set."""
    from ..datacheck import MAX_LEAKAGE

    return MAX_LEAKAGE if config.data.max_leakage is None else config.data.max_leakage


def _rank0_print(line: str) -> None:
    """The log of a run's setup without a sink: printed by rank 0 only (under torchrun RANK is set)."""
    if os.environ.get("RANK", "0") == "0":
        print(line)


def steps_for_epochs(config: RunConfig, train: Dataset, world: int = 1) -> int:
    """train.steps for train.epochs passes over `train` (rounded up): an epoch is every full global
    micro-batch of batch_size x world examples (data.batch_at drops a trailing partial one), and a
    step takes grad_accum of them."""
    t = config.train
    per_epoch = len(train.examples) // (t.batch_size * world)
    return max(1, math.ceil(t.epochs * per_epoch / t.grad_accum - 1e-9))


def check_data(config: RunConfig, train: Dataset, validation: Dataset | None, world: int = 1, log=None) -> None:
    """What the run needs of its data, checked before the model loads (every problem at once).

    Also fills in what the config leaves to the data, in `config` itself (the loop, its schedule,
    checkpoints and config.yaml then follow): train.epochs becomes train.steps (steps_for_epochs;
    epochs is cleared, so that a resumed run reads the same steps), and data.max_length "auto" the
    longest training example (for data a script prepared; load_data resolves it otherwise)."""
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
    if d.max_length == "auto":
        d.max_length = longest(train)
    if t.epochs is not None:
        steps = steps_for_epochs(config, train, world)
        (log or _rank0_print)(f"train.epochs={t.epochs:g}: {steps} steps ({len(train.examples)} "
                     f"{'rows' if d.packing else 'examples'} / {t.batch_size * world * t.grad_accum} per step)")
        t.steps, t.epochs = steps, None


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
    # bench/README.md); FSDP's DTensor shards take the foreach path. LoRA+: B at lr x ratio.
    optimizer = torch.optim.AdamW(parameter_groups(model, t.lr, t.weight_decay, t.loraplus_ratio),
                                  **({"foreach": True} if distributed.sharded(model) else {"fused": True}))
    return params, optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(config))


def memory_check(model, config: RunConfig, log, device: torch.device, n_gpus: int = 1) -> int | None:
    """Run the planner for this run and warn when the step will not fit the device; returns the
    predicted allocator peak in bytes (None when the planner does not know the architecture): what
    the run measures (torch.cuda.max_memory_allocated, or the CPU profiler's peak), without the CUDA
    context and fragmentation the fit check adds. n_gpus > 1: FSDP sharding over that many ranks
    (DDP replicates: plan it with n_gpus=1)."""
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
    return p.peak_allocated

