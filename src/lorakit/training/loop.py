"""The training loop of `lorakit train`: LoRA, QLoRA or full fine-tuning of a causal LM.

One optimizer step = grad_accum micro-batches of batch_size examples on every rank. The batches
are a pure function of the step, and a checkpoint holds the trainable weights, the optimizer, the
scheduler and the RNG state, so a resumed run reproduces the uninterrupted loss curve.

Run directory (new or empty when a run starts; rank 0 holds an exclusive lock on .lock while
the run lasts; files are never written through a symbolic link):
    config.yaml        the full resolved configuration
    metrics.jsonl      one line per logged step ("train") and per evaluation ("eval")
    checkpoints/       step-N/ (atomic: written under a temporary name, then renamed); the last 2 kept
    adapter/           the final adapter in PEFT's format (LoRA/QLoRA), or model/ (full)
    loss.png           training and held-out loss curves (and the retention KL with eval.retention)
    retention.pt       eval.retention's texts and the base model's distributions on them
    tensorboard/       event files, with train.report_to: [tensorboard]
    mlflow.db, mlartifacts/  the MLflow run, with train.report_to: [mlflow]
    summary.json       before/after metrics, wall times, tokens, peak memory (planned and measured), diagnostics

The parts live in modules named after them: setup (model, data, checks), objectives (what a step
minimises), evaluate, checkpoint (and RunState), output (rank 0's sink), run_dir (the lock).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from .. import distributed, monitor
from ..config import ConfigError, RunConfig
from ..inject import trainable_parameters
from .checkpoint import (RunState, check_resume, checkpoints, load_checkpoint, remove_temporary_checkpoints,
                         restore_good_checkpoint, run_settings, save_checkpoint, save_result)
from .evaluate import Retention, evaluate_run, retention_run
from .objectives import Objective, objective_for
from .output import Report, check_trackers, data_line, model_line, sink, summary_line
from .run_dir import check_run_dir, run_lock
from .setup import (Prepared, check_compile, check_data, check_rank, compile_blocks, load_data, memory_check,
                    optimizer_and_schedule, prepare, skeleton)


def _nothing(*_) -> None:
    pass


@dataclass(frozen=True)
class Hooks:
    """Where a script or a test steps into a run. Every rank calls them; the defaults do nothing."""

    model_ready: Callable[[torch.nn.Module], None] = _nothing                # (model) prepared, before sharding
    before_checkpoint: Callable[[int, torch.nn.Module], None] = _nothing     # (step, model)
    after_checkpoint: Callable[[int, Path | None], None] = _nothing          # (step, path; None off rank 0)


def train(config: RunConfig, run_dir: str | os.PathLike, resume: bool = False, prepared: Prepared | None = None,
          log=print, progress: bool = True, objective: Objective | None = None, hooks: Hooks = Hooks()) -> dict:
    """Run (or resume) a fine-tuning run into `run_dir`; returns the summary (also summary.json).

    Everything that can be checked without the model's weights is checked first: the run
    directory (check_run_dir), the data (check_data), a resumed run's settings (check_resume) and
    the LoRA rank (check_rank). Then the run holds the directory's lock (run_lock) while it lasts.
    Under torchrun every rank calls this; only rank 0 logs and writes files (output.sink).
    prepared: the model (adapters added), tokenizer and datasets, instead of config.model and
    config.data. objective: what a step minimises (default: objectives.objective_for(config), the
    one config.objective names). hooks: see Hooks.
    """
    config, run_dir = config.validate(), Path(run_dir)
    objective = objective or objective_for(config)
    ctx = distributed.setup(config.train.device, config.train.dist_timeout_s)
    out = sink(ctx.main, run_dir, log, progress)
    tokenizer, data = _check_inputs(config, run_dir, resume, prepared, ctx, out.log, objective)
    with run_lock(run_dir, ctx.main):
        if ctx.main:
            remove_temporary_checkpoints(run_dir)
        out.open_trackers(config)
        with _stance(config, step=False):
            return _run(config, run_dir, resume, prepared, tokenizer, data, out, ctx, objective, hooks)


def _check_inputs(config: RunConfig, run_dir: Path, resume: bool, prepared: Prepared | None,
                  ctx: distributed.Context, log, objective: Objective) -> tuple[object, tuple]:
    """(tokenizer, (train, validation, test)), every check that needs no model weights passed."""
    check_compile(config, ctx.world)
    if ctx.main:  # the others would find rank 0's lock and files
        check_run_dir(run_dir, resume)
        check_trackers(config.train.report_to)
    if prepared is None:
        from ..models import load_tokenizer, resolve_model_dir

        tokenizer = load_tokenizer(resolve_model_dir(config.model.path))
        data = load_data(config, tokenizer, log)
    else:
        tokenizer, data = prepared.tokenizer, (prepared.train, prepared.validation, prepared.test)
    problems = objective.data_problems(data[0], data[1])
    if problems:
        raise ConfigError("training data", problems)
    check_data(config, data[0], data[1], ctx.world, log)
    if resume:
        check_resume(run_dir, config)
    if prepared is None:
        check_rank(skeleton(config), config, ctx.device, log)
    return tokenizer, data


def _run(config: RunConfig, run_dir: Path, resume: bool, prepared: Prepared | None, tokenizer, data: tuple,
         out, ctx: distributed.Context, objective: Objective, hooks: Hooks) -> dict:
    """train() once the inputs are checked and the run directory is locked: the algorithm."""
    t = config.train
    if t.threads:
        torch.set_num_threads(t.threads)
    wall_start = time.perf_counter()
    fill = None
    if prepared is None:
        prepared, fill = prepare(config, tokenizer, data, ctx)
    raw = prepared.model if fill else prepared.model.to(ctx.device)
    hooks.model_ready(raw)
    report = _introduce(config, prepared, raw, ctx, out, wall_start)
    if t.compile:
        out.log(f"train.compile: {compile_blocks(raw)} decoder blocks compiled at the first step (evaluation "
                "runs them eager)")
        out.log("train.compile: the memory plan above is for eager steps; compiled blocks keep more (1.55x the "
                "step's peak in bench/compile_step.py: the lean gated MLPs step aside under compile)")
    loss_module = objective.loss(raw)
    model = distributed.wrap(loss_module, ctx, t.strategy, fill, objective.probe())  # what forward + backward run

    found = checkpoints(run_dir) if resume else []
    state = RunState(config=run_settings(config))
    retention = _retention(model, raw, prepared, config, ctx, run_dir, bool(found), out)
    if not found:
        out.started(config)
        state.before = _evaluate_before(model, raw, prepared, config, ctx, out, objective, retention)
    torch.manual_seed(t.seed + ctx.rank)  # dropout masks differ across ranks, as for independent examples
    params, optimizer, scheduler = optimizer_and_schedule(model, config)
    if found:
        state = load_checkpoint(found[-1][1], raw, optimizer, scheduler, ctx)
        state.config = state.config or run_settings(config)  # a checkpoint written before they were kept
        out.resumed(*found[-1])

    model.train()
    out.steps_begin(t.steps, state)
    report.peak = peak = monitor.StepPeak(ctx.device, enabled=ctx.main)  # the allocator's peak: the plan's basis
    first = state.step + 1
    for step in range(first, t.steps + 1):
        start = time.perf_counter()
        batches = objective.micro_batches(prepared.train, step, config, ctx, prepared.tokenizer.pad_token_id)
        peak.begin(step, batches, raw, optimizer)
        with _stance(config, step=True):
            loss, tokens, metrics = _forward_backward(model, loss_module, batches, objective, ctx)
        # the norm over all shards under FSDP, replicated; measured (clipping at inf) even without
        # clipping, since a norm of 0 tells a collapse from a plateau
        grad_norm = distributed.full_tensor(torch.nn.utils.clip_grad_norm_(params, t.max_grad_norm or math.inf)).item()
        lr = scheduler.get_last_lr()[0]
        diverged = _divergence(step, loss, state, lr, config, raw)
        if diverged:
            report.diagnostics.append(diverged)
            optimizer.zero_grad(set_to_none=True)
            out.log("\n" + diverged.message)
            break
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        peak.end()
        state.step, state.tokens = step, state.tokens + tokens
        state.best_loss = loss if state.best_loss is None else min(state.best_loss, loss)
        state.train_seconds += time.perf_counter() - start
        if t.compile and step == first:
            out.log(f"train.compile: the first step took {time.perf_counter() - start:.1f} s (compilation included)")
        out.trained(state, tokens, loss, lr, grad_norm, logged=step % t.log_every == 0 or step == t.steps,
                    metrics=metrics)
        if config.eval.every and step % config.eval.every == 0 and step != t.steps and prepared.validation:
            out.evaluated(step, evaluate_run(model, raw, prepared.tokenizer, prepared, config, ctx, generation=False,
                                             objective=objective, retention=retention))
            distributed.barrier(ctx)
        if step % t.save_every == 0 and step != t.steps:
            hooks.before_checkpoint(step, raw)
            hooks.after_checkpoint(step, save_checkpoint(run_dir, raw, optimizer, scheduler, state, ctx))
    peak.end()  # a step left by a divergence
    out.steps_end()

    return _finish(run_dir, model, raw, prepared, config, state, optimizer, scheduler, report, out, ctx, objective,
                   retention)


def _finish(run_dir: Path, model, raw, prepared: Prepared, config: RunConfig, state: RunState, optimizer,
            scheduler, report: Report, out, ctx: distributed.Context, objective: Objective,
            retention: Retention | None) -> dict:
    """After the last step: diagnose the curve (or, after a divergence, go back to the last good
    checkpoint), evaluate the trained model, write the result and the summary."""
    report.steps = state.step
    if report.diagnostics and report.diagnostics[0].kind in monitor.STOPPED:
        _keep_good_checkpoint(run_dir, model, raw, prepared, config, state, optimizer, scheduler, report, out, ctx)
    else:
        report.diagnostics += _noted(out, monitor.check_curve(out.curve(), config.train.lr, _rank(config),
                                                                 objective.plateau_progress))
    if report.no_result is None:
        out.log("evaluating the fine-tuned model...")
        report.after = evaluate_run(model, raw, prepared.tokenizer, prepared, config, ctx, generation=True,
                                    objective=objective, retention=retention)
        report.diagnostics += _noted(out, monitor.check_retention(
            out.evaluations() + [{"step": report.steps, **(report.after or {})}], config.eval.retention_threshold,
            config.train.lr, _rank(config)))
        with distributed.full_trainable_weights(model):  # under FSDP: gathered on every rank, written by rank 0
            report.result_dir = save_result(raw, config, prepared.tokenizer, run_dir) if ctx.main else None
    summary = distributed.all_gather_objects(out.finish(report, state), ctx)[0]
    distributed.teardown(ctx)
    return summary


def _introduce(config: RunConfig, prepared: Prepared, raw, ctx: distributed.Context, out,
               wall_start: float) -> Report:
    """Log what is trained on what, run the memory plan; the report's static facts."""
    t = config.train
    if ctx.device.type == "cpu" and config.model.dtype == "float16":
        out.log("warning: model.dtype=float16 on the CPU is very slow (a SmolLM2-135M step measured ~90x slower "
                "than in float32: the CPU has no fast float16 arithmetic); use model.dtype=bfloat16 or float32")
    if prepared.tokenizer.pad_token_id is None:
        prepared.tokenizer.pad_token = prepared.tokenizer.eos_token
    counts = trainable_parameters(raw)
    out.log(model_line(config, counts, ctx.device, ctx.world))
    out.log(data_line(config, prepared.train, prepared.validation, prepared.test, ctx.world))
    fsdp = ctx.active and t.strategy == "fsdp"
    planned_peak = memory_check(raw, config, out.log, ctx.device, ctx.world if fsdp else 1)
    if prepared.train.unsupervised:
        out.log(f"warning: {prepared.train.unsupervised} training examples have no completion token left after "
                f"truncation at data.max_length={config.data.max_length}; they teach nothing")
    return Report(config, ctx.world, ctx.device, counts, planned_peak, wall_start)


def _retention(model, raw, prepared: Prepared, config: RunConfig, ctx: distributed.Context, run_dir: Path,
               resumed: bool, out) -> Retention | None:
    """eval.retention's reference (evaluate.retention_run), kept in run_dir/retention.pt for a resume."""
    if not config.eval.retention:
        return None
    if not resumed:
        out.log("retention: scoring the base model on " + (config.eval.retention if isinstance(
            config.eval.retention, str) else "its own answers to neutral prompts") + "...")
    retention = retention_run(model, raw, prepared.tokenizer, config, ctx, run_dir / "retention.pt", resumed)
    if retention is None and ctx.main:
        out.log("warning: eval.retention is set, but this run started without it: the base model's "
                "distributions were not kept (retention.pt), so forgetting is not measured")
    distributed.barrier(ctx)
    return retention


def _evaluate_before(model, raw, prepared: Prepared, config: RunConfig, ctx: distributed.Context, out,
                     objective: Objective, retention: Retention | None = None) -> dict | None:
    """The base model's evaluation (step 0), without its samples; every rank gets rank 0's."""
    out.log("evaluating the base model...")
    before = evaluate_run(model, raw, prepared.tokenizer, prepared, config, ctx, generation=True, objective=objective,
                          retention=retention)
    if before is not None:
        before = {k: v for k, v in before.items() if k != "samples"}
        out.evaluated(0, before)
        out.log("before: " + summary_line(before))
    return distributed.all_gather_objects(before, ctx)[0]


def _forward_backward(model, loss_module, batches: list[dict], objective: Objective,
                      ctx: distributed.Context) -> tuple[float, int, dict[str, float]]:
    """Gradients of the step's loss, L = Σ loss(micro-batch) / Σ items over every micro-batch of every
    rank; returns (L, tokens fed, the objective's metrics Σ metric_sums / Σ items), all over all ranks.
    loss_module: the objective's loss module that `model` wraps (it keeps its metric sums).

    DDP and FSDP average gradients over ranks, hence the factor world. DDP all-reduces once per
    step, after the last micro-batch (no_sync before); FSDP has no no_sync: it reduce-scatters
    after every micro-batch and sums into the shards.
    """
    n_items = distributed.all_reduce_sum(sum(objective.items(b) for b in batches), ctx)
    local_sum, tokens, sums = 0.0, 0, {}
    for i, batch in enumerate(batches):
        batch = {k: v.to(ctx.device) for k, v in batch.items()}
        last = i == len(batches) - 1
        with contextlib.nullcontext() if last or not hasattr(model, "no_sync") else model.no_sync():
            loss = model(**batch)
            (loss * (ctx.world / max(n_items, 1))).backward()
        local_sum += loss.item()
        tokens += objective.tokens(batch)
        for k, v in objective.metric_sums(loss_module).items():
            sums[k] = sums.get(k, 0.0) + v
    metrics = {k: distributed.all_reduce_sum(sums[k], ctx) / max(n_items, 1) for k in sums}
    return (distributed.all_reduce_sum(local_sum, ctx) / max(n_items, 1),
            int(distributed.all_reduce_sum(tokens, ctx)), metrics)


def _stance(config: RunConfig, step: bool):
    """torch.compile's stance under train.compile: the compiled blocks run compiled in a training
    step's forward and backward, and eager everywhere else (evaluation without gradients and
    generation with its KV cache would each compile them again); without train.compile, no change."""
    if not config.train.compile:
        return contextlib.nullcontext()
    return torch.compiler.set_stance("default" if step else "force_eager")


def _divergence(step: int, loss: float, state: RunState, lr: float, config: RunConfig,
                raw) -> monitor.Diagnostic | None:
    """monitor.check_divergence at this step; a broken start names the weights that hold NaN or inf."""
    diverged = monitor.check_divergence(step, loss, state.best_loss, lr, step > config.train.warmup_steps,
                                        updated=step > 1)
    if diverged and diverged.kind == "broken_start":
        broken = monitor.nonfinite_parameters(raw)
        if broken:
            diverged = dataclasses.replace(diverged, message=diverged.message + (
                f" {len(broken)} of the model's weight tensors hold NaN or inf, e.g. {broken[0]}."))
    return diverged


def _keep_good_checkpoint(run_dir: Path, model, raw, prepared: Prepared, config: RunConfig, state: RunState,
                          optimizer, scheduler, report: Report, out, ctx: distributed.Context) -> None:
    """After a divergence: the newest checkpoint judged good becomes the result; else there is none."""
    curve = [(r["step"], r["loss"]) for r in out.curve()]
    good = restore_good_checkpoint(run_dir, model, raw, prepared.tokenizer, prepared, config, state.before,
                                   curve, optimizer, scheduler, ctx)
    if good:
        report.steps, path, why = good
        out.log(f"kept the last good checkpoint: {path} (step {report.steps}; {why})")
    else:
        report.steps = 0
        report.no_result = ("no checkpoint of this run is better than the start (none was saved, or each one's "
                            "loss is above the start's): there is no adapter to keep, so none is written")
        out.log(report.no_result)


def _noted(out, found: monitor.Diagnostic | None) -> list[monitor.Diagnostic]:
    """A diagnosis read off the logged curves (rank 0's; none elsewhere), logged."""
    if found:
        out.log(found.message)
    return [found] if found else []


def _rank(config: RunConfig) -> int | None:
    return None if config.method == "full" else config.lora.r
