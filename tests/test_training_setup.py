"""Setting a run up: the learning-rate schedule, the data (load_data, check_data)."""

import json

import pytest
import torch
from conftest import char_tokenizer

from lorakit.config import ConfigError, RunConfig
from lorakit.training.evaluate import generate
from lorakit.training.setup import check_data, load_data, lr_lambda, steps_for_epochs

tok = char_tokenizer()


def test_schedule_warmup_then_cosine():
    config = RunConfig.from_dict({}, ["train.steps=10", "train.warmup_steps=2"])
    f = lr_lambda(config)
    assert [f(0), f(1)] == [0.5, 1.0]
    assert f(2) == 1.0 and f(6) == pytest.approx(0.5) and f(10) == pytest.approx(0.0)
    f = lr_lambda(RunConfig.from_dict({}, ["train.steps=10", "train.warmup_steps=0", "train.schedule=linear"]))
    assert f(5) == pytest.approx(0.5)


# --- the data of a run: load_data (read, check, fill in what the config leaves to the data), check_data ---

def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def qa(n, start=0, long_every=0):
    """question/answer rows; every long_every-th answer is 20 characters longer."""
    return [{"question": f"Q{i}?", "answer": f"A{i}" + ("x" * 20 if long_every and i % long_every == 0 else "")}
            for i in range(start, start + n)]


def config_for(tmp_path, *sets, train=None, test=None):
    train = train or write_jsonl(tmp_path / "train.jsonl", qa(40))
    test = test or write_jsonl(tmp_path / "test.jsonl", qa(4, start=100))
    return RunConfig.from_dict({}, [f"data.train={train}", f"data.test={test}", "data.validation_fraction=0",
                                    "data.columns={prompt: question, completion: answer}", *sets])


def test_load_data_fills_in_max_length_auto_and_max_new_tokens(tmp_path):
    train = write_jsonl(tmp_path / "long.jsonl", qa(40, long_every=10))
    config = config_for(tmp_path, "data.max_length=auto", train=train)
    lines = []
    ds, validation, test = load_data(config, tok, log=lines.append)
    # "Q10?" + "A10" + 20 x "x" + EOS = 28 tokens: the longest; "A100" (4 tokens) the longest reference
    assert config.data.max_length == 28 == ds.max_length and ds.truncated == 0 and validation is None
    assert config.eval.max_new_tokens == 6
    assert lines == ["data check: train tokens per example min 6 / median 8 / p95 28 / max 28; 0 error(s), 0 warning(s)",
                     "data.max_length=auto: 28 tokens (the longest training example, at most 2048)",
                     "eval.max_new_tokens: 6 (the longest test reference + 2)",
                     "data: 65% of the tokens of padded batches of 16 are padding; data.padding_free=true trains the "
                     "same batches without computing on it"]


def test_load_data_warns_of_truncation_and_stops_on_leakage(tmp_path):
    config = config_for(tmp_path, "data.max_length=8", "eval.max_new_tokens=3",
                        train=write_jsonl(tmp_path / "long.jsonl", qa(40, long_every=10)))
    lines = []
    load_data(config, tok, log=lines.append)
    assert config.eval.max_new_tokens == 3  # set: kept
    # Q0 keeps 5 of its 23 supervised tokens, Q10, Q20, Q30 4 of their 24: 18 + 3 x 20 = 78 dropped
    assert lines[1].startswith("warning: [truncation] HEAVY TRUNCATION: data.max_length=8 cuts 4 of 40 training "
                               "examples and drops 78 of their 230 supervised tokens (33.9%)")
    leaky = config_for(tmp_path, test=write_jsonl(tmp_path / "leaky.jsonl", qa(4, start=38) + qa(4, start=200)))
    with pytest.raises(ConfigError, match=r"\[leakage\] 2 of 8 test examples \(25.0%\) also appear in the training "
                                          r"data .* \(e.g. .*leaky.jsonl:1 = .*train.jsonl:39"):
        load_data(leaky, tok, log=lambda _: None)
    leaky.data.max_leakage = 0.5
    assert len(load_data(leaky, tok, log=lambda _: None)[2].examples) == 8  # below the limit: a warning only


def test_load_data_packs_whole_examples(tmp_path):
    config = config_for(tmp_path, "data.packing=true", "data.max_length=32")
    ds, _, _ = load_data(config, tok, log=lambda _: None)
    assert sum(len(row.lengths) for row in ds.examples) == 40
    assert [len(row.input_ids) for row in ds.examples][:3] == [32, 32, 32]
    assert ds.supervised_tokens == load_data(config_for(tmp_path), tok, log=lambda _: None)[0].supervised_tokens


def test_epochs_become_steps_that_cover_them(tmp_path):
    config = config_for(tmp_path, "train.epochs=2", "train.batch_size=8", "train.grad_accum=2")
    ds, validation, _ = load_data(config, tok, log=lambda _: None)
    check_data(config, ds, validation)
    # 40 examples / 8 = 5 micro-batches an epoch; 2 epochs = 10 micro-batches = 5 steps of 2
    assert (config.train.steps, config.train.epochs) == (5, None)
    config = config_for(tmp_path, "train.epochs=1.5", "train.batch_size=16")
    check_data(config, ds, validation, world=2)  # 40 // 32 = 1 micro-batch an epoch: 1.5 -> 2 steps
    assert config.train.steps == 2
    assert steps_for_epochs(config_for(tmp_path, "train.epochs=0.1"), ds) == 1  # at least one step
    with pytest.raises(ConfigError, match="train.steps=4 and train.epochs=2: give one of them"):
        config_for(tmp_path, "train.epochs=2", "train.steps=4")
    with pytest.raises(ConfigError, match="train.epochs=-1: must be > 0"):
        config_for(tmp_path, "train.epochs=-1")


def test_the_schedule_follows_the_steps_epochs_give(tmp_path):
    config = config_for(tmp_path, "train.epochs=2", "train.batch_size=8", "train.warmup_steps=0")
    ds, validation, _ = load_data(config, tok, log=lambda _: None)
    check_data(config, ds, validation)
    f = lr_lambda(config)  # 10 steps: cosine from 1 at step 0 to 0 at step 10
    assert config.train.steps == 10 and f(5) == pytest.approx(0.5) and f(10) == pytest.approx(0.0)


def test_data_keys_are_checked_with_the_config(tmp_path):
    with pytest.raises(ConfigError) as e:
        RunConfig.from_dict({}, ["data.max_length=longest", "data.columns={prompt: q, reply: a}",
                                 "data.max_leakage=2"])
    assert e.value.problems == [
        "data.max_length='longest': a number of tokens, or 'auto' (the longest training example, at most 2048)",
        "data.columns: unknown key(s) 'reply'; the formats' keys are prompt, completion, answer, instruction, input, "
        "output, messages, conversations, text, chosen, rejected",
        "data.max_leakage=2: a fraction in [0, 1] (1: never an error)"]
    assert RunConfig.from_dict({}).train.steps == 30 and RunConfig.from_dict({}).eval.max_new_tokens is None


def test_generate_stops_at_end_of_turn_and_strips_special_tokens():
    """evaluate.generate passes every end-of-turn id to model.generate and decodes without specials."""
    class Model:
        training, device = False, "cpu"
        seen = {}

        def eval(self):
            return self

        def train(self, mode=True):
            return self

        def generate(self, input_ids, attention_mask, **kwargs):
            Model.seen = kwargs
            reply = torch.tensor([[*tok("ab")["input_ids"], tok.eos_token_id, tok.pad_token_id]])
            return torch.cat([input_ids, reply.expand(len(input_ids), -1)], dim=1)

    assert generate(Model(), tok, ["Q?"], None, batch_size=4) == ["ab"]
    assert Model.seen["eos_token_id"] == [tok.eos_token_id] and Model.seen["max_new_tokens"] == 12


def test_loftq_run_quantizes_every_linear_but_the_head_and_loraplus_sets_the_groups(tmp_path):
    # method qlora + lora.init loftq: the base is read in full precision, the layers LoftQ does not
    # adapt are made NF4 as QLoRA's loader would, and LoftQ quantizes the adapted ones itself
    from conftest import tiny_llama

    from lorakit.config import RunConfig
    from lorakit.layer import LoraLinear
    from lorakit.nf4 import NF4Linear
    from lorakit.training.setup import load_base, optimizer_and_schedule, prepare_model

    tiny_llama(hidden=64).save_pretrained(tmp_path)
    char_tokenizer().save_pretrained(tmp_path)
    config = RunConfig.from_dict({"method": "qlora", "model": {"path": str(tmp_path)},
                                  "lora": {"init": "loftq", "targets": ["q_proj", "v_proj"], "r": 4},
                                  "train": {"loraplus_ratio": 16, "lr": 1e-3}})
    model = prepare_model(load_base(config)[0], config)
    adapted = {n for n, m in model.named_modules() if isinstance(m, LoraLinear)}
    assert sorted(adapted) == [f"model.layers.{i}.self_attn.{p}" for i in range(2) for p in ("q_proj", "v_proj")]
    assert all(isinstance(model.get_submodule(n).base_layer, NF4Linear) for n in adapted)
    frozen = [n for n, m in model.named_modules() if isinstance(m, NF4Linear)]
    assert len(frozen) == 2 * 7 and type(model.lm_head) is torch.nn.Linear
    _, optimizer, _ = optimizer_and_schedule(model, config)
    assert [(len(g["params"]), g["initial_lr"]) for g in optimizer.param_groups] == [(4, 1e-3), (4, 16e-3)]


def test_load_data_suggests_padding_free_when_padded_batches_are_mostly_padding(tmp_path):
    from lorakit.data import batch_at, padding_share

    config = config_for(tmp_path, "train.batch_size=4", "data.max_length=64",
                        train=write_jsonl(tmp_path / "long.jsonl", qa(40, long_every=4)))
    lines = []
    ds, _, _ = load_data(config, tok, log=lines.append)
    # by hand: epoch 0's ten batches of 4, each padded to its longest example
    batches = [[len(e.input_ids) for e in batch_at(ds, s, 4, config.train.seed)] for s in range(10)]
    share = 1 - sum(map(sum, batches)) / sum(4 * max(b) for b in batches)
    assert padding_share(ds, 4, config.train.seed) == pytest.approx(share) and share > 0.25
    assert f"data: {share:.0%} of the tokens of padded batches of 4 are padding; data.padding_free=true trains " \
           "the same batches without computing on it" in lines
    for quiet in ("data.padding_free=true", "data.packing=true", "train.batch_size=1"):
        lines = []
        load_data(config_for(tmp_path, quiet, "data.max_length=64", train=str(tmp_path / "long.jsonl")), tok,
                  log=lines.append)
        assert not [line for line in lines if "padding_free" in line], quiet
    lines = []
    load_data(config_for(tmp_path, "train.batch_size=4"), tok, log=lines.append)  # similar lengths: no hint
    assert not [line for line in lines if "padding_free" in line]
