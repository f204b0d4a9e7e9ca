"""The training loop of `lorakit train`: LoRA, QLoRA or full fine-tuning of a causal LM.

One optimizer step = grad_accum micro-batches of batch_size examples. The batches are a pure
function of the step (data.batch_at), and a checkpoint holds the trainable weights, the optimizer,
the scheduler and the RNG state, so a resumed run reproduces the uninterrupted loss curve.

Run directory (new or empty when a run starts; rank 0 holds an exclusive lock on .lock while
the run lasts; files are never written through a symbolic link):
    config.yaml        the full resolved configuration
    metrics.jsonl      one line per logged step ("train") and per evaluation ("eval")
    checkpoints/       step-N/ (atomic: written under a temporary name, then renamed); the last 2 kept
    adapter/           the final adapter in PEFT's format (LoRA/QLoRA), or model/ (full)
    loss.png           training and held-out loss curves
    summary.json       before/after metrics, wall times, tokens, peak memory, diagnostics
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml

from . import distributed, monitor
from .adapter_io import save_adapter
from .config import BUILTIN_PREFIX, ConfigError, RunConfig
from .data import DataError, Dataset, batch_at, build_dataset, collate, pack, read_records, split_validation
from .files import new_file_mode
from .inject import add_lora, trainable_parameters
from .loss import chunked_cross_entropy, supports_chunked_loss

CHECKPOINTS_KEPT = 2
LOCK_NAME = ".lock"
# Settings that may differ between a checkpoint and the run resuming it: where and how the run
# executes, how far it goes, and how it is watched; every other setting must match.
RESUME_MAY_CHANGE = {"train": ("steps", "device", "strategy", "threads", "dist_timeout_s", "log_every",
                               "save_every"), "eval": ("every", "generate", "max_new_tokens", "batch_size", "limit")}


@dataclass
class Prepared:
    model: torch.nn.Module
    tokenizer: object
    train: Dataset
    validation: Dataset | None
    test: Dataset | None


# --- set-up ----------------------------------------------------------------------------------------

def _dtype(name: str) -> torch.dtype:
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def load_base(config: RunConfig, lazy: bool = False):
    """(model, tokenizer, fill) for the run's base model. lazy: the model is still on the meta
    device and fill(part) loads it part by part (models.CheckpointLoader), for FSDP to shard each
    part as it arrives; otherwise it is loaded and fill is None."""
    from .models import CheckpointLoader, load_model, load_tokenizer, resolve_model_dir

    quantize = config.quantize
    if lazy:
        path = resolve_model_dir(config.model.path)
        loader = CheckpointLoader(path, _dtype(config.model.dtype), quantize)
        return loader.model.eval(), load_tokenizer(path), loader.fill
    return *load_model(config.model.path, dtype=_dtype(config.model.dtype), quantize=quantize), None


def prepare_model(model: torch.nn.Module, config: RunConfig) -> torch.nn.Module:
    from .models import DEFAULT_MODEL

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


def load_data(config: RunConfig, tokenizer) -> tuple[Dataset, Dataset | None, Dataset | None]:
    d = config.data
    builtin = {}

    def records(key: str, split: str):
        spec = getattr(d, key)
        if spec.startswith(BUILTIN_PREFIX):
            from .data import Record
            from .tasks import make_task

            name = spec[len(BUILTIN_PREFIX):]
            if name not in builtin:
                kwargs = {k: v for k, v in (("n_train", d.n_train), ("n_test", d.n_test)) if v is not None}
                builtin[name] = make_task(name, **kwargs)
            rows = getattr(builtin[name], split)
            return [Record(r, f"{spec}[{split} {i}]") for i, r in enumerate(rows)]
        try:
            return read_records(spec)
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

    from .models import load_config, resolve_model_dir

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
    from .inject import resolve_targets
    from .planner import GiB

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


def memory_check(model, config: RunConfig, log, device: torch.device, n_gpus: int = 1) -> int | None:
    """Run the planner for this run and warn when the step will not fit the device; returns the
    predicted peak in bytes (None when the planner does not know the architecture). n_gpus > 1:
    FSDP sharding over that many ranks (DDP replicates: plan it with n_gpus=1)."""
    from .planner import GiB, arch_from_config, device_warning, plan

    dtype = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}[config.model.dtype]
    try:
        p = plan(arch_from_config(model.config.to_dict()), method=config.method, rank=config.lora.r,
                 targets=config.lora.targets, batch_size=config.train.batch_size,
                 seq_len=config.data.max_length, grad_checkpointing=config.train.gradient_checkpointing,
                 dtype=dtype, lora_dropout=config.lora.dropout,
                 device="cuda" if device.type == "cuda" else "cpu", n_gpus=n_gpus, recommend=False)
    except (ValueError, KeyError, AttributeError) as e:  # an architecture or setup it does not model
        log(f"memory plan: skipped ({e})")
        return None
    if device.type == "cuda":
        available = torch.cuda.get_device_properties(device).total_memory
    else:
        available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    sharding = f", sharded over {n_gpus} ranks" if n_gpus > 1 else ""
    log(f"memory plan: predicted peak {p.peak / GiB:.2f} GiB (batch {config.train.batch_size} x "
        f"{config.data.max_length} tokens{sharding}) of {available / GiB:.1f} GiB available on {device.type}")
    warning = device_warning(p, available / GiB)
    if warning:
        log(warning)
    return p.peak


# --- evaluation ----------------------------------------------------------------------------------

@torch.no_grad()
def heldout_loss(model, dataset: Dataset, pad_id: int, batch_size: int) -> float:
    """Mean cross-entropy per supervised token over the dataset."""
    was_training = model.training
    model.eval()
    summed = SummedLoss(model)  # the training loss itself, so held-out and training losses agree
    total, count = 0.0, 0
    for i in range(0, len(dataset.examples), batch_size):
        batch = {k: v.to(model.device) for k, v in collate(dataset.examples[i:i + batch_size], pad_id).items()}
        total += summed(**batch).item()
        count += supervised_tokens(batch)
    model.train(was_training)
    if count == 0:
        raise ValueError(f"none of the {len(dataset.examples)} held-out examples has a token to score "
                         "(every answer is empty or truncated away): there is no loss to report")
    return total / count


@torch.no_grad()
def generate(model, tokenizer, prompts: list[str], max_new_tokens: int, batch_size: int) -> list[str]:
    """Greedy continuations of the prompts (batched, left-padded), decoded without the prompt."""
    was_training = model.training
    model.eval()
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    outputs = []
    try:
        for i in range(0, len(prompts), batch_size):
            enc = tokenizer(prompts[i:i + batch_size], return_tensors="pt", padding=True)
            enc = {k: v.to(model.device) for k, v in enc.items()}
            out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
            new = out[:, enc["input_ids"].shape[1]:]
            outputs += tokenizer.batch_decode(new, skip_special_tokens=False)
    finally:
        tokenizer.padding_side = side
        model.train(was_training)
    return outputs


def exact_match_accuracy(model, tokenizer, dataset: Dataset, max_new_tokens: int, batch_size: int,
                         limit: int | None = None) -> tuple[float, list[dict]]:
    from .tasks import exact_match

    examples = [e for e in dataset.examples if e.prompt is not None and e.reference is not None][:limit]
    if not examples:
        return float("nan"), []
    predictions = generate(model, tokenizer, [e.prompt for e in examples], max_new_tokens, batch_size)
    rows = [{"prompt": e.prompt, "reference": e.reference, "prediction": p, "correct": exact_match(p, e.reference)}
            for e, p in zip(examples, predictions)]
    return sum(r["correct"] for r in rows) / len(rows), rows


def evaluate(model, tokenizer, prepared: Prepared, config: RunConfig, generation: bool) -> dict:
    out = {}
    pad = tokenizer.pad_token_id
    if prepared.validation:
        out["val_loss"] = heldout_loss(model, prepared.validation, pad, config.eval.batch_size)
        out["val_ppl"] = math.exp(min(out["val_loss"], 50))
    if generation and config.eval.generate and prepared.test:
        start = time.perf_counter()
        out["exact_match"], out["samples"] = exact_match_accuracy(
            model, tokenizer, prepared.test, config.eval.max_new_tokens, config.eval.batch_size, config.eval.limit)
        out["eval_seconds"] = time.perf_counter() - start
    return out


def evaluate_run(model, raw, tokenizer, prepared: Prepared, config: RunConfig, ctx: distributed.Context,
                 generation: bool) -> dict | None:
    """evaluate(raw) during or after training; the result on rank 0, None elsewhere.

    Without FSDP rank 0 evaluates alone (the others wait). Under FSDP every forward all-gathers
    shards, a collective: every rank runs the same evaluation on the same examples, with the
    root's parameters gathered (distributed.unsharded_root). The ranks stay in step because they
    compute bit-identical logits (same gathered weights, same inputs), so greedy decoding stops
    at the same length everywhere. Memory stays sharded: only the root's parameters and one
    layer at a time are gathered.
    """
    if not (ctx.main or distributed.sharded(model)):
        return None
    with distributed.unsharded_root(model):
        out = evaluate(raw, tokenizer, prepared, config, generation)
    return out if ctx.main else None


# --- checkpoints --------------------------------------------------------------------------------

def _trainable_state(model) -> dict[str, torch.Tensor]:
    return {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}


def _full_optimizer_state(optimizer) -> dict:
    """optimizer.state_dict() with FSDP-sharded states gathered into full tensors (collective),
    so the file is the one a single process writes: integer parameter ids, full-size states."""
    state = optimizer.state_dict()
    state["state"] = {i: {k: distributed.full_tensor(v) for k, v in s.items()}
                      for i, s in state["state"].items()}
    return state


def _sharded_optimizer_state(state: dict, optimizer) -> dict:
    """The inverse of _full_optimizer_state: states of a sharded parameter are split like it
    (step counters are plain scalars). Collective under FSDP."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    state["state"] = {i: {k: distributed.shard_like(v, params[i]) if v.dim() else v for k, v in s.items()}
                      for i, s in state["state"].items()}
    return state


def save_checkpoint(run_dir: Path, step: int, model, optimizer, scheduler, state: dict,
                    ctx: distributed.Context = distributed.Context()) -> Path | None:
    """checkpoints/step-N, written under a temporary name and renamed: a kill at any moment leaves
    either the complete checkpoint or none. Every rank's RNG state is kept; rank 0 writes. Under
    FSDP every rank first gathers the full trainable weights and optimizer states, so the files
    are the ones a single process writes."""
    from safetensors.torch import save_file

    weights = {k: distributed.full_tensor(v).contiguous().cpu() for k, v in _trainable_state(model).items()}
    optimizer_state = _full_optimizer_state(optimizer)
    cuda = ctx.device.type == "cuda"
    rngs = distributed.all_gather_objects(
        (torch.get_rng_state(), torch.cuda.get_rng_state(ctx.device) if cuda else None), ctx)
    if not ctx.main:
        distributed.barrier(ctx)
        return None
    root = run_dir / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    # a name of our own, made with the umask's permissions (mkdtemp's would be 0700)
    tmp = root / f".step-{step}.{os.getpid()}.{os.urandom(4).hex()}"
    try:
        tmp.mkdir()
        save_file(weights, tmp / "trainable.safetensors")
        os.chmod(tmp / "trainable.safetensors", new_file_mode())  # save_file makes it 0600
        torch.save({"optimizer": optimizer_state, "scheduler": scheduler.state_dict(),
                    "rng": [cpu for cpu, _ in rngs], "cuda_rng": [gpu for _, gpu in rngs]}, tmp / "optimizer.pt")
        (tmp / "state.json").write_text(json.dumps({**state, "step": step}, indent=2))
    except Exception as e:  # a full disk surfaces as OSError, RuntimeError ("unexpected pos") or SafetensorError
        shutil.rmtree(tmp, ignore_errors=True)
        last = checkpoints(run_dir)
        free = shutil.disk_usage(root).free
        reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e).strip().splitlines()[0]
        raise OSError(f"could not write checkpoint step-{step} in {root} ({reason}; {free:,} bytes free there). "
                      f"Nothing was lost: continue from {last[-1][1].name if last else 'the start'} with "
                      f"`lorakit train --resume {run_dir}` once there is room") from e
    final = root / f"step-{step}"
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    for old in sorted(checkpoints(run_dir))[:-CHECKPOINTS_KEPT]:
        shutil.rmtree(old[1])
    distributed.barrier(ctx)
    return final


def checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    return sorted((int(p.name.split("-")[1]), p) for p in root.glob("step-*") if (p / "state.json").is_file())


def temporary_checkpoints(run_dir: Path) -> list[Path]:
    """checkpoints/.step-N.* folders: saves cut short by a kill (never read; the lock holder removes them)."""
    root = Path(run_dir) / "checkpoints"
    return sorted(root.glob(".step-*")) if root.is_dir() else []


def load_checkpoint(path: Path, model, optimizer, scheduler,
                    ctx: distributed.Context = distributed.Context()) -> dict:
    """Every rank reads the checkpoint; under FSDP each keeps its shard of the weights and states.
    Strict: the checkpoint's tensors are exactly the model's trainable ones, with the same shapes."""
    from safetensors.torch import load_file

    try:
        weights = load_file(path / "trainable.safetensors")
    except Exception as e:  # safetensors' own error type for a damaged file
        raise ValueError(f"checkpoint {path}: cannot read trainable.safetensors ({e})") from e
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    missing, extra = sorted(params.keys() - weights.keys()), sorted(weights.keys() - params.keys())
    shapes = [f"{k} {tuple(weights[k].shape)} vs {tuple(params[k].shape)}" for k in sorted(weights.keys() & params.keys())
              if weights[k].shape != params[k].shape]
    if missing or extra or shapes:
        problems = [f"{what} ({len(keys)}): {', '.join(keys[:3])}{', ...' if len(keys) > 3 else ''}"
                    for what, keys in (("missing tensors", missing), ("tensors the model does not have", extra),
                                       ("tensors of another shape (checkpoint vs model)", shapes)) if keys]
        raise ValueError(f"checkpoint {path} does not match the model being trained: " + "; ".join(problems)
                         + ". It is damaged, or the model or config changed since; start a new run")
    with torch.no_grad():
        for k, v in weights.items():
            params[k].copy_(distributed.shard_like(v, params[k]))
    extra = torch.load(path / "optimizer.pt", weights_only=True)  # tensors and numbers only: no code
    optimizer.load_state_dict(_sharded_optimizer_state(extra["optimizer"], optimizer))
    scheduler.load_state_dict(extra["scheduler"])
    rngs = extra["rng"]
    if len(rngs) != ctx.world:
        raise ValueError(f"checkpoint {path} was written by {len(rngs)} ranks; resume it with "
                         f"the same number of processes (now {ctx.world})")
    torch.set_rng_state(rngs[ctx.rank])
    if extra["cuda_rng"][ctx.rank] is not None and ctx.device.type == "cuda":
        torch.cuda.set_rng_state(extra["cuda_rng"][ctx.rank], ctx.device)
    return json.loads((path / "state.json").read_text())


# --- the run directory -----------------------------------------------------------------------------

def check_run_dir(run_dir: Path, resume: bool) -> None:
    """A new run goes into a new or empty directory; no run writes through a symbolic link in it."""
    if run_dir.exists() and not run_dir.is_dir():
        raise ValueError(f"run directory {run_dir} is a file; choose a new or empty directory for --out")
    if not run_dir.is_dir():
        return
    holder = _lock_holder(run_dir)
    if holder:
        raise ValueError(f"{run_dir} is in use by another lorakit train (pid {holder}); wait for it to "
                         "finish, or choose another --out")
    if not resume:
        if (run_dir / "config.yaml").exists():
            raise ValueError(f"{run_dir} already holds a run; continue it with --resume {run_dir}, "
                             "or choose another --out")
        present = sorted(set(os.listdir(run_dir)) - {LOCK_NAME})
        if present:
            raise ValueError(f"run directory {run_dir} is not empty and is not a lorakit run (it holds "
                             f"{', '.join(present[:5])}{', ...' if len(present) > 5 else ''}); a run starts in a "
                             "new or empty directory: choose another --out (nothing was changed)")
    for parent, dirs, files in os.walk(run_dir):  # never descends into a linked directory
        for name in dirs + files:
            path = Path(parent) / name
            if path.is_symlink():
                raise ValueError(f"{path} is a symbolic link (to {os.readlink(path)}); lorakit never writes "
                                 "through a link in a run directory: remove it (nothing was changed)")


@contextlib.contextmanager
def run_lock(run_dir: Path, main: bool = True):
    """Create the run directory and hold an exclusive lock on its .lock file while the run lasts
    (rank 0 only), so a second `lorakit train` into it fails at once. flock's lock belongs to the
    open file: the kernel releases it when the process ends, kill -9 included."""
    if not main:
        yield
        return
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(run_dir / LOCK_NAME, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o666)
    except OSError as e:
        raise ValueError(f"cannot write the run directory {run_dir} ({e.strerror}); choose a writable "
                         "directory for --out") from e
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ValueError(f"{run_dir} is in use by another lorakit train (pid {_pid_in(fd)}); wait for "
                             "it to finish, or choose another --out") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the lock


def _lock_holder(run_dir: Path) -> str | None:
    """The pid written in the run directory's lock file while a run holds it; None when free."""
    try:
        fd = os.open(run_dir / LOCK_NAME, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return None  # no lock file (or not readable): the lock itself decides later
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return None
    except BlockingIOError:
        return _pid_in(fd)
    finally:
        os.close(fd)


def _pid_in(fd: int) -> str:
    return os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"


def run_settings(config: RunConfig) -> dict:
    """The settings a checkpoint is only valid with (all but RESUME_MAY_CHANGE)."""
    settings = config.to_dict()
    for group, keys in RESUME_MAY_CHANGE.items():
        for key in keys:
            settings[group].pop(key)
    return settings


def check_resume(run_dir: Path, config: RunConfig) -> None:
    """The run's newest checkpoint was written with these settings (before anything is loaded)."""
    found = checkpoints(run_dir)
    if not found:
        return
    step, path = found[-1]
    saved = json.loads((path / "state.json").read_text()).get("config")
    if saved is None:  # written before checkpoints kept their settings
        return
    now = run_settings(config)
    changed = [f"{group}.{key}: {saved[group].get(key)!r} -> {now[group].get(key)!r}"
               for group in now if isinstance(now[group], dict)
               for key in sorted(now[group].keys() | saved.get(group, {}).keys())
               if saved.get(group, {}).get(key) != now[group].get(key)]
    changed += [f"{key}: {saved.get(key)!r} -> {now[key]!r}" for key in now
                if not isinstance(now[key], dict) and saved.get(key) != now[key]]
    if changed:
        raise ValueError(f"{run_dir / 'config.yaml'} changed since checkpoint {path.name} was written "
                         f"({'; '.join(changed)}); the checkpoint holds a run with the old settings: restore "
                         "them, or start a new run with another --out")


# --- the run ---------------------------------------------------------------------------------------

def save_result(model, config: RunConfig, tokenizer, run_dir: Path) -> Path:
    if config.method == "full":
        target = run_dir / "model"
        model.save_pretrained(target)
        tokenizer.save_pretrained(target)
        return target
    return save_adapter(model, run_dir / "adapter")


def write_config(config: RunConfig, run_dir: Path) -> None:
    text = yaml.safe_dump(config.to_dict(), sort_keys=False)
    tmp = run_dir / ".config.yaml.tmp"
    tmp.write_text(text)
    os.replace(tmp, run_dir / "config.yaml")


def micro_batches(dataset: Dataset, step: int, config: RunConfig, ctx: distributed.Context, pad_id: int) -> list[dict]:
    """This rank's micro-batches of optimizer step `step` (1-based). Global micro-batch i holds
    batch_size x world examples; rank r takes the r-th slice, so N ranks see exactly the examples a
    single process with batch_size x N sees."""
    t = config.train
    out = []
    for micro in range(t.grad_accum):
        examples = batch_at(dataset, (step - 1) * t.grad_accum + micro, t.batch_size * ctx.world, t.seed)
        out.append(collate(examples[ctx.rank * t.batch_size:(ctx.rank + 1) * t.batch_size], pad_id))
    return out


class SummedLoss(torch.nn.Module):
    """The model under training, returning the sum of next-token cross-entropies over the
    supervised tokens of a batch (what DDP wraps, so every computation happens in forward).

    Where the logits are exactly head(last hidden state), the head runs only at the positions
    that have a target, in chunks (loss.chunked_cross_entropy): prompt positions cost no
    vocabulary projection and full float32 logits never exist. Otherwise the model's logits are used.
    """

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model
        self.chunked = supports_chunked_loss(model)

    def forward(self, input_ids, attention_mask, labels) -> torch.Tensor:
        targets = labels[:, 1:]                                    # position t predicts token t + 1
        if not self.chunked:
            logits = self.model(input_ids=input_ids, attention_mask=attention_mask).logits
            return torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), targets.flatten(),
                                                     ignore_index=-100, reduction="sum")
        hidden = self.model.base_model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        keep = targets != -100
        head = self.model.get_output_embeddings()
        return chunked_cross_entropy(hidden[:, :-1][keep], head.weight, targets[keep], head.bias,
                                     reduction="sum")                # (n_supervised, d) rows only


def supervised_tokens(batch: dict) -> int:
    return int((batch["labels"][:, 1:] != -100).sum())


def train(config: RunConfig, run_dir: str | os.PathLike, resume: bool = False, prepared: Prepared | None = None,
          log=print, progress: bool = True) -> dict:
    """Run (or resume) a fine-tuning run into `run_dir`; returns the summary (also summary.json).

    Everything that can be checked without the model's weights is checked first: the run
    directory (check_run_dir), the data (check_data), a resumed run's settings (check_resume) and
    the LoRA rank (check_rank). Then the run holds the directory's lock (run_lock) while it lasts.
    Under torchrun every rank calls this; only rank 0 logs and writes files.
    """
    config = config.validate()
    t = config.train
    ctx = distributed.setup(t.device, t.dist_timeout_s)
    if not ctx.main:
        log, progress = (lambda *_: None), False
    run_dir = Path(run_dir)
    if ctx.main:  # the others would find rank 0's lock and files
        check_run_dir(run_dir, resume)
    if prepared is None:
        from .models import load_tokenizer, resolve_model_dir

        tokenizer = load_tokenizer(resolve_model_dir(config.model.path))
        data = load_data(config, tokenizer)
    else:
        tokenizer, data = prepared.tokenizer, (prepared.train, prepared.validation, prepared.test)
    check_data(config, data[0], data[1], ctx.world)
    if resume:
        check_resume(run_dir, config)
    if prepared is None:
        check_rank(skeleton(config), config, ctx.device, log)
    with run_lock(run_dir, ctx.main):
        if ctx.main:
            for folder in temporary_checkpoints(run_dir):
                shutil.rmtree(folder)
        return _run(config, run_dir, resume, prepared, tokenizer, data, log, progress, ctx)


def _run(config: RunConfig, run_dir: Path, resume: bool, prepared: Prepared | None, tokenizer, data: tuple,
         log, progress: bool, ctx: distributed.Context) -> dict:
    """train() once the inputs are checked and the run directory is locked."""
    t = config.train
    if t.threads:
        torch.set_num_threads(t.threads)
    wall_start = time.perf_counter()

    fsdp = ctx.active and t.strategy == "fsdp"
    fill = None
    if prepared is None:
        # under FSDP the base stays on the meta device here, and is loaded part by part while
        # it is sharded (distributed.wrap): no rank ever holds the whole model
        model, _, fill = load_base(config, lazy=fsdp)
        torch.manual_seed(t.seed)  # the same adapter initialisation on every rank, however loaded
        prepare_model(model, config)
        prepared = Prepared(model, tokenizer, *data)
    raw, tokenizer = prepared.model if fill else prepared.model.to(ctx.device), prepared.tokenizer
    if ctx.device.type == "cpu" and config.model.dtype == "float16":
        log("warning: model.dtype=float16 on the CPU is very slow (a SmolLM2-135M step measured ~90x slower "
            "than in float32: the CPU has no fast float16 arithmetic); use model.dtype=bfloat16 or float32")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    counts = trainable_parameters(raw)
    log(f"model: {config.model.path or 'SmolLM2-135M-Instruct'} ({config.method}) on {ctx.device}"
        + (f" x {ctx.world} ranks ({t.strategy})" if ctx.active else "") + f"; {counts}")
    log(f"data: {len(prepared.train.examples)} train examples ({prepared.train.tokens:,} tokens, "
        f"{prepared.train.truncated} truncated at {config.data.max_length}), "
        f"{len(prepared.validation.examples) if prepared.validation else 0} validation, "
        f"{len(prepared.test.examples) if prepared.test else 0} test; global batch "
        f"{t.batch_size} x {t.grad_accum} accumulation x {ctx.world} ranks = "
        f"{t.batch_size * t.grad_accum * ctx.world} examples per step")
    planned_peak = memory_check(raw, config, log, ctx.device, ctx.world if fsdp else 1)
    if prepared.train.unsupervised:
        log(f"warning: {prepared.train.unsupervised} training examples have no completion token left after "
            f"truncation at data.max_length={config.data.max_length}; they teach nothing")

    metrics = monitor.MetricsLog(run_dir / "metrics.jsonl")
    state = {"tokens": 0, "train_seconds": 0.0, "best_loss": None, "before": None, "config": run_settings(config)}
    found = checkpoints(run_dir) if resume else []
    model = distributed.wrap(SummedLoss(raw), ctx, t.strategy, fill)
    if not found:
        if ctx.main:
            if (run_dir / "metrics.jsonl").exists():
                (run_dir / "metrics.jsonl").unlink()
            write_config(config, run_dir)
            log("evaluating the base model...")
        before = evaluate_run(model, raw, tokenizer, prepared, config, ctx, generation=True)
        if ctx.main:
            state["before"] = {k: v for k, v in before.items() if k != "samples"}
            metrics.write({"type": "eval", "step": 0, **state["before"]})
            log("before: " + _fmt(state["before"]))
        distributed.barrier(ctx)

    torch.manual_seed(t.seed + ctx.rank)  # dropout masks differ across ranks, as for independent examples
    params = [p for p in model.parameters() if p.requires_grad]
    # fused: one kernel for the whole update (0.26x the time of foreach on the adapters,
    # bench/README.md); FSDP's DTensor shards take the foreach path
    optimizer = torch.optim.AdamW(params, lr=t.lr, weight_decay=t.weight_decay,
                                  **({"foreach": True} if distributed.sharded(model) else {"fused": True}))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(config))
    step0 = 0
    if found:
        step0, path = found[-1]
        state = load_checkpoint(path, raw, optimizer, scheduler, ctx)
        state.setdefault("config", run_settings(config))  # a checkpoint written before they were kept
        if ctx.main:
            metrics.truncate_after(step0)
        log(f"resumed from {path} (step {step0})")

    model.train()
    diagnostics: list[monitor.Diagnostic] = []
    bar = _progress(t.steps, step0, progress)
    last_log = state["train_seconds"]  # tokens/s counts training time only, not evaluation
    tokens_since = 0
    step = step0
    for step in range(step0 + 1, t.steps + 1):
        start = time.perf_counter()
        batches = micro_batches(prepared.train, step, config, ctx, tokenizer.pad_token_id)
        # The step's loss is the mean over every supervised token of the global batch (all ranks,
        # all micro-batches); DDP and FSDP average gradients over ranks, hence the factor world.
        # FSDP has no no_sync: it reduce-scatters after every micro-batch and sums into the shards.
        n_tokens = distributed.all_reduce_sum(sum(supervised_tokens(b) for b in batches), ctx)
        local_sum, tokens_step = 0.0, 0
        for i, batch in enumerate(batches):
            batch = {k: v.to(ctx.device) for k, v in batch.items()}
            sync = contextlib.nullcontext() if i == len(batches) - 1 or not hasattr(model, "no_sync") \
                else model.no_sync()  # all-reduce once per step, after the last micro-batch
            with sync:
                loss = model(**batch)
                (loss * (ctx.world / max(n_tokens, 1))).backward()
            local_sum += loss.item()
            tokens_step += int(batch["attention_mask"].sum())
        loss_value = distributed.all_reduce_sum(local_sum, ctx) / max(n_tokens, 1)
        tokens_step = int(distributed.all_reduce_sum(tokens_step, ctx))
        # the norm over all shards under FSDP, replicated; measured (clipping at inf) even without
        # clipping, since a norm of 0 tells a collapse from a plateau
        grad_norm = distributed.full_tensor(torch.nn.utils.clip_grad_norm_(params, t.max_grad_norm or math.inf)).item()
        lr = scheduler.get_last_lr()[0]
        diverged = monitor.check_divergence(step, loss_value, state["best_loss"], lr, step > t.warmup_steps,
                                            updated=step > 1)
        if diverged and diverged.kind == "broken_start":
            broken = _nonfinite_parameters(raw)
            if broken:
                diverged = dataclasses.replace(diverged, message=diverged.message + (
                    f" {len(broken)} of the model's weight tensors hold NaN or inf, e.g. {broken[0]}."))
        if diverged:
            diagnostics.append(diverged)
            optimizer.zero_grad(set_to_none=True)
            log("\n" + diverged.message)
            break
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        state["best_loss"] = loss_value if state["best_loss"] is None else min(state["best_loss"], loss_value)
        state["train_seconds"] += time.perf_counter() - start
        state["tokens"] += tokens_step
        tokens_since += tokens_step

        if ctx.main and (step % t.log_every == 0 or step == t.steps):
            now = state["train_seconds"]
            record = {"type": "train", "step": step, "loss": loss_value, "lr": lr, "grad_norm": grad_norm,
                      "tokens": state["tokens"], "tokens_per_s": tokens_since / max(now - last_log, 1e-9),
                      "train_seconds": state["train_seconds"]}
            metrics.write(record)
            tokens_since, last_log = 0, now
            _update(bar, step, record)
        if config.eval.every and step % config.eval.every == 0 and step != t.steps and prepared.validation:
            ev = evaluate_run(model, raw, tokenizer, prepared, config, ctx, generation=False)
            if ctx.main:
                metrics.write({"type": "eval", "step": step, **ev})
            distributed.barrier(ctx)
        if step % t.save_every == 0 and step != t.steps:
            save_checkpoint(run_dir, step, raw, optimizer, scheduler, state, ctx)
    if bar is not None:
        bar.close()

    no_result = None  # why no adapter (or model) is written, when none is
    if diagnostics and diagnostics[0].kind in monitor.STOPPED:
        good = restore_good_checkpoint(run_dir, model, raw, tokenizer, prepared, config, state["before"],
                                       optimizer, scheduler, metrics, ctx)
        if good:
            step, path, why = good
            log(f"kept the last good checkpoint: {path} (step {step}; {why})")
        else:
            step = 0
            no_result = ("no checkpoint of this run is better than the start (none was saved, or each one's "
                         "loss is above the start's): there is no adapter to keep, so none is written")
            log(no_result)
    elif ctx.main:
        curve = [r for r in metrics.read() if r.get("type") == "train"]
        found = (monitor.check_collapse([r["step"] for r in curve], [r["loss"] for r in curve],
                                        [r["grad_norm"] for r in curve], t.lr)
                 or monitor.check_plateau([r["step"] for r in curve], [r["loss"] for r in curve],
                                          None if config.method == "full" else config.lora.r, t.lr))
        if found:
            diagnostics.append(found)
            log(found.message)

    after, result_dir = None, None
    if no_result is None:
        log("evaluating the fine-tuned model...")
        after = evaluate_run(model, raw, tokenizer, prepared, config, ctx, generation=True)
        with distributed.full_trainable_weights(model):  # under FSDP: gathered on every rank, written by rank 0
            result_dir = save_result(raw, config, tokenizer, run_dir) if ctx.main else None
    summary = None
    if ctx.main:
        samples = after.pop("samples", []) if after else []
        if after is not None:
            metrics.write({"type": "eval", "step": step, **after})
        plot = monitor.plot_losses(metrics.read(), run_dir / "loss.png")
        summary = {
            "method": config.method,
            "model": config.model.path or "SmolLM2-135M-Instruct",
            "steps": step,
            "world_size": ctx.world,
            "trainable_parameters": counts.trainable,
            "total_parameters": counts.total,
            "before": state["before"],
            "after": after,
            "tokens_seen": state["tokens"],
            "train_seconds": state["train_seconds"],
            "wall_seconds": time.perf_counter() - wall_start,
            "peak_memory_bytes": monitor.peak_memory_bytes(ctx.device),
            "planned_peak_bytes": planned_peak,
            "diagnostics": [dataclasses.asdict(d) for d in diagnostics],
            "result": str(result_dir) if result_dir else None,
            "no_result": no_result,
            "loss_plot": str(plot) if plot else None,
            "samples": samples[:5],
        }
        tmp = run_dir / ".summary.json.tmp"
        tmp.write_text(json.dumps(summary, indent=2))
        os.replace(tmp, run_dir / "summary.json")
        log(before_after_table(state["before"], after or {}))
        log(f"wrote {f'{result_dir}, ' if result_dir else ''}{run_dir / 'summary.json'}, {run_dir / 'metrics.jsonl'}"
            + (f", {plot}" if plot else ""))
    summary = distributed.all_gather_objects(summary, ctx)[0]
    distributed.teardown(ctx)
    return summary


def restore_good_checkpoint(run_dir: Path, model, raw, tokenizer, prepared: Prepared, config: RunConfig,
                            before: dict | None, optimizer, scheduler, metrics: monitor.MetricsLog,
                            ctx: distributed.Context) -> tuple[int, Path, str] | None:
    """After training stopped on a divergence: load the newest checkpoint that is judged good,
    (step, path, why), or None when there is none.

    Good means not worse than the start: its held-out loss is at most the base model's (with
    held-out data), else its smoothed training loss is at most the first step's.
    """
    start = (before or {}).get("val_loss")
    curve = [(r["step"], r["loss"]) for r in metrics.read() if r.get("type") == "train"] if ctx.main else []
    for step, path in reversed(checkpoints(run_dir)):
        load_checkpoint(path, raw, optimizer, scheduler, ctx)
        verdict = None
        if prepared.validation and start is not None and math.isfinite(start):
            loss = (evaluate_run(model, raw, tokenizer, prepared, config, ctx, generation=False) or {}).get("val_loss")
            if ctx.main and math.isfinite(loss) and loss <= start:
                verdict = f"held-out loss {loss:.4f}, at most the start's {start:.4f}"
        elif ctx.main:
            losses = [loss for s, loss in curve if s <= step]
            smoothed = monitor.smooth(losses)[-1] if losses else math.inf
            if math.isfinite(smoothed) and smoothed <= losses[0]:
                verdict = f"smoothed training loss {smoothed:.4f}, at most the first step's {losses[0]:.4f}"
        verdict = distributed.all_gather_objects(verdict, ctx)[0]  # rank 0 judges for every rank
        if verdict:
            return step, path, verdict
    return None


def _nonfinite_parameters(model) -> list[str]:
    """Names of floating-point parameters holding NaN or inf (this rank's shards under FSDP)."""
    out = []
    with torch.no_grad():
        for name, p in model.named_parameters():
            local = p.to_local() if hasattr(p, "to_local") else p
            if local.is_floating_point() and not bool(torch.isfinite(local).all()):
                out.append(name)
    return out


def _fmt(metrics: dict) -> str:
    parts = []
    if "exact_match" in metrics:
        parts.append(f"exact match {100 * metrics['exact_match']:.1f}%")
    if "val_loss" in metrics:
        parts.append(f"held-out loss {metrics['val_loss']:.4f} (ppl {metrics['val_ppl']:.2f})")
    return ", ".join(parts) or "no held-out data"


def before_after_table(before: dict | None, after: dict) -> str:
    before = before or {}
    rows = [("held-out exact match", "exact_match", lambda v: f"{100 * v:.1f}%"),
            ("held-out loss", "val_loss", lambda v: _number(v, 4)),
            ("held-out perplexity", "val_ppl", lambda v: _number(v, 2))]
    cells = [("", "before", "after")]
    for label, key, fmt in rows:
        if key in after or key in before:
            b = fmt(before[key]) if key in before and not _isnan(before[key]) else "-"
            a = fmt(after[key]) if key in after and not _isnan(after[key]) else "-"
            cells.append((label, b, a))
    width = [max(len(row[i]) for row in cells) for i in range(3)]
    # columns at least two spaces apart, however wide a number gets
    return "\n".join(f"{label:<{width[0]}}  {b:>{max(width[1], 10)}}  {a:>{max(width[2], 10)}}"
                     for label, b, a in cells)


def _number(v: float, decimals: int) -> str:
    return f"{v:.{decimals}f}" if abs(v) < 1e6 else f"{v:.4g}"


def _isnan(v) -> bool:
    return isinstance(v, float) and math.isnan(v)


def _progress(total: int, start: int, enabled: bool):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=start, desc="train", unit="step", file=sys.stderr, dynamic_ncols=True)


def _update(bar, step: int, record: dict) -> None:
    if bar is None:
        return
    bar.n = step
    bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}",
                    tok_s=f"{record['tokens_per_s']:.0f}", refresh=False)
    bar.refresh()
