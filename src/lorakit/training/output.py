"""What a run shows and writes for its user: ONE sink on rank 0, a silent one on every other rank.

Output (rank 0) owns the log lines, the progress bar (without it, a log line per logged step) and
the files that describe the run: config.yaml, metrics.jsonl (one line per logged step, "train", and
per evaluation, "eval"), loss.png and summary.json (before/after metrics, wall times, tokens, peak
memory, diagnostics), the before/after table, and the trackers of train.report_to, each given the
same records, the hyperparameters (the resolved config, flattened) and loss.png: TensorBoard (event
files in run_dir/tensorboard) and MLflow (a local store, run_dir/mlflow.db, or
MLFLOW_TRACKING_URI's). Silent (the other ranks) takes the same calls and does nothing, so the
training loop never asks which rank it runs on to report.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from .. import monitor
from ..config import ConfigError, RunConfig
from ..files import write_atomically
from .checkpoint import RunState

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"


@dataclass
class Report:
    """summary.json's facts, gathered as the run goes (the rest is in RunState)."""

    config: RunConfig
    world: int
    device: object                     # torch.device: where peak memory is measured
    counts: object                     # inject.TrainableReport: trainable and total parameters
    planned_peak: int | None           # the planner's predicted allocator peak (bytes), None when skipped
    wall_start: float                  # time.perf_counter() when the run started
    steps: int = 0                     # optimizer steps the result holds
    after: dict | None = None          # the trained model's evaluation (None when there is no result)
    diagnostics: list[monitor.Diagnostic] = field(default_factory=list)
    result_dir: Path | None = None     # adapter/ or model/
    no_result: str | None = None       # why no result is written, when none is
    peak: monitor.StepPeak | None = None  # the allocator's peak over the training steps (the planner's basis)


class Output:
    """Rank 0's sink: log lines, progress bar, metrics.jsonl, config.yaml, loss.png, summary.json."""

    def __init__(self, run_dir: Path, log=print, progress: bool = True):
        self.run_dir, self.log, self.progress = Path(run_dir), log, progress
        self.metrics = monitor.MetricsLog(self.run_dir / "metrics.jsonl")
        self._bar = None
        self._total = 0  # the run's optimizer steps (steps_begin)
        self._since = (0.0, 0)  # (train_seconds, tokens) at the last logged step: tokens/s between logs
        self.trackers: list[TensorBoard | MLflow] = []

    def open_trackers(self, config: RunConfig) -> None:
        """train.report_to's trackers (check_trackers has found their libraries)."""
        if "tensorboard" in config.train.report_to:
            self.trackers.append(TensorBoard(self.run_dir / "tensorboard", config))
        if "mlflow" in config.train.report_to:
            self.trackers.append(MLflow(self.run_dir, config))

    def _write(self, record: dict) -> None:
        self.metrics.write(record)
        for tracker in self.trackers:
            tracker.record(record)

    def started(self, config: RunConfig) -> None:
        """A fresh run: no metrics yet, the full resolved configuration in config.yaml."""
        self.metrics.path.unlink(missing_ok=True)
        write_atomically(self.run_dir / "config.yaml", yaml.safe_dump(config.to_dict(), sort_keys=False))

    def resumed(self, step: int, path: Path) -> None:
        self.metrics.truncate_after(step)  # what came after the checkpoint is written again
        for tracker in self.trackers:
            tracker.resumed(step, self.metrics.read())
        self.log(f"resumed from {path} (step {step})")

    def evaluated(self, step: int, metrics: dict | None) -> None:
        self._write({"type": "eval", "step": step, **metrics})

    def steps_begin(self, total: int, state: RunState) -> None:
        self._since = (state.train_seconds, 0)  # tokens/s counts training time only, not evaluation
        self._total = total
        if self.progress:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total, initial=state.step, desc="train", unit="step", file=sys.stderr,
                             dynamic_ncols=True)

    def trained(self, state: RunState, tokens: int, loss: float, lr: float, grad_norm: float, logged: bool,
                metrics: dict | None = None) -> None:
        """One optimizer step done (state.step); `logged`: a metrics line and a progress update.
        metrics: the objective's step metrics (DPO's rewards/..., trl's names), after the loop's own."""
        last, since = self._since[0], self._since[1] + tokens
        self._since = (last, since)
        if not logged:
            return
        now = state.train_seconds
        record = {"type": "train", "step": state.step, "loss": loss, "lr": lr, "grad_norm": grad_norm,
                  "tokens": state.tokens, "tokens_per_s": since / max(now - last, 1e-9),
                  "train_seconds": state.train_seconds, **(metrics or {})}
        self._write(record)
        self._since = (now, 0)
        if self._bar is None:  # no bar (--no-progress): the logged step as a line of the log
            shown = "".join(f", {name} {metrics[key]:.3f}" for name, key in
                            (("reward accuracy", "rewards/accuracies"), ("reward margin", "rewards/margins"))
                            if metrics and key in metrics)
            self.log(f"step {state.step}/{self._total}: loss {loss:.4f}{shown}, lr {lr:.2e}, grad norm "
                     f"{grad_norm:.3g}, {record['tokens_per_s']:,.0f} tokens/s, {now:.0f} s")
        else:
            self._bar.n = state.step
            shown = {"acc": f"{metrics['rewards/accuracies']:.2f}",
                     "margin": f"{metrics['rewards/margins']:.3f}"} if metrics and "rewards/margins" in metrics else {}
            self._bar.set_postfix(loss=f"{loss:.4f}", **shown, lr=f"{lr:.2e}",
                                  tok_s=f"{record['tokens_per_s']:.0f}", refresh=False)
            self._bar.refresh()

    def steps_end(self) -> None:
        if self._bar is not None:
            self._bar.close()

    def curve(self) -> list[dict]:
        """The training records logged so far (metrics.jsonl's "train" lines)."""
        return [r for r in self.metrics.read() if r.get("type") == "train"]

    def evaluations(self) -> list[dict]:
        """The evaluations logged so far (metrics.jsonl's "eval" lines)."""
        return [r for r in self.metrics.read() if r.get("type") == "eval"]

    def finish(self, report: Report, state: RunState) -> dict:
        """The trained model's evaluation in metrics.jsonl, loss.png, summary.json, the before/after
        table; returns the summary."""
        after = dict(report.after) if report.after is not None else None
        samples = after.pop("samples", []) if after else []
        if after is not None:
            self.evaluated(report.steps, after)
        plot = monitor.plot_losses(self.metrics.read(), self.run_dir / "loss.png")
        probed = probe_diagnostic(report.config)
        if probed:
            self.log(probed["message"])
        summary = {
            "method": report.config.method,
            "model": report.config.model.path or DEFAULT_MODEL_NAME,
            "steps": report.steps,
            "world_size": report.world,
            "trainable_parameters": report.counts.trainable,
            "total_parameters": report.counts.total,
            "before": state.before,
            "after": after,
            "tokens_seen": state.tokens,
            "train_seconds": state.train_seconds,
            "wall_seconds": time.perf_counter() - report.wall_start,
            **monitor.memory_summary(report.device, report.planned_peak, report.peak),  # peak_*, planned_peak_bytes
            "diagnostics": [dataclasses.asdict(d) for d in report.diagnostics] + ([probed] if probed else []),
            "result": str(report.result_dir) if report.result_dir else None,
            "no_result": report.no_result,
            "loss_plot": str(plot) if plot else None,
            "samples": samples[:5],
        }
        write_atomically(self.run_dir / "summary.json", json.dumps(summary, indent=2))
        for tracker in self.trackers:
            tracker.finish(after or {}, plot)
        self.log(before_after_table(state.before, after or {}))
        self.log(monitor.memory_line(summary))
        self.log(f"wrote {f'{report.result_dir}, ' if report.result_dir else ''}{self.run_dir / 'summary.json'}, "
                 f"{self.metrics.path}" + (f", {plot}" if plot else ""))
        return summary


class Silent:
    """The sink of every rank but 0: takes Output's calls and does nothing."""

    def log(self, message: str) -> None:
        pass

    def started(self, config: RunConfig) -> None:
        pass

    def resumed(self, step: int, path: Path) -> None:
        pass

    def evaluated(self, step: int, metrics: dict | None) -> None:
        pass

    def steps_begin(self, total: int, state: RunState) -> None:
        pass

    def trained(self, state: RunState, tokens: int, loss: float, lr: float, grad_norm: float, logged: bool,
                metrics: dict | None = None) -> None:
        pass

    def steps_end(self) -> None:
        pass

    def curve(self) -> list[dict]:
        return []

    def evaluations(self) -> list[dict]:
        return []

    def open_trackers(self, config: RunConfig) -> None:
        pass

    def finish(self, report: Report, state: RunState) -> None:
        return None


def check_trackers(report_to: list[str]) -> None:
    """ConfigError, before the run starts, when a tracker of train.report_to is not installed."""
    problems = []
    if "tensorboard" in report_to:
        try:
            import tensorboard  # noqa: F401  (torch.utils.tensorboard needs it)
        except ImportError:
            problems.append("train.report_to includes 'tensorboard', but the tensorboard package is not installed: "
                            "pip install tensorboard (or leave train.report_to empty; metrics.jsonl is always written)")
    if "mlflow" in report_to:
        # find_spec, not import: importing mlflow takes seconds, paid only when the run starts logging
        missing = [name for name in MLFLOW_MODULES if importlib.util.find_spec(name) is None]
        if missing:
            problems.append(f"train.report_to includes 'mlflow', but {', '.join(missing)} "
                            f"{'is' if len(missing) == 1 else 'are'} not installed: pip install 'lorakit[mlflow]' "
                            "(mlflow-skinny with its SQLite store; or leave train.report_to empty; "
                            "metrics.jsonl is always written)")
    if problems:
        raise ConfigError("run configuration", problems)


class TensorBoard:
    """TensorBoard event files in `log_dir`: every metrics.jsonl record as scalars ("train/loss",
    "eval/val_loss", ... at its step), and at the end the hyperparameters (the resolved config,
    with the final evaluation as their metrics) and loss.png as an image."""

    def __init__(self, log_dir: Path, config: RunConfig):
        self.log_dir, self.config = log_dir, config
        self.writer = self._open()

    def _open(self, purge_step: int | None = None):
        from torch.utils.tensorboard import SummaryWriter

        return SummaryWriter(log_dir=str(self.log_dir), purge_step=purge_step)

    def resumed(self, step: int, records: list[dict]) -> None:
        """A resumed run writes what came after its checkpoint again: TensorBoard drops the old ones."""
        self.writer.close()
        self.writer = self._open(purge_step=step + 1)

    def record(self, record: dict) -> None:
        for key, value in record.items():
            if key not in ("type", "step") and isinstance(value, (int, float)) and not isinstance(value, bool):
                self.writer.add_scalar(f"{record['type']}/{key}", value, record["step"])
        self.writer.flush()

    def finish(self, after: dict, plot: Path | None) -> None:
        hparams = {key: value if isinstance(value, (bool, int, float, str)) else json.dumps(value)
                   for key, value in _flatten(self.config.to_dict()).items()}
        final = {f"hparam/{k}": v for k, v in after.items()
                 if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}
        self.writer.add_hparams(hparams, final, run_name=".")  # "." : in this directory, not a new one
        if plot is not None:
            import matplotlib.image

            self.writer.add_image("loss.png", matplotlib.image.imread(plot)[..., :3], dataformats="HWC")
        self.writer.close()


# What train.report_to: [mlflow] needs (the extra lorakit[mlflow]): the client, and SQLAlchemy and
# Alembic for its SQLite store (mlflow-skinny leaves them out; MLflow 3 refuses a plain-file store
# unless MLFLOW_ALLOW_FILE_STORE is set: it is in maintenance mode, SQLite is its local store now).
MLFLOW_MODULES = ("mlflow", "sqlalchemy", "alembic")
MLFLOW_EXPERIMENT = "lorakit"  # unless MLFLOW_EXPERIMENT_NAME names another


def mlflow_tracking_uri(run_dir: Path) -> str:
    """Where train.report_to: [mlflow] writes: MLFLOW_TRACKING_URI when the user set one, else a
    SQLite store in the run directory (`mlflow ui --backend-store-uri sqlite:///RUN_DIR/mlflow.db`)."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path(run_dir).resolve() / 'mlflow.db'}"


class MLflow:
    """One MLflow run per run directory: every metrics.jsonl record as metrics ("train/loss",
    "eval/val_loss", ... at its step), the resolved config flattened as parameters ("train.lr": "0.02"),
    and at the end loss.png as an artifact. The run is created at the first record; a resumed run
    replaces it with one rebuilt from metrics.jsonl (cut at the checkpoint), so each step is logged once."""

    def __init__(self, run_dir: Path, config: RunConfig):
        from mlflow.tracking import MlflowClient

        self.run_dir, self.config = Path(run_dir).resolve(), config
        self.uri = mlflow_tracking_uri(run_dir)
        self.client = MlflowClient(tracking_uri=self.uri)
        # a tag that finds this directory's run again on resume (a hash: no quoting in a search filter)
        self.tag = ("lorakit.run_dir_id", hashlib.sha256(str(self.run_dir).encode()).hexdigest()[:16])
        self.run_id: str | None = None

    def _experiment(self) -> str:
        name = os.environ.get("MLFLOW_EXPERIMENT_NAME") or MLFLOW_EXPERIMENT
        found = self.client.get_experiment_by_name(name)
        if found is not None:
            return found.experiment_id
        # artifacts next to the store when the store is ours; otherwise where the user's store puts them
        local = None if os.environ.get("MLFLOW_TRACKING_URI") else (self.run_dir / "mlartifacts").as_uri()
        return self.client.create_experiment(name, artifact_location=local)

    def _start(self) -> str:
        """A new MLflow run with the config as its parameters (at most 100 per call: MLflow's limit)."""
        from mlflow.entities import Param

        run = self.client.create_run(self._experiment(), run_name=self.run_dir.name,
                                     tags={self.tag[0]: self.tag[1], "lorakit.run_dir": str(self.run_dir)})
        params = [Param(key, value if isinstance(value, str) else json.dumps(value))
                  for key, value in _flatten(self.config.to_dict()).items()]
        for i in range(0, len(params), 100):
            self.client.log_batch(run.info.run_id, params=params[i:i + 100], synchronous=True)
        return run.info.run_id

    def record(self, record: dict) -> None:
        self._log([record])

    def _log(self, records: list[dict]) -> None:
        from mlflow.entities import Metric

        if self.run_id is None:
            self.run_id = self._start()
        now = int(time.time() * 1000)
        metrics = [Metric(f"{r['type']}/{key}", float(value), now, r["step"])
                   for r in records for key, value in r.items()
                   if key not in ("type", "step") and isinstance(value, (int, float)) and not isinstance(value, bool)]
        for i in range(0, len(metrics), 1000):  # MLflow's limit of metrics per call
            self.client.log_batch(self.run_id, metrics=metrics[i:i + 1000], synchronous=True)

    def resumed(self, step: int, records: list[dict]) -> None:
        """Delete this directory's earlier MLflow run (it holds the steps after the checkpoint, which
        are trained again) and log metrics.jsonl's records, already cut at `step`, to a new one."""
        tag, value = self.tag
        for run in self.client.search_runs([self._experiment()], filter_string=f"tags.`{tag}` = '{value}'"):
            self.client.delete_run(run.info.run_id)
        self.run_id = None
        self._log(records)

    def finish(self, after: dict, plot: Path | None) -> None:
        if self.run_id is None:
            self.run_id = self._start()
        if plot is not None:
            self.client.log_artifact(self.run_id, str(plot))
        self.client.set_terminated(self.run_id)


def _flatten(tree: dict, prefix: str = "") -> dict:
    """{"train": {"lr": 1}} -> {"train.lr": 1}."""
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


# The probe's verdict in summary.json: `lorakit probe` records its report under a key of the run
# config (probe_record_path), `lorakit train` of the same config finds it there. The key leaves out
# what does not change what a step trains: how long (the probe runs its own steps), what is logged
# and where, and the evaluation.
PROBE_KEY_IGNORES = ("train.steps", "train.epochs", "train.log_every", "train.save_every", "train.report_to",
                     "train.threads", "train.dist_timeout_s", "eval")


def probe_key(config: RunConfig) -> str:
    """SHA-256 of the run config (JSON, sorted keys) without PROBE_KEY_IGNORES: equal for `lorakit probe
    my.yaml` and `lorakit train my.yaml`, whatever their steps. Taken after data.max_length "auto" is
    resolved (load_data), as both commands do before they get here."""
    kept = {key: value for key, value in _flatten(config.to_dict()).items()
            if not any(key == i or key.startswith(i + ".") for i in PROBE_KEY_IGNORES)}
    return hashlib.sha256(json.dumps(kept, sort_keys=True, default=str).encode()).hexdigest()


def probe_record_path(config: RunConfig) -> Path:
    """Where `lorakit probe` records its report for `config`: lorakit's cache ($LORAKIT_CACHE or
    ~/.cache/lorakit) /probes/<probe_key>.json (a run directory must be new when training starts)."""
    from ..models import cache_dir

    return cache_dir() / "probes" / f"{probe_key(config)}.json"


def probe_diagnostic(config: RunConfig) -> dict | None:
    """summary.json's diagnostic for the probe recorded for this config (kind "probe", step 0: it
    came before training): its verdict, recommended rank and learning rate; None when there is none."""
    path = probe_record_path(config)
    try:
        report = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(report, dict) or report.get("config_key") != probe_key(config) or "verdict" not in report:
        return None
    rank, lr, alpha = report.get("recommended_rank"), report.get("recommended_lr"), report.get("recommended_alpha")
    pairs = (("lora.r", rank, config.lora.r), ("lora.alpha", alpha, config.lora.alpha),
             ("train.lr", lr, config.train.lr))
    advice = "; ".join(f"recommended {name}={value:g} (configured {now:g})" for name, value, now in pairs
                       if isinstance(value, (int, float)) and isinstance(now, (int, float)))
    subset = report.get("layers")
    return {"kind": "probe", "step": 0,
            "message": f"lorakit probe of this config ({report.get('steps')} steps per run"
                       + (f", layers {subset}" if subset else "") + f"): {report['verdict']}"
                       + (f"; {advice}" if advice else "") + f" ({path})",
            "verdict": report["verdict"], "verdict_kind": report.get("verdict_kind"), "cause": report.get("cause"),
            "recommended_rank": rank, "recommended_alpha": alpha, "recommended_lr": lr,
            "probe_steps": report.get("steps"), "layers": subset, "record": str(path)}


def sink(main: bool, run_dir: Path, log=print, progress: bool = True) -> Output | Silent:
    """Output on rank 0 (main), Silent elsewhere."""
    return Output(run_dir, log, progress) if main else Silent()


def model_line(config: RunConfig, counts, device, ranks: int) -> str:
    """The log line saying what is trained on what: "model: NAME (method) on DEVICE [x N ranks]; counts"."""
    return (f"model: {config.model.path or 'SmolLM2-135M-Instruct'} ({config.method}) on {device}"
            + (f" x {ranks} ranks ({config.train.strategy})" if ranks > 1 else "") + f"; {counts}")


def data_line(config: RunConfig, train, validation, test, world: int) -> str:
    """The log line saying what the run trains on and how much a step takes."""
    t = config.train
    return (f"data: {len(train.examples)} train examples ({train.tokens:,} tokens, {train.truncated} truncated at "
            f"{config.data.max_length}), {len(validation.examples) if validation else 0} validation, "
            f"{len(test.examples) if test else 0} test; global batch {t.batch_size} x {t.grad_accum} accumulation x "
            f"{world} ranks = {t.batch_size * t.grad_accum * world} examples per step")


def summary_line(metrics: dict) -> str:
    """One evaluation in words: exact match, pair accuracy, held-out loss and perplexity."""
    parts = []
    if "exact_match" in metrics:
        parts.append(f"exact match {100 * metrics['exact_match']:.1f}%")
    if "pair_accuracy" in metrics:
        parts.append(f"pair accuracy {100 * metrics['pair_accuracy']:.1f}%")
    if "val_loss" in metrics:
        parts.append(f"held-out loss {metrics['val_loss']:.4f}"
                     + (f" (ppl {metrics['val_ppl']:.2f})" if "val_ppl" in metrics else ""))
    if "retention_kl" in metrics:
        parts.append(f"retention KL {metrics['retention_kl']:.4f}")
    return ", ".join(parts) or "no held-out data"


def before_after_table(before: dict | None, after: dict) -> str:
    """The base model's and the trained model's held-out metrics side by side."""
    before = before or {}
    rows = [("held-out exact match", "exact_match", lambda v: f"{100 * v:.1f}%"),
            ("held-out pair accuracy", "pair_accuracy", lambda v: f"{100 * v:.1f}%"),
            ("held-out reward accuracy", "rewards/accuracies", lambda v: f"{100 * v:.1f}%"),
            ("held-out reward margin", "rewards/margins", lambda v: _number(v, 4)),
            ("held-out loss", "val_loss", lambda v: _number(v, 4)),
            ("held-out perplexity", "val_ppl", lambda v: _number(v, 2)),
            ("retention KL(base || tuned)", "retention_kl", lambda v: _number(v, 4))]
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
