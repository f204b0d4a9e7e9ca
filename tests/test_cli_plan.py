"""`lorakit plan`: the training config's vocabulary (CONFIG.yaml, --set, the same errors as `lorakit
train`), today's flags as aliases of config keys, and the plan `lorakit train` logs."""

import argparse
import json
from types import SimpleNamespace

import pytest
import torch

from lorakit.cli import main
from lorakit.cli import plan as plan_cli
from lorakit.config import ConfigError, RunConfig, read_run_config
from lorakit.planner import arch_for_run, plan, plan_run, run_device


def _parse(argv):
    parser = argparse.ArgumentParser(prog="lorakit")
    plan_cli.add_parser(parser.add_subparsers(dest="command"))
    return parser.parse_args(argv)


def test_cli_json(capsys):
    args = _parse(["plan", "--model", "llama-3.1-8b", "--method", "qlora", "--targets", "all-linear",
                   "--batch", "2", "--seq", "1024", "--grad-checkpointing", "--json"])
    assert args.run(args) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["config"]["targets"] == "all-linear" and d["config"]["grad_checkpointing"] is True
    assert d["parameters"]["trainable"] == 32 * 8 * (8192 + 5120 + 5120 + 8192 + 3 * 18432)  # r*(in+out), 7 linears


def test_cli_table_and_error(capsys):
    args = _parse(["plan", "--model", "qwen2.5-7b", "--targets", "q_proj", "k_proj", "--gpus", "2"])
    assert plan_cli.run(args) == 0
    assert "gpus=2" in capsys.readouterr().out
    args = _parse(["plan", "--model", "nope"])
    assert plan_cli.run(args) == 2
    assert "presets:" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        _parse(["plan", "--model", "llama-2-7b", "--method", "dora"])


def cli_json(capsys, *argv) -> dict:
    assert main(["plan", *argv, "--json"]) == 0, capsys.readouterr().err
    return json.loads(capsys.readouterr().out)


def cli_error(capsys, command, *argv) -> str:
    assert main([command, *argv]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    return captured.err


def as_json(plan_) -> dict:
    return json.loads(json.dumps(plan_.to_dict()))


def write_config(tmp_path, text: str):
    path = tmp_path / "run.yaml"
    path.write_text(text)
    return path


@pytest.mark.parametrize("method", ["lora", "qlora", "full"])
@pytest.mark.parametrize("model", [None, "llama-3.1-8b"])
def test_config_file_plans_the_run(tmp_path, capsys, method, model):
    # the default model (model.path absent) and a preset; RunConfig's defaults for the rest
    text = f"method: {method}\ntrain:\n  batch_size: 4\n  gradient_checkpointing: true\n"
    text += f"model:\n  path: {model}\n  dtype: bfloat16\n" if model else ""
    path = write_config(tmp_path, text)
    config = RunConfig.from_dict({"method": method, "train": {"batch_size": 4, "gradient_checkpointing": True},
                                  **({"model": {"path": model, "dtype": "bfloat16"}} if model else {})})
    expected = plan_run(config, arch_for_run(config), run_device(config), recommend=True)
    d = cli_json(capsys, str(path))
    assert d == as_json(expected)
    assert (d["config"]["method"], d["config"]["batch_size"], d["config"]["seq_len"]) == (method, 4, 64)
    assert d["config"]["targets"] == "all-linear" and d["config"]["grad_checkpointing"] is True
    assert d["config"]["dtype"] == ("bfloat16" if model else "float32")
    assert d["config"]["device"] == ("cuda" if torch.cuda.is_available() else "cpu")
    assert d["model"]["hidden_size"] == (4096 if model else 576)


def test_plan_run_is_the_plan_train_logs():
    # what the training loop's memory check computes by hand from the run config, on the model's
    # own config (transformers' to_dict), on the CPU
    from lorakit.planner import arch_from_config

    config = RunConfig.from_dict({"method": "qlora", "model": {"dtype": "bfloat16"},
                                  "lora": {"r": 4, "targets": ["q_proj", "o_proj"], "dropout": 0.1},
                                  "data": {"max_length": 32}, "train": {"batch_size": 3}})
    hand = plan(arch_from_config(SMOL_CONFIG), method="qlora", rank=4, targets=["q_proj", "o_proj"], batch_size=3,
                seq_len=32, grad_checkpointing=False, dtype="bf16", lora_dropout=0.1, device="cpu", n_gpus=1,
                masked_attention=True, recommend=False)  # 3 rows padded to the longest: an attention mask
    assert plan_run(config, arch_from_config(SMOL_CONFIG), "cpu") == hand
    one = RunConfig.from_dict({**config.to_dict(), "train": {**config.to_dict()["train"], "batch_size": 1}})
    assert not plan_run(one, arch_from_config(SMOL_CONFIG), "cpu").config.masked_attention  # one row: no mask
    packed = RunConfig.from_dict({**one.to_dict(), "data": {**one.to_dict()["data"], "packing": True}})
    # packed rows on a Llama attend example by example (lorakit.attention): no mask; with gradient
    # checkpointing (or compile) transformers' masked sdpa runs instead
    planned = plan_run(packed, arch_from_config(SMOL_CONFIG), "cpu").config
    assert (planned.segment_attention, planned.masked_attention) == (True, False)
    checkpointed = RunConfig.from_dict({**packed.to_dict(),
                                        "train": {**packed.to_dict()["train"], "gradient_checkpointing": True}})
    planned = plan_run(checkpointed, arch_from_config(SMOL_CONFIG), "cpu").config
    assert (planned.segment_attention, planned.masked_attention) == (False, True)
    gemma = plan_run(packed, arch_from_config({**SMOL_CONFIG, "model_type": "gemma2", "head_dim": 64}), "cpu").config
    assert (gemma.segment_attention, gemma.masked_attention) == (False, True)  # eager attention: the mask
    # padding-free: the micro-batch is one row of up to 3 x 32 tokens, its examples attending alone
    flat = RunConfig.from_dict({**config.to_dict(), "data": {**config.to_dict()["data"], "padding_free": True}})
    one_row = plan(arch_from_config(SMOL_CONFIG), method="qlora", rank=4, targets=["q_proj", "o_proj"], batch_size=1,
                   seq_len=96, grad_checkpointing=False, dtype="bf16", lora_dropout=0.1, device="cpu", n_gpus=1,
                   segment_attention=True, recommend=False)
    assert plan_run(flat, arch_from_config(SMOL_CONFIG), "cpu") == one_row != hand
    sharded = plan_run(config, arch_from_config(SMOL_CONFIG), "cuda", 4)
    assert (sharded.config.n_gpus, sharded.config.device) == (4, "cuda")


SMOL_CONFIG = {"model_type": "llama", "hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30,
               "num_attention_heads": 9, "num_key_value_heads": 3, "vocab_size": 49152, "tie_word_embeddings": True}


@pytest.mark.parametrize("method", ["lora", "qlora", "full"])
def test_plan_prints_the_line_train_logs(tmp_path, capsys, method):
    # `lorakit plan CONFIG` ends with the memory plan line the training loop logs for the same
    # config (the loop's memory_check, given the model: only its config is read), up to the free
    # memory of the moment
    from transformers import LlamaConfig

    from lorakit.training.setup import memory_check

    model_dir = tmp_path / "model"
    LlamaConfig(**{k: v for k, v in SMOL_CONFIG.items() if k != "model_type"}).save_pretrained(model_dir)
    path = write_config(tmp_path, f"method: {method}\nmodel:\n  path: {model_dir}\ntrain:\n  device: cpu\n"
                                  "  batch_size: 2\ndata:\n  max_length: 100\n")
    config = read_run_config(path)
    logged = []
    model = SimpleNamespace(config=LlamaConfig.from_pretrained(model_dir))
    peak = memory_check(model, config, logged.append, torch.device("cpu"))
    assert main(["plan", str(path)]) == 0
    printed = capsys.readouterr().out.splitlines()[-1]
    assert printed.split(" of ")[0] == logged[0].split(" of ")[0]
    assert printed.startswith(f"memory plan: predicted peak {peak / 2**30:.2f} GiB (batch 2 x 100 tokens) of ")
    assert printed.endswith(" GiB available on cpu")
    assert peak == plan_run(config, arch_for_run(config), "cpu").peak


def test_flags_are_aliases_of_config_keys(tmp_path, capsys):
    path = write_config(tmp_path, "lora:\n  r: 4\ndata:\n  max_length: 32\n")
    flags = cli_json(capsys, str(path), "--model", "llama-3.2-1b", "--method", "qlora", "--rank", "16",
                     "--targets", "q_proj", "k_proj", "--batch", "2", "--seq", "128", "--grad-checkpointing",
                     "--dtype", "bf16")
    keys = cli_json(capsys, str(path), "--set", "model.path=llama-3.2-1b", "--set", "method=qlora",
                    "--set", "lora.r=16", "--set", "lora.targets=[q_proj, k_proj]", "--set", "train.batch_size=2",
                    "--set", "data.max_length=128", "--set", "train.gradient_checkpointing=true",
                    "--set", "model.dtype=bfloat16")
    assert flags == keys
    assert (flags["config"]["rank"], flags["config"]["seq_len"], flags["config"]["targets"]) == (16, 128, ["q_proj", "k_proj"])
    # a regex and all-linear, as one --targets value
    assert cli_json(capsys, "--set", "model.path=llama-3.2-1b", "--targets", r".*\.o_proj") == \
        cli_json(capsys, "--set", "model.path=llama-3.2-1b", "--set", r"lora.targets=.*\.o_proj")
    assert cli_json(capsys, "--targets", "all-linear", "--dtype", "fp16") == \
        cli_json(capsys, "--dtype", "float16") == cli_json(capsys, "--set", "model.dtype=float16")


def test_flags_alone_keep_the_planners_defaults(capsys):
    # --model without CONFIG or --set: batch 1 x 2048, bfloat16, q_proj and v_proj, CUDA; the same
    # numbers as plan(model), and as the run config that spells these defaults out
    for argv, settings in ((["--model", "llama-3.1-8b"], {}),
                           (["--model", "mistral-7b", "--method", "qlora", "--gpus", "4"],
                            {"method": "qlora", "n_gpus": 4})):
        d = cli_json(capsys, *argv)
        assert d == as_json(plan(argv[1], **settings))
        assert (d["config"]["batch_size"], d["config"]["seq_len"], d["config"]["dtype"], d["config"]["targets"],
                d["config"]["device"]) == (1, 2048, "bfloat16", None, "cuda")
    spelled = cli_json(capsys, "--set", "model.path=mistral-7b", "--set", "method=qlora", "--set", "train.batch_size=1",
                       "--set", "data.max_length=2048", "--set", "model.dtype=bfloat16", "--set", "lora.targets=null",
                       "--set", "train.device=cuda", "--set", "train.strategy=fsdp", "--gpus", "4")
    assert spelled == as_json(plan("mistral-7b", method="qlora", n_gpus=4))


def test_ranks_shard_only_under_fsdp(capsys):
    ddp = cli_json(capsys, "--set", "model.path=llama-3.1-8b", "--gpus", "4")
    fsdp = cli_json(capsys, "--set", "model.path=llama-3.1-8b", "--set", "train.strategy=fsdp", "--gpus", "4")
    assert (ddp["config"]["n_gpus"], fsdp["config"]["n_gpus"]) == (1, 4)
    assert fsdp["peak_bytes"] < ddp["peak_bytes"]
    assert main(["plan", "--set", "model.path=llama-3.1-8b", "--gpus", "4"]) == 0
    assert "train.strategy=ddp: each of the 4 ranks holds the whole model and needs this plan" in capsys.readouterr().out


def test_device_is_where_train_would_run(capsys):
    assert cli_json(capsys, "--set", "train.device=cpu")["config"]["device"] == "cpu"
    assert cli_json(capsys, "--set", "train.device=cuda")["config"]["device"] == "cuda"
    auto = "cuda" if torch.cuda.is_available() else "cpu"
    assert cli_json(capsys)["config"]["device"] == auto  # `lorakit plan` alone: `lorakit train`'s default run


BAD = "method: dora\nlora:\n  r: 0\n  colour: red\ntrain:\n  batch_size: -1\n"


def test_bad_config_gives_run_configs_errors(tmp_path, capsys):
    path = write_config(tmp_path, BAD)
    with pytest.raises(ConfigError) as err:
        RunConfig.from_dict({"method": "dora", "lora": {"r": 0, "colour": "red"}, "train": {"batch_size": -1}})
    assert cli_error(capsys, "plan", str(path)) == f"lorakit plan: error: {err.value}\n"
    assert cli_error(capsys, "train", str(path)) == f"lorakit train: error: {err.value}\n"
    # --set and the flags go through the same checks
    with pytest.raises(ConfigError) as err:
        RunConfig.from_dict({}, ["lora.r=0", "data.max_lenght=5"])
    assert cli_error(capsys, "plan", "--set", "lora.r=0", "--set", "data.max_lenght=5") == f"lorakit plan: error: {err.value}\n"
    with pytest.raises(ConfigError) as err:
        RunConfig.from_dict({"lora": {"r": 0}, "train": {"batch_size": -1}, "model": {"path": "llama-2-7b"}})
    assert cli_error(capsys, "plan", "--model", "llama-2-7b", "--rank", "0", "--batch", "-1") == \
        f"lorakit plan: error: {err.value}\n"


@pytest.mark.parametrize("text", [None, "- a list\n", "method: [unclosed\n", "lora: {r: 4}\nlora: {r: 8}\n"])
def test_config_file_errors_are_trains(tmp_path, capsys, text):
    path = tmp_path / "run.yaml"
    if text is not None:
        path.write_text(text)
    plan_err = cli_error(capsys, "plan", str(path))
    train_err = cli_error(capsys, "train", str(path), "--out", str(tmp_path / "out"))
    assert plan_err.startswith("lorakit plan: error: ") and str(path) in plan_err
    assert plan_err.replace("lorakit plan", "lorakit train") == train_err


def test_a_key_given_twice_is_refused(capsys):
    assert cli_error(capsys, "plan", "--rank", "16", "--set", "lora.r=8") == \
        "lorakit plan: error: --rank and --set lora.r=... both set lora.r; give it once\n"
    assert cli_error(capsys, "plan", "--grad-checkpointing", "--set", "train.gradient_checkpointing=false") == \
        ("lorakit plan: error: --grad-checkpointing and --set train.gradient_checkpointing=... both set "
         "train.gradient_checkpointing; give it once\n")


def test_read_run_config_settings_go_between_file_and_set(tmp_path):
    path = write_config(tmp_path, "lora:\n  r: 4\n  alpha: 8\ntrain:\n  steps: 7\n")
    config = read_run_config(path, ["lora.alpha=2"], {"lora.r": 16, "lora.alpha": 32, "method": "full"})
    assert (config.lora.r, config.lora.alpha, config.train.steps, config.method) == (16, 2, 7, "full")
    assert read_run_config(None) == RunConfig.from_dict({})


def _trained_plan(tmp_path, config_path) -> int:
    """The planned peak `lorakit train CONFIG` reports (summary.json), from a one-step run."""
    from lorakit.training import train

    summary = train(read_run_config(config_path), tmp_path / "run", progress=False, log=lambda *_: None)
    return summary["planned_peak_bytes"]


@pytest.mark.parametrize("method", ["lora", "qlora", "full"])
def test_plan_gives_the_peak_train_plans_for_a_model_directory(tmp_path, capsys, method):
    from conftest import char_tokenizer, tiny_llama

    tok = char_tokenizer()
    tiny_llama(hidden=64, vocab=len(tok), init_range=0.1).save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"<{i}>=", "completion": str(i)[::-1]}) + "\n" for i in range(8)))
    path = write_config(tmp_path, f"method: {method}\nmodel:\n  path: {tmp_path / 'model'}\ntrain:\n  device: cpu\n"
                                  f"  steps: 1\n  batch_size: 4\n  warmup_steps: 0\ndata:\n  train: {data}\n"
                                  "  validation_fraction: 0\n  max_length: 24\neval:\n  every: 0\n  generate: false\n")
    planned = cli_json(capsys, str(path))["peak_bytes"]
    assert planned == _trained_plan(tmp_path, path) and planned > 0


def test_plan_gives_the_peak_train_plans_for_the_default_model(tmp_path, capsys):
    path = write_config(tmp_path, "train:\n  device: cpu\n  steps: 1\n  batch_size: 2\n  warmup_steps: 0\n"
                                  "data:\n  n_train: 4\n  n_test: 1\n  validation_fraction: 0\n"
                                  "eval:\n  every: 0\n  generate: false\n")
    planned = cli_json(capsys, str(path))["peak_bytes"]
    assert planned == _trained_plan(tmp_path, path) and planned > 0


def test_plan_of_a_dpo_run_counts_pairs(tmp_path, capsys):
    # `lorakit plan` of a DPO config (examples/dpo.yaml's keys): train.batch_size pairs, 2x the rows of
    # SFT, and the preference loss term (a frozen head: the hidden states' gradient, one chunk of
    # float32 logits made their softmax in place, and its bf16 logits) with every token of the 2B rows scored
    body = ("objective: dpo\nmodel:\n  path: smollm2-135m\n  dtype: bfloat16\ntrain:\n  device: cuda\n"
            "  batch_size: 2\ndata:\n  train: builtin:stardate_pairs\n  max_length: 64\n")
    dpo = cli_json(capsys, str(write_config(tmp_path, body)))
    sft = cli_json(capsys, str(write_config(tmp_path, body.replace("objective: dpo", "objective: sft")
                                            .replace("batch_size: 2", "batch_size: 4")
                                            .replace("builtin:stardate_pairs", "builtin:stardate"))))
    assert (dpo["config"]["objective"], dpo["config"]["batch_size"], dpo["config"]["answer_tokens"]) == ("dpo", 2, None)
    assert dpo["components_bytes"]["logits_and_loss"] == 256 * 576 * 2 + 256 * 49152 * 4 + 256 * 49152 * 2
    assert dpo["components_bytes"]["activations"] == sft["components_bytes"]["activations"]
    # SFT's chunk holds the softmax's bf16 cast as DPO's holds its bf16 logits: the same peak
    assert dpo["peak_allocated_bytes"] == sft["peak_allocated_bytes"]
    assert main(["plan", str(write_config(tmp_path, body)), "--domain-shift"]) == 0
    out = capsys.readouterr().out
    assert "objective=dpo (batch in pairs)" in out
    assert "recommendation: lora (24 GiB per GPU budget): lorakit's DPO trains adapters only" in out


def test_max_length_auto_planned_at_its_cap(capsys):
    # "auto" is the longest training example, known only from the data: planned at the cap, said in a note
    from lorakit.config import MAX_LENGTH_AUTO_CAP

    assert main(["plan", "--set", "data.max_length=auto"]) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert "note: data.max_length is 'auto'" in out and f"planned at its cap, {MAX_LENGTH_AUTO_CAP} tokens" in out
    assert f"x {MAX_LENGTH_AUTO_CAP} tokens)" in out.splitlines()[-1]
    auto = RunConfig.from_dict({"data": {"max_length": "auto"}})
    capped = RunConfig.from_dict({"data": {"max_length": MAX_LENGTH_AUTO_CAP}})
    planned = plan_run(auto, arch_for_run(auto), "cpu")
    assert as_json(planned) == as_json(plan_run(capped, arch_for_run(capped), "cpu"))
    assert len(planned.notes) == 1 and not plan_run(capped, arch_for_run(capped), "cpu").notes
