"""The default run's adapter, exported to GGUF and decoded by llama.cpp itself on the held-out
stardate examples, scores what lorakit's own evaluation scores (issue 16's end-to-end check; the
same as `./dev bench gguf_stardate RUN_DIR`, on the first 50 examples)."""

import importlib.util
from pathlib import Path

import pytest

from lorakit.config import RunConfig
from lorakit.gguf_export import export_merged
from lorakit.models import load_model
from lorakit.tasks import exact_match
from lorakit.training import Prepared, train
from lorakit.training.evaluate import exact_match_accuracy
from lorakit.training.setup import load_data, prepare_model

llama_cpp = pytest.importorskip("llama_cpp")
BENCH = Path(__file__).parents[1] / "bench" / "gguf_stardate.py"
EXAMPLES = 50


def greedy():
    spec = importlib.util.spec_from_file_location("gguf_stardate", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.greedy


@pytest.mark.slow
def test_default_run_exported_scores_the_same_in_llama_cpp(tmp_path):
    config = RunConfig.from_dict({}, ["eval.every=0", f"eval.limit={EXAMPLES}"]).validate()  # the default run
    model, tokenizer = load_model()
    prepare_model(model, config)
    train_set, val, test = load_data(config, tokenizer)
    summary = train(config, tmp_path / "run", prepared=Prepared(model, tokenizer, train_set, val, test),
                    progress=False, log=lambda *_: None)
    ours, rows = exact_match_accuracy(model, tokenizer, test, config.eval.max_new_tokens, 32, limit=EXAMPLES)
    assert ours == summary["after"]["exact_match"] == 1.0  # the default run learns the task (README)

    path, _ = export_merged(model, tokenizer, tmp_path / "stardate.gguf", "f16")  # merge check passed
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=512, n_batch=512, n_threads=2, logits_all=True, verbose=False)
    try:
        predictions = greedy()(llm, [r["prompt"] for r in rows], config.eval.max_new_tokens)
    finally:
        llm.close()
    correct = [exact_match(p, r["reference"]) for p, r in zip(predictions, rows)]
    assert sum(correct) / len(rows) == ours  # llama.cpp scores 100% too
    assert all(exact_match(p, r["prediction"]) for p, r in zip(predictions, rows))  # the same answers
