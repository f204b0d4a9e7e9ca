"""A run's adapter, exported to GGUF and run by llama.cpp on the run's held-out test set.

    ./dev bench gguf_stardate RUN_DIR [--quant f16] [--limit N] [--adapter-only]

Exports RUN_DIR (base + adapter, merged in float32) with `lorakit export`'s library call, then
greedy-decodes every held-out prompt with llama.cpp (llama-cpp-python: `pip install
'lorakit[llama]'`) using only the GGUF file: its tokenizer, its weights. Prints llama.cpp's exact
match next to lorakit's own evaluation of the same adapter (transformers, the run's summary.json)
and the number of predictions that differ between the two. --adapter-only: the base model and the
adapter as two files, the adapter applied by llama.cpp at load time (its --lora).

tests/test_export_stardate.py runs the same check on the first 50 examples of a default run it
trains (f16); this script checks any run directory, every example, any quantization, and the
--adapter-only path.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np


def greedy(llm, prompts: list[str], max_new_tokens: int) -> list[str]:
    """llama.cpp's greedy continuation of each prompt (argmax of its own logits, stopping at its EOS),
    decoded with special tokens kept, as lorakit's evaluation decodes before it strips them."""
    eos, predictions = llm.token_eos(), []
    for prompt in prompts:
        llm.reset()
        llm.eval(llm.tokenize(prompt.encode(), add_bos=False, special=True))
        out = []
        for _ in range(max_new_tokens):
            token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
            out.append(token)
            if token == eos:
                break
            llm.eval([token])
        predictions.append(llm.detokenize(out, special=True).decode("utf-8", errors="replace"))
    return predictions


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--quant", default="f16")
    parser.add_argument("--limit", type=int, default=None)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--adapter-only", action="store_true")
    args = parser.parse_args()

    import llama_cpp

    from lorakit.cli.common import load, resolve_source
    from lorakit.cli.export import run_test_ids
    from lorakit.config import RunConfig, load_yaml
    from lorakit.gguf_export import export_adapter, export_merged
    from lorakit.models import load_model
    from lorakit.tasks import exact_match
    from lorakit.training.evaluate import exact_match_accuracy
    from lorakit.training.setup import load_data

    source = resolve_source(SimpleNamespace(adapter=str(args.run_dir), model=None, quantize=None, dtype="float32"))
    source.dtype = "float32"
    model, tokenizer = load(source)
    config = RunConfig.from_dict(load_yaml((args.run_dir / "config.yaml").read_text()))
    _, _, test = load_data(config, tokenizer)
    examples = [e for e in test.examples if e.prompt is not None and e.reference is not None][:args.limit]
    ours, rows = exact_match_accuracy(model, tokenizer, test, args.max_new_tokens, 32, limit=args.limit)

    with tempfile.TemporaryDirectory() as tmp:
        path, lora = Path(tmp) / "model.gguf", None
        t0 = time.perf_counter()
        if args.adapter_only:
            lora = export_adapter(model, Path(tmp) / "lora.gguf")
            base, _ = load_model(source.model)
            _, check = export_merged(base, tokenizer, path, args.quant)
        else:
            _, check = export_merged(model, tokenizer, path, args.quant,
                                     check_ids=run_test_ids(args.run_dir, tokenizer))
        print(f"exported {args.run_dir} as {args.quant}{' + a LoRA adapter GGUF' if lora else ''} in "
              f"{time.perf_counter() - t0:.1f} s; {check.line()}")
        llm = llama_cpp.Llama(model_path=str(path), lora_path=str(lora) if lora else None, n_ctx=512, n_batch=512,
                              n_threads=2, logits_all=True, verbose=False)
        t0 = time.perf_counter()
        predictions = greedy(llm, [e.prompt for e in examples], args.max_new_tokens)
        llm.close()
    seconds = time.perf_counter() - t0
    correct = [exact_match(p, e.reference) for p, e in zip(predictions, examples)]
    differ = sum(exact_match(p, r["prediction"]) is False for p, r in zip(predictions, rows))
    summary = json.loads((args.run_dir / "summary.json").read_text()) if (args.run_dir / "summary.json").is_file() else {}
    print(f"held-out exact match over {len(examples)} examples: llama.cpp {100 * sum(correct) / len(correct):.1f}%, "
          f"lorakit (transformers) {100 * ours:.1f}%, run summary "
          f"{summary.get('after', {}).get('exact_match', float('nan')) * 100:.1f}%; "
          f"predictions that differ: {differ}; llama.cpp decoding took {seconds:.1f} s")
    return 0 if sum(correct) / len(correct) == ours else 1


if __name__ == "__main__":
    sys.exit(main())
