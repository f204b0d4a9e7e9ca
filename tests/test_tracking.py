"""train.report_to: TensorBoard event files in the run directory, read back with tensorboard's own
reader, and the MLflow run in the run directory's store, read back with mlflow's own client, hold the
metrics.jsonl records, the hyperparameters and loss.png; a missing tracker library is a clear error
before the run starts."""

import builtins
import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from test_training_loop import run_tiny

from lorakit import monitor
from lorakit.config import ConfigError, RunConfig
from lorakit.training.output import check_trackers, mlflow_tracking_uri


def test_tensorboard_event_files_hold_the_logged_scalars(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    summary = run_tiny(tmp_path, ["train.report_to=[tensorboard]", "eval.retention=true"])
    events = EventAccumulator(str(tmp_path / "tensorboard"), size_guidance={"scalars": 0, "images": 0})
    events.Reload()
    records = monitor.MetricsLog(tmp_path / "metrics.jsonl").read()
    for kind, key in (("train", "loss"), ("train", "lr"), ("train", "grad_norm"), ("eval", "val_loss"),
                      ("eval", "retention_kl")):
        logged = [(r["step"], r[key]) for r in records if r["type"] == kind and key in r]
        read = [(e.step, e.value) for e in events.Scalars(f"{kind}/{key}")]
        # TensorBoard keeps float32
        assert read == [(s, float(np.float32(v))) for s, v in logged], f"{kind}/{key}"
    assert len(events.Scalars("train/loss")) == 12 and [e.step for e in events.Scalars("eval/val_loss")] == [0, 4, 8, 12]
    # the final evaluation as the hyperparameters' metrics, and loss.png as an image
    assert events.Scalars("hparam/val_loss")[0].value == pytest.approx(summary["after"]["val_loss"], rel=1e-6)
    (image,) = events.Images("loss.png")
    assert (image.width, image.height) == (770, 440)  # loss.png: 7 x 4 inches at 110 dpi
    from tensorboard.plugins.hparams.plugin_data_pb2 import HParamsPluginData

    start = HParamsPluginData.FromString(events.PluginTagToContent("hparams")["_hparams_/session_start_info"])
    hparams = start.session_start_info.hparams
    assert (hparams["train.lr"].number_value, hparams["lora.r"].number_value) == (0.02, 4)
    assert hparams["eval.retention"].number_value == 1 and hparams["method"].string_value == "lora"


def test_tensorboard_after_a_resume_holds_each_step_once(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from lorakit.training import Hooks

    def crash(step, path):
        if step == 8:
            raise KeyboardInterrupt("killed")

    with pytest.raises(KeyboardInterrupt):
        run_tiny(tmp_path, ["train.report_to=[tensorboard]"], hooks=Hooks(after_checkpoint=crash))
    run_tiny(tmp_path, ["train.report_to=[tensorboard]"], resume=True)
    events = EventAccumulator(str(tmp_path / "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    assert [e.step for e in events.Scalars("train/loss")] == list(range(1, 13))


def test_mlflow_run_holds_metrics_params_and_plot_each_step_once_after_a_resume(tmp_path, monkeypatch):
    pytest.importorskip("mlflow")
    pytest.importorskip("sqlalchemy")
    from mlflow.tracking import MlflowClient

    from lorakit.training import Hooks

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")

    def crash(step, path):
        if step == 8:
            raise KeyboardInterrupt("killed")

    overrides = ["train.report_to=[mlflow]"]
    with pytest.raises(KeyboardInterrupt):
        run_tiny(tmp_path, overrides, hooks=Hooks(after_checkpoint=crash))
    summary = run_tiny(tmp_path, overrides, resume=True)

    uri = mlflow_tracking_uri(tmp_path)
    assert uri == f"sqlite:///{tmp_path.resolve() / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("lorakit")
    (run,) = client.search_runs([experiment.experiment_id])  # the crashed run was replaced, not kept beside
    assert run.info.status == "FINISHED" and run.info.run_name == tmp_path.name
    records = monitor.MetricsLog(tmp_path / "metrics.jsonl").read()
    for kind, key in (("train", "loss"), ("train", "lr"), ("train", "grad_norm"), ("eval", "val_loss")):
        logged = [(r["step"], r[key]) for r in records if r["type"] == kind and key in r]
        history = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, f"{kind}/{key}"))
        assert history == logged, f"{kind}/{key}"  # MLflow keeps float64: equal, each step once
    assert [s for s, _ in sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, "train/loss"))
            ] == list(range(1, 13))
    assert run.data.metrics["eval/val_loss"] == summary["after"]["val_loss"]
    params = run.data.params
    assert (params["train.lr"], params["lora.r"], params["method"], params["train.report_to"]) == (
        "0.02", "4", "lora", '["mlflow"]')
    resolved = yaml.safe_load((tmp_path / "config.yaml").read_text())  # every key of the run's config
    assert params == {k: v if isinstance(v, str) else json.dumps(v) for k, v in _flat(resolved).items()}
    (artifact,) = client.list_artifacts(run.info.run_id)
    assert artifact.path == "loss.png"
    local = Path(client.download_artifacts(run.info.run_id, "loss.png", str(tmp_path / "download")))
    assert local.read_bytes() == (tmp_path / "loss.png").read_bytes()
    assert (tmp_path / "mlartifacts").is_dir() and not (Path.cwd() / "mlruns").exists()


def _flat(tree, prefix=""):
    out = {}
    for key, value in tree.items():
        out.update(_flat(value, f"{prefix}{key}.") if isinstance(value, dict) else {f"{prefix}{key}": value})
    return out


def test_mlflow_tracking_uri_is_the_users_when_set(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://tracking.example:5000")
    assert mlflow_tracking_uri(tmp_path) == "http://tracking.example:5000"
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    assert mlflow_tracking_uri(tmp_path / "run") == f"sqlite:///{(tmp_path / 'run').resolve()}/mlflow.db"


def test_report_to_is_off_by_default_and_checked():
    assert RunConfig().train.report_to == []
    RunConfig.from_dict({}, ["data.train=x.jsonl", "train.report_to=[tensorboard, mlflow]"]).validate()
    with pytest.raises(ConfigError) as e:
        RunConfig.from_dict({}, ["data.train=x.jsonl", "train.report_to=[tensorboard, wandb]"]).validate()
    assert "unknown tracker(s) 'wandb'; valid choices are tensorboard, mlflow" in str(e.value)


def test_a_missing_tensorboard_is_a_clear_error(monkeypatch):
    real = builtins.__import__

    def no_tensorboard(name, *args, **kwargs):
        if name == "tensorboard" or name.startswith("tensorboard."):
            raise ImportError(f"No module named {name!r}")
        return real(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_tensorboard)
    with pytest.raises(ConfigError, match="pip install tensorboard"):
        check_trackers(["tensorboard"])
    check_trackers([])  # nothing asked, nothing needed


def test_a_missing_mlflow_is_a_clear_error_naming_the_extra(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name in ("mlflow", "alembic")
                        else real(name, *a))
    with pytest.raises(ConfigError) as e:
        check_trackers(["mlflow"])
    assert ("train.report_to includes 'mlflow', but mlflow, alembic are not installed: "
            "pip install 'lorakit[mlflow]'") in str(e.value)


def test_no_tensorboard_directory_by_default(tmp_path):
    run_tiny(tmp_path)
    assert not (tmp_path / "tensorboard").exists()
    assert json.loads((tmp_path / "summary.json").read_text())["steps"] == 12
