"""Setting a run up: the learning-rate schedule."""

import pytest

from lorakit.config import RunConfig
from lorakit.training.setup import lr_lambda


def test_schedule_warmup_then_cosine():
    config = RunConfig.from_dict({}, ["train.steps=10", "train.warmup_steps=2"])
    f = lr_lambda(config)
    assert [f(0), f(1)] == [0.5, 1.0]
    assert f(2) == 1.0 and f(6) == pytest.approx(0.5) and f(10) == pytest.approx(0.0)
    f = lr_lambda(RunConfig.from_dict({}, ["train.steps=10", "train.warmup_steps=0", "train.schedule=linear"]))
    assert f(5) == pytest.approx(0.5)
