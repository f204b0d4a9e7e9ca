"""train.compile: lorakit train with each decoder block compiled (training.setup.compile_blocks)
trains what the eager run trains, step for step with dropout on (the compiled draw drops what eager
drops: tests/test_compile.py), resumes onto the eager curve, and refuses what it is not tested with."""

import json
import os

import pytest
import torch
from conftest import MLP, tiny_gpt2, tiny_llama
from safetensors.torch import load_file
from test_training_loop import curve, run_tiny, tiny_run

from lorakit.config import ConfigError, RunConfig
from lorakit.training import Hooks, train
from lorakit.training.setup import check_compile, compile_blocks, decoder_blocks

COMPILE = ["train.compile=true"]


@pytest.fixture(scope="module")
def eager_and_compiled(tmp_path_factory):
    """The tiny run of test_training_loop (12 steps, lora.dropout=0.1, checkpoints at steps 4 and 8)
    eager and compiled: (eager dir, compiled dir, the compiled run's log, its dynamo counters)."""
    root = tmp_path_factory.mktemp("compile")
    run_tiny(root / "eager")
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    lines = []
    config, prepared = tiny_run(COMPILE)
    train(config, root / "compiled", prepared=prepared, progress=False, log=lines.append)
    counters = {k: dict(v) for k, v in torch._dynamo.utils.counters.items()}
    yield root / "eager", root / "compiled", lines, counters
    torch._dynamo.reset()


def test_compiled_run_has_the_eager_losses_and_adapter(eager_and_compiled):
    eager, compiled, log, counters = eager_and_compiled
    c_eager, c_compiled = curve(eager), curve(compiled)
    assert [s for s, _ in c_compiled] == [s for s, _ in c_eager] == list(range(1, 13))
    for (step, e), (_, c) in zip(c_eager, c_compiled):
        assert abs(c - e) <= 1e-5, (step, c, e)
    a_eager = load_file(eager / "adapter" / "adapter_model.safetensors")
    a_compiled = load_file(compiled / "adapter" / "adapter_model.safetensors")
    assert a_compiled.keys() == a_eager.keys() and len(a_eager) == 2 * 7 * 2  # A, B x 7 linears x 2 layers
    for name in a_eager:
        torch.testing.assert_close(a_compiled[name], a_eager[name], rtol=0, atol=1e-5, msg=name)
    # the steps ran compiled, two graphs for all blocks: the first block's input needs no gradient
    # (frozen embeddings), the others' does; fixed shapes recompile nothing more, nothing broke a
    # graph, and evaluation and generation ran eager (no graph of their own)
    assert "train.compile: 2 decoder blocks compiled at the first step (evaluation runs them eager)" in log
    assert sum(line.startswith("train.compile: the first step took ") for line in log) == 1
    assert sum(line.startswith("train.compile: the memory plan above is for eager steps") for line in log) == 1
    assert counters["stats"]["unique_graphs"] == 2, counters
    assert counters["frames"]["ok"] >= 1 and not counters.get("graph_break"), counters
    summary = json.loads((compiled / "summary.json").read_text())
    assert summary["after"]["val_loss"] == pytest.approx(
        json.loads((eager / "summary.json").read_text())["after"]["val_loss"], abs=1e-5)


def test_resumed_compiled_run_continues_on_the_eager_curve(eager_and_compiled, tmp_path):
    eager, *_ = eager_and_compiled
    saved = []

    def stop_after_first_checkpoint(step, path):
        saved.append(path)
        raise KeyboardInterrupt("killed")

    with pytest.raises(KeyboardInterrupt):
        run_tiny(tmp_path / "cut", COMPILE, hooks=Hooks(after_checkpoint=stop_after_first_checkpoint))
    assert curve(tmp_path / "cut")[-1][0] == 4
    run_tiny(tmp_path / "cut", COMPILE, resume=True)
    resumed, uninterrupted = curve(tmp_path / "cut"), curve(eager)
    assert [s for s, _ in resumed] == list(range(1, 13))
    for (step, e), (_, c) in zip(uninterrupted, resumed):
        assert abs(c - e) <= 1e-5, (step, c, e)


def test_compile_blocks_compiles_each_block_in_place(monkeypatch):
    import torch._inductor.config as inductor

    monkeypatch.delenv("TORCHINDUCTOR_COMPILE_THREADS", raising=False)
    model = tiny_llama()
    keys = list(model.state_dict())
    with inductor.patch(compile_threads=2):  # restored after: what inductor decided at its import
        assert compile_blocks(model) == 2
        # no pool of compile workers: one thread, unless the variable says otherwise
        assert (os.environ["TORCHINDUCTOR_COMPILE_THREADS"], inductor.compile_threads) == ("1", 1)
        monkeypatch.setenv("TORCHINDUCTOR_COMPILE_THREADS", "3")
        compile_blocks(model)
        assert inductor.compile_threads == 3
    assert all(layer._compiled_call_impl is not None for layer in model.model.layers)
    assert model.model.embed_tokens._compiled_call_impl is None and model._compiled_call_impl is None
    assert list(model.state_dict()) == keys  # checkpoints keep their names


def test_decoder_blocks_are_the_numbered_modules_of_the_layer_container():
    llama, gpt2 = tiny_llama(), tiny_gpt2()
    assert decoder_blocks(llama) == list(llama.model.layers)
    assert decoder_blocks(gpt2) == list(gpt2.transformer.h)
    mixture = torch.nn.Module()  # a numbered module inside a block is part of it
    mixture.layers = torch.nn.ModuleList([torch.nn.Module() for _ in range(3)])
    mixture.layers[0].experts = torch.nn.ModuleList([torch.nn.Linear(2, 2) for _ in range(4)])
    assert decoder_blocks(mixture) == list(mixture.layers)


def test_a_model_without_decoder_blocks_is_an_error():
    with pytest.raises(ValueError, match=r"train.compile=true: MLP has no decoder blocks to compile \(numbered "
                                         r"modules in a container named layers, h, blocks, layer\); set "
                                         r"train.compile=false"):
        compile_blocks(MLP())


@pytest.mark.parametrize("overrides, problem", [
    (["method=qlora"], "train.compile=true with method='qlora': compiled decoder blocks are supported with "
                       "method=lora, objective=sft, lora.dora=false and train.gradient_checkpointing=false only; "
                       "use method=lora or set train.compile=false"),
    (["method=full"], "train.compile=true with method='full': "),
    (["objective=orpo", "data.format=preference"], "train.compile=true with objective='orpo': "),
    (["lora.dora=true"], "train.compile=true with lora.dora=true: "),
    (["train.gradient_checkpointing=true"], "train.compile=true with train.gradient_checkpointing=true: "),
])
def test_untested_combinations_are_config_errors(overrides, problem):
    with pytest.raises(ConfigError) as e:
        RunConfig.from_dict({}, COMPILE + overrides)
    assert len(e.value.problems) == 1 and e.value.problems[0].startswith(problem), e.value.problems
    RunConfig.from_dict({}, overrides)  # fine without train.compile


def test_compile_is_off_by_default_and_set_from_the_command_line():
    assert RunConfig().train.compile is False
    assert RunConfig.from_dict({}, COMPILE).train.compile is True
    assert RunConfig.from_dict({"train": {"compile": True}}).train.compile is True
    with pytest.raises(ConfigError) as e:
        RunConfig.from_dict({}, ["train.compile=blocks"])
    assert e.value.problems == ["train.compile='blocks': expected bool"]


def test_more_than_one_rank_is_an_error():
    check_compile(RunConfig.from_dict({}, COMPILE), world=1)
    check_compile(RunConfig(), world=2)
    with pytest.raises(ConfigError) as e:
        check_compile(RunConfig.from_dict({}, COMPILE + ["train.strategy=fsdp"]), world=2)
    assert e.value.problems == [
        "train.compile=true with 2 ranks (train.strategy='fsdp' under torchrun): compiled decoder blocks are "
        "supported in one process only; run one process or set train.compile=false"]
