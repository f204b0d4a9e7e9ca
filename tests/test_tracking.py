"""train.report_to: TensorBoard event files in the run directory, read back with tensorboard's own
reader, hold the metrics.jsonl records as scalars, the hyperparameters and loss.png; a missing
tracker library is a clear error before the run starts."""

import builtins
import json
from pathlib import Path

import numpy as np
import pytest
from test_training_loop import run_tiny

from lorakit import monitor
from lorakit.config import ConfigError, RunConfig
from lorakit.training.output import check_trackers


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


def test_report_to_is_off_by_default_and_checked():
    assert RunConfig().train.report_to == []
    with pytest.raises(ConfigError) as e:
        RunConfig.from_dict({}, ["data.train=x.jsonl", "train.report_to=[tensorboard, mlflow]"]).validate()
    assert "unknown tracker(s) 'mlflow'; valid choices are tensorboard" in str(e.value)


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


def test_no_tensorboard_directory_by_default(tmp_path):
    run_tiny(tmp_path)
    assert not (tmp_path / "tensorboard").exists()
    assert json.loads((tmp_path / "summary.json").read_text())["steps"] == 12
