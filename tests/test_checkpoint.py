"""Checkpoints: state.json's format, save/load round trips, a full disk, and which checkpoints a
resumed run accepts."""

import errno
import json

import pytest
import torch

from lorakit.config import RunConfig
from lorakit.training.checkpoint import (CHECKPOINTS_KEPT, RunState, check_resume, checkpoints, load_checkpoint,
                                         remove_temporary_checkpoints, run_settings, save_checkpoint,
                                         temporary_checkpoints)


def test_run_state_writes_state_json_as_before_and_reads_old_ones():
    """The dict that train() wrote as state.json before RunState existed, byte for byte."""
    old = {"tokens": 1234, "train_seconds": 5.5, "best_loss": 0.25, "before": {"val_loss": 3.0, "val_ppl": 20.1},
           "config": {"method": "lora", "lora": {"r": 4}}}
    text = json.dumps({**old, "step": 8}, indent=2)
    state = RunState.from_json(text)
    assert state == RunState(1234, 5.5, 0.25, {"val_loss": 3.0, "val_ppl": 20.1}, {"method": "lora", "lora": {"r": 4}}, 8)
    assert state.to_json() == text
    # written before checkpoints kept their settings: no "config"
    assert RunState.from_json(json.dumps({"tokens": 1, "train_seconds": 0.5, "best_loss": None, "before": None,
                                          "step": 2})) == RunState(1, 0.5, None, None, None, 2)


def tiny_model():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    model[1].requires_grad_(False)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0 / (s + 1))
    model(torch.ones(2, 3)).sum().backward()
    optimizer.step()
    scheduler.step()
    return model, optimizer, scheduler


def test_save_then_load_restores_weights_optimizer_rng_and_state(tmp_path):
    model, optimizer, scheduler = tiny_model()
    state = RunState(tokens=10, train_seconds=1.0, best_loss=0.5, step=3)
    path = save_checkpoint(tmp_path, model, optimizer, scheduler, state)
    assert path == tmp_path / "checkpoints" / "step-3" and checkpoints(tmp_path) == [(3, path)]
    expected_rng = torch.rand(5)  # what comes after the saved RNG state

    fresh, fresh_optimizer, fresh_scheduler = tiny_model()
    with torch.no_grad():
        fresh[0].weight.zero_()
    assert load_checkpoint(path, fresh, fresh_optimizer, fresh_scheduler) == state
    assert torch.equal(fresh[0].weight, model[0].weight) and torch.equal(fresh[0].bias, model[0].bias)
    assert torch.equal(fresh_optimizer.state_dict()["state"][0]["exp_avg"], optimizer.state_dict()["state"][0]["exp_avg"])
    assert fresh_scheduler.state_dict() == scheduler.state_dict()
    assert torch.equal(torch.rand(5), expected_rng)


def test_only_the_newest_checkpoints_are_kept(tmp_path):
    model, optimizer, scheduler = tiny_model()
    for step in (2, 4, 6, 8):
        save_checkpoint(tmp_path, model, optimizer, scheduler, RunState(step=step))
    assert [s for s, _ in checkpoints(tmp_path)] == [6, 8][-CHECKPOINTS_KEPT:]


class FullDisk:
    """A scheduler whose state cannot be written: what torch.save meets on a full disk."""

    def state_dict(self):
        raise OSError(errno.ENOSPC, "No space left on device")


def test_a_full_disk_leaves_the_last_checkpoint_and_says_how_to_go_on(tmp_path):
    model, optimizer, scheduler = tiny_model()
    save_checkpoint(tmp_path, model, optimizer, scheduler, RunState(step=2))
    with pytest.raises(OSError, match=r"could not write checkpoint step-4 in .*checkpoints \(No space left on device; "
                                      r"[\d,]+ bytes free there\)\. Nothing was lost: continue from step-2 with "
                                      rf"`lorakit train --resume {tmp_path}` once there is room"):
        save_checkpoint(tmp_path, model, optimizer, FullDisk(), RunState(step=4))
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step-2"]  # no half checkpoint


def test_temporary_checkpoints_are_found_and_removed(tmp_path):
    (tmp_path / "checkpoints" / ".step-3.1234.abcd").mkdir(parents=True)
    (tmp_path / "checkpoints" / "step-2").mkdir()
    (tmp_path / "checkpoints" / "step-2" / "state.json").write_text("{}")
    assert [p.name for p in temporary_checkpoints(tmp_path)] == [".step-3.1234.abcd"]
    remove_temporary_checkpoints(tmp_path)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-2"]


def write_checkpoint_settings(run_dir, settings):
    path = run_dir / "checkpoints" / "step-2"
    path.mkdir(parents=True)
    (path / "state.json").write_text(RunState(config=settings, step=2).to_json())


@pytest.mark.parametrize("method, quantize", [("qlora", "nf4"), ("lora", None), ("lora", "none"), ("full", None)])
def test_resume_accepts_a_checkpoint_that_still_has_model_quantize(tmp_path, method, quantize):
    """Checkpoints written before model.quantize was retired keep it in their settings; when it
    agrees with the method, the run is the same and resumes."""
    config = RunConfig.from_dict({}, [f"method={method}"])
    settings = run_settings(config)
    settings["model"]["quantize"] = quantize
    write_checkpoint_settings(tmp_path, settings)
    check_resume(tmp_path, config)


def test_resume_refuses_changed_settings_and_a_contradicting_model_quantize(tmp_path):
    config = RunConfig.from_dict({}, ["method=lora", "lora.r=4"])
    settings = run_settings(config)
    settings["model"]["quantize"] = "nf4"  # a 4-bit base: not the run that is resumed now
    settings["lora"]["r"] = 8
    write_checkpoint_settings(tmp_path, settings)
    with pytest.raises(ValueError, match=r"changed since checkpoint step-2 was written \(model\.quantize: 'nf4' -> None; "
                                         r"lora\.r: 8 -> 4\)"):
        check_resume(tmp_path, config)


def test_resume_ignores_the_settings_a_resumed_run_may_change(tmp_path):
    write_checkpoint_settings(tmp_path, run_settings(RunConfig.from_dict({}, ["train.steps=10"])))
    check_resume(tmp_path, RunConfig.from_dict({}, ["train.steps=20", "train.save_every=5", "eval.every=0",
                                                    "train.compile=true"]))  # the same steps, compiled


def test_resume_accepts_a_checkpoint_written_before_keys_were_added(tmp_path):
    """Settings added since a checkpoint was written take their defaults, which is what that run did."""
    config = RunConfig.from_dict({}, ["lora.r=4"])
    settings = run_settings(config)
    del settings["objective"], settings["preference"], settings["lora"]["dora"], settings["train"]["epochs"]
    del settings["data"]["columns"], settings["train"]["loraplus_ratio"]
    write_checkpoint_settings(tmp_path, settings)
    check_resume(tmp_path, config)
    with pytest.raises(ValueError, match=r"\(lora\.dora: False -> True\)"):
        check_resume(tmp_path, RunConfig.from_dict({}, ["lora.r=4", "lora.dora=true"]))
