"""The training loop of `lorakit train`: LoRA, QLoRA or full fine-tuning of a causal LM.

One optimizer step = grad_accum micro-batches of batch_size examples. The batches are a pure
function of the step (data.batch_at), and a checkpoint holds the trainable weights, the optimizer,
the scheduler and the RNG state, so a resumed run reproduces the uninterrupted loss curve.

Run directory:
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
import json
import math
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml

from . import distributed, monitor
from .adapter_io import save_adapter
from .config import BUILTIN_PREFIX, RunConfig
from .data import Dataset, batch_at, build_dataset, collate, pack, read_records, split_validation
from .inject import add_lora, trainable_parameters
from .loss import chunked_cross_entropy, supports_chunked_loss

CHECKPOINTS_KEPT = 2


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

    quantize = None if config.model.quantize == "none" else config.model.quantize
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

    def records(spec: str, split: str):
        if spec.startswith(BUILTIN_PREFIX):
            from .data import Record
            from .tasks import make_task

            name = spec[len(BUILTIN_PREFIX):]
            if name not in builtin:
                kwargs = {k: v for k, v in (("n_train", d.n_train), ("n_test", d.n_test)) if v is not None}
                builtin[name] = make_task(name, **kwargs)
            rows = getattr(builtin[name], split)
            return [Record(r, f"{spec}[{split} {i}]") for i, r in enumerate(rows)]
        return read_records(spec)

    train_records = records(d.train, "train")
    if d.validation:
        val_records = records(d.validation, "train")
    else:
        train_records, val_records = split_validation(train_records, d.validation_fraction, config.train.seed)
    test_spec = d.test or (d.train if d.train.startswith(BUILTIN_PREFIX) else None)
    test_records = records(test_spec, "test") if test_spec else []

    def build(rows):
        return build_dataset(rows, tokenizer, d.format, d.max_length, d.train_on_inputs) if rows else None

    train = build(train_records)
    if d.packing:
        train = pack(train, d.max_length)
    return train, build(val_records), build(test_records)


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
    return total / max(count, 1)


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
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=f".step-{step}."))
    save_file(weights, tmp / "trainable.safetensors")
    torch.save({"optimizer": optimizer_state, "scheduler": scheduler.state_dict(),
                "rng": [cpu for cpu, _ in rngs], "cuda_rng": [gpu for _, gpu in rngs]}, tmp / "optimizer.pt")
    (tmp / "state.json").write_text(json.dumps({**state, "step": step}, indent=2))
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


def load_checkpoint(path: Path, model, optimizer, scheduler,
                    ctx: distributed.Context = distributed.Context()) -> dict:
    """Every rank reads the checkpoint; under FSDP each keeps its shard of the weights and states."""
    from safetensors.torch import load_file

    weights = load_file(path / "trainable.safetensors")
    params = dict(model.named_parameters())
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

    Under torchrun every rank calls this; only rank 0 logs and writes files.
    """
    config = config.validate()
    t = config.train
    ctx = distributed.setup(t.device, t.dist_timeout_s)
    if not ctx.main:
        log, progress = (lambda *_: None), False
    run_dir = Path(run_dir)
    if ctx.main:
        run_dir.mkdir(parents=True, exist_ok=True)
    if t.threads:
        torch.set_num_threads(t.threads)
    wall_start = time.perf_counter()

    fsdp = ctx.active and t.strategy == "fsdp"
    fill = None
    if prepared is None:
        # under FSDP the base stays on the meta device here, and is loaded part by part while
        # it is sharded (distributed.wrap): no rank ever holds the whole model
        model, tokenizer, fill = load_base(config, lazy=fsdp)
        torch.manual_seed(t.seed)  # the same adapter initialisation on every rank, however loaded
        prepare_model(model, config)
        prepared = Prepared(model, tokenizer, *load_data(config, tokenizer))
    raw, tokenizer = prepared.model if fill else prepared.model.to(ctx.device), prepared.tokenizer
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
    state = {"tokens": 0, "train_seconds": 0.0, "best_loss": None, "before": None}
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
        grad_norm = (distributed.full_tensor(torch.nn.utils.clip_grad_norm_(params, t.max_grad_norm)).item()
                     if t.max_grad_norm else None)  # under FSDP the norm over all shards, replicated
        lr = scheduler.get_last_lr()[0]
        diverged = monitor.check_divergence(step, loss_value, state["best_loss"], lr, step > t.warmup_steps)
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

    if diagnostics and diagnostics[0].kind == "diverged":
        good = checkpoints(run_dir)
        if good:
            load_checkpoint(good[-1][1], raw, optimizer, scheduler, ctx)
            log(f"kept the last good checkpoint: {good[-1][1]} (step {good[-1][0]})")
        step = good[-1][0] if good else 0
    elif ctx.main:
        curve = [r for r in metrics.read() if r.get("type") == "train"]
        plateau = monitor.check_plateau([r["step"] for r in curve], [r["loss"] for r in curve],
                                        None if config.method == "full" else config.lora.r, t.lr)
        if plateau:
            diagnostics.append(plateau)
            log(plateau.message)

    log("evaluating the fine-tuned model...")
    after = evaluate_run(model, raw, tokenizer, prepared, config, ctx, generation=True)
    with distributed.full_trainable_weights(model):  # under FSDP: gathered on every rank, written by rank 0
        result_dir = save_result(raw, config, tokenizer, run_dir) if ctx.main else None
    summary = None
    if ctx.main:
        samples = after.pop("samples", [])
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
            "result": str(result_dir),
            "loss_plot": str(plot) if plot else None,
            "samples": samples[:5],
        }
        tmp = run_dir / ".summary.json.tmp"
        tmp.write_text(json.dumps(summary, indent=2))
        os.replace(tmp, run_dir / "summary.json")
        log(before_after_table(state["before"], after))
        log(f"wrote {result_dir}, {run_dir / 'summary.json'}, {run_dir / 'metrics.jsonl'}"
            + (f", {plot}" if plot else ""))
    summary = distributed.all_gather_objects(summary, ctx)[0]
    distributed.teardown(ctx)
    return summary


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
            ("held-out loss", "val_loss", lambda v: f"{v:.4f}"),
            ("held-out perplexity", "val_ppl", lambda v: f"{v:.2f}")]
    lines = [f"{'':<22}{'before':>12}{'after':>12}"]
    for label, key, fmt in rows:
        if key in after or key in before:
            b = fmt(before[key]) if key in before and not _isnan(before[key]) else "-"
            a = fmt(after[key]) if key in after and not _isnan(after[key]) else "-"
            lines.append(f"{label:<22}{b:>12}{a:>12}")
    return "\n".join(lines)


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
