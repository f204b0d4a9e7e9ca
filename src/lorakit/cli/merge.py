"""`lorakit merge ADAPTER --out DIR`: adapter + base -> a standalone transformers model."""

from __future__ import annotations

from lorakit import dtypes
from lorakit.cli.common import add_model_arguments, load, new_output_dir, resolve_source

PROBE = "The quick brown fox jumps over the lazy dog. 1 2 3 4 5"


def add_parser(sub) -> None:
    p = sub.add_parser("merge", help="merge an adapter into its base and save a standalone model",
                       description="Merge an adapter into its base model and write a transformers model "
                                   "directory. A QLoRA adapter is merged into the dequantized NF4 weights in "
                                   "float32 (exact); --requantize stores the result in NF4 again (lossy, the "
                                   "error is printed).")
    add_model_arguments(p, adapter_required=True)
    p.add_argument("--out", required=True, help="output directory (must not exist)")
    p.add_argument("--out-dtype", choices=dtypes.NAMES, default=None,
                   help="dtype of the merged weights (default: the base's compute dtype)")
    p.add_argument("--requantize", action="store_true", help="store the merged 4-bit layers in NF4 again (lossy)")
    p.add_argument("--no-check", action="store_true",
                   help="skip the merge check (adapter on base vs merged model on held-out texts; see merge_check.py)")
    p.set_defaults(run=run)


def run(args) -> int:
    import torch

    from lorakit.inject import merge_and_unload
    from lorakit.merge_check import BUILTIN_TEXTS, check_inputs, compare, logits_of, require
    from lorakit.models import save_model

    out = new_output_dir(args.out)
    source = resolve_source(args)
    model, tokenizer = load(source)
    probe = tokenizer(PROBE, return_tensors="pt")
    with torch.no_grad():
        expected = model(**probe).logits.float()
    inputs = [] if args.no_check else check_inputs(tokenizer, BUILTIN_TEXTS)
    reference = logits_of(model, inputs)
    merged = merge_and_unload(model, dtype=dtypes.to_torch(args.out_dtype) if args.out_dtype else None,
                              requantize=args.requantize)
    with torch.no_grad():
        got = merged(**probe).logits.float()
    diff = (got - expected).abs().max().item()
    print(f"merged {source.adapter} into {source.model or 'SmolLM2-135M-Instruct'}"
          f"{' (NF4 base)' if source.quantize == 'nf4' else ''}: max |logit difference| on a probe "
          f"sentence = {diff:.3g} (relative to max |logit| {expected.abs().max().item():.3g})")
    if not args.no_check:  # beyond the output format's tolerance: an error, nothing written
        output = "nf4" if args.requantize and source.quantize == "nf4" else (args.out_dtype or source.dtype)
        print(require(compare(reference, logits_of(merged, inputs), output)).line())
    save_model(merged, tokenizer, out)
    print(f"wrote {out}")
    return 0
