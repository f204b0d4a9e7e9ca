"""Checkpoints: what a run keeps so that it can continue after a stop, and the run's state.

checkpoints/step-N/ holds
    trainable.safetensors   the trainable weights (full tensors, as one process writes them)
    optimizer.pt            AdamW's states, the scheduler, every rank's RNG states
    state.json              RunState: tokens, train_seconds, best_loss, before, config, step

Batches are a pure function of the step (data.batch_at), so a run resumed from step-N reproduces
the uninterrupted loss curve bit for bit. A checkpoint is written under a temporary name and renamed
(files.replacing): a kill at any moment leaves either the complete checkpoint or none; the newest
CHECKPOINTS_KEPT are kept.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from .. import distributed, monitor
from ..adapter_io import save_adapter
from ..config import ConfigError, RunConfig
from ..files import new_file_mode, replacing
from .evaluate import evaluate_run

CHECKPOINTS_KEPT = 2
# Settings that may differ between a checkpoint and the run resuming it: where and how the run
# executes, how far it goes, and how it is watched; every other setting must match.
RESUME_MAY_CHANGE = {"train": ("steps", "device", "strategy", "threads", "dist_timeout_s", "log_every",
                               "save_every", "compile"),
                     "eval": ("every", "generate", "max_new_tokens", "batch_size", "limit"),
                     "data": ("max_leakage",)}


@dataclass
class RunState:
    """Where a run stands: what a checkpoint's state.json holds (fields in this order, as
    json.dumps(indent=2) of them, so that every checkpoint ever written still reads)."""

    tokens: int = 0                   # tokens fed to the model (attention-mask ones), all ranks together
    train_seconds: float = 0.0        # time spent in training steps (evaluation excluded)
    best_loss: float | None = None    # the lowest training loss so far (divergence is judged against it)
    before: dict | None = None        # the base model's evaluation (rank 0; no samples)
    config: dict | None = None        # run_settings() of the run; None in checkpoints older than them
    step: int = 0                     # optimizer steps done

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2)

    @classmethod
    def from_json(cls, text: str) -> RunState:
        saved = json.loads(text)
        return cls(**{f.name: saved[f.name] for f in dataclasses.fields(cls) if f.name in saved})


def run_settings(config: RunConfig) -> dict:
    """The settings a checkpoint is only valid with (all but RESUME_MAY_CHANGE)."""
    settings = config.to_dict()
    for group, keys in RESUME_MAY_CHANGE.items():
        for key in keys:
            settings[group].pop(key)
    return settings


def checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """The run's complete checkpoints, (step, path), oldest first."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    return sorted((int(p.name.split("-")[1]), p) for p in root.glob("step-*") if (p / "state.json").is_file())


def temporary_checkpoints(run_dir: Path) -> list[Path]:
    """checkpoints/.step-N.* folders: saves cut short by a kill (never read; the lock holder removes them)."""
    root = Path(run_dir) / "checkpoints"
    return sorted(root.glob(".step-*")) if root.is_dir() else []


def remove_temporary_checkpoints(run_dir: Path) -> None:
    for folder in temporary_checkpoints(run_dir):
        shutil.rmtree(folder)


def save_checkpoint(run_dir: Path, model, optimizer, scheduler, state: RunState,
                    ctx: distributed.Context = distributed.Context()) -> Path | None:
    """checkpoints/step-<state.step>, written under a temporary name and renamed: a kill at any moment
    leaves either the complete checkpoint or none. Every rank's RNG state is kept; rank 0 writes
    (and gets the path; the others None). Under FSDP every rank first gathers the full trainable
    weights and optimizer states, so the files are the ones a single process writes."""
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
    final = root / f"step-{state.step}"
    try:
        with replacing(final, directory=True) as tmp:
            save_file(weights, tmp / "trainable.safetensors")
            (tmp / "trainable.safetensors").chmod(new_file_mode())  # save_file makes it 0600
            torch.save({"optimizer": optimizer_state, "scheduler": scheduler.state_dict(),
                        "rng": [cpu for cpu, _ in rngs], "cuda_rng": [gpu for _, gpu in rngs]}, tmp / "optimizer.pt")
            (tmp / "state.json").write_text(state.to_json())
    except Exception as e:  # a full disk surfaces as OSError, RuntimeError ("unexpected pos") or SafetensorError
        last = checkpoints(run_dir)
        free = shutil.disk_usage(root).free
        reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e).strip().splitlines()[0]
        raise OSError(f"could not write checkpoint step-{state.step} in {root} ({reason}; {free:,} bytes free "
                      f"there). Nothing was lost: continue from {last[-1][1].name if last else 'the start'} "
                      f"with `lorakit train --resume {run_dir}` once there is room") from e
    for _, old in checkpoints(run_dir)[:-CHECKPOINTS_KEPT]:
        shutil.rmtree(old)
    distributed.barrier(ctx)
    return final


def load_checkpoint(path: Path, model, optimizer, scheduler,
                    ctx: distributed.Context = distributed.Context()) -> RunState:
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
    return RunState.from_json((path / "state.json").read_text())


def check_resume(run_dir: Path, config: RunConfig) -> None:
    """The run's newest checkpoint was written with these settings (before anything is loaded)."""
    found = checkpoints(run_dir)
    if not found:
        return
    step, path = found[-1]
    saved = RunState.from_json((path / "state.json").read_text()).config
    if saved is None:  # written before checkpoints kept their settings
        return
    saved = _as_today(saved)
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


def _as_today(saved: dict) -> dict:
    """Saved settings in today's vocabulary: read back through RunConfig.from_dict, keys added since
    the checkpoint was written take their defaults (which is what that run did) and retired keys that
    agree with the rest go (model.quantize). Settings from_dict refuses are compared as they are, so
    a contradiction is reported as a change."""
    try:
        return run_settings(RunConfig.from_dict(saved))
    except (ConfigError, TypeError, ValueError):
        return saved


def restore_good_checkpoint(run_dir: Path, model, raw, tokenizer, prepared, config: RunConfig,
                            before: dict | None, curve: list[tuple[int, float]], optimizer, scheduler,
                            ctx: distributed.Context) -> tuple[int, Path, str] | None:
    """After training stopped on a divergence: load the newest checkpoint that is judged good,
    (step, path, why), or None when there is none.

    Good means not worse than the start: its held-out loss is at most the base model's (with
    held-out data), else its smoothed training loss is at most the first step's. curve: the
    training losses (step, loss) as logged (rank 0; empty elsewhere: rank 0 judges for every rank).
    """
    start = (before or {}).get("val_loss")
    for step, path in reversed(checkpoints(run_dir)):
        load_checkpoint(path, raw, optimizer, scheduler, ctx)
        verdict = None
        if prepared.validation and start is not None and math.isfinite(start):
            loss = (evaluate_run(model, raw, tokenizer, prepared, config, ctx, generation=False) or {}).get("val_loss")
            if loss is not None and math.isfinite(loss) and loss <= start:
                verdict = f"held-out loss {loss:.4f}, at most the start's {start:.4f}"
        else:
            losses = [loss for s, loss in curve if s <= step]
            smoothed = monitor.smooth(losses)[-1] if losses else math.inf
            if math.isfinite(smoothed) and smoothed <= losses[0]:
                verdict = f"smoothed training loss {smoothed:.4f}, at most the first step's {losses[0]:.4f}"
        verdict = distributed.all_gather_objects(verdict, ctx)[0]  # rank 0 judges for every rank
        if verdict:
            return step, path, verdict
    return None


def save_result(model, config: RunConfig, tokenizer, run_dir: Path) -> Path:
    """The run's result: adapter/ in PEFT's format (LoRA, QLoRA), or model/ (full fine-tuning)."""
    if config.method == "full":
        target = run_dir / "model"
        model.save_pretrained(target)
        tokenizer.save_pretrained(target)
        return target
    return save_adapter(model, run_dir / "adapter")


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
    (step counters are plain scalars). Collective under FSDP. """
    params = [p for group in optimizer.param_groups for p in group["params"]]
    state["state"] = {i: {k: distributed.shard_like(v, params[i]) if v.dim() else v for k, v in s.items()}
                      for i, s in state["state"].items()}
    return state
