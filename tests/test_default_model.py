"""The real default model, SmolLM2-135M-Instruct, for a few steps of the default run's recipe."""

import json

import torch

from lorakit import load_adapter
from lorakit.config import RunConfig
from lorakit.data import collate
from lorakit.models import load_model
from lorakit.training import Prepared, train
from lorakit.training.setup import load_data, prepare_model


def test_default_recipe_on_the_real_model_for_three_steps(tmp_path):
    config = RunConfig.from_dict({}, ["train.steps=3", "train.warmup_steps=1", "train.batch_size=8",
                                      "data.n_train=200", "data.n_test=8", "data.validation_fraction=0.05",
                                      "eval.every=0", "train.save_every=2"]).validate()
    model, tokenizer = load_model()
    assert model.lm_head.weight is model.model.embed_tokens.weight  # tied, as published
    prepare_model(model, config)
    train_set, val, test = load_data(config, tokenizer)
    assert (len(train_set.examples), len(val.examples), len(test.examples)) == (190, 10, 8)
    summary = train(config, tmp_path, prepared=Prepared(model, tokenizer, train_set, val, test),
                    progress=False, log=lambda *_: None)
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if r["type"] == "train"]
    assert len(losses) == 3
    from lorakit.data import batch_at

    batch = collate(batch_at(train_set, 0, 8, 0), tokenizer.pad_token_id)
    fresh, _ = load_model()
    with torch.no_grad():  # the base model's loss on the first batch, computed by transformers
        expected = fresh(**batch).loss.item()
    assert abs(losses[0] - expected) < 1e-4  # the run's first loss is transformers' own loss
    assert summary["before"]["exact_match"] == 0.0 and summary["after"]["val_loss"] < summary["before"]["val_loss"]
    # the saved adapter reproduces the trained model
    load_adapter(fresh, tmp_path / "adapter")
    with torch.no_grad():
        torch.testing.assert_close(fresh(**batch).logits, model(**batch).logits, rtol=1e-4, atol=1e-4)
