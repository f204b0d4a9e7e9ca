"""`lorakit quantize MODEL_DIR --out DIR`: a 4-bit checkpoint in transformers + bitsandbytes' layout."""

from __future__ import annotations

from lorakit import dtypes
from lorakit.cli.common import new_output_dir


def add_parser(sub) -> None:
    p = sub.add_parser("quantize", help="write an NF4 checkpoint that transformers + bitsandbytes loads",
                       description="Quantize a model's linear layers (all but the output head) to NF4 with double "
                                   "quantization, streaming tensor by tensor, and write a transformers + "
                                   "bitsandbytes 4-bit checkpoint (config.json with quantization_config).")
    p.add_argument("model", help="model directory (config.json + safetensors), or SmolLM2-135M-Instruct")
    p.add_argument("--out", required=True, help="output directory (must not exist)")
    p.add_argument("--compute-dtype", choices=dtypes.NAMES, default="bfloat16")
    p.add_argument("--no-double-quant", action="store_true", help="keep absmax in float32 (4.5 bits/param)")
    p.set_defaults(run=run)


def run(args) -> int:
    import torch

    from lorakit.inject import memory_report
    from lorakit.models import load_quantized, resolve_model_dir, save_model

    out = new_output_dir(args.out)
    source = resolve_model_dir(args.model)
    model = load_quantized(source, dtype=torch.float32, compute_dtype=dtypes.to_torch(args.compute_dtype),
                           double_quant=not args.no_double_quant)
    save_model(model, source, out)  # quantizing needs no tokenizer; its files are copied when present
    report = memory_report(model)
    print(f"wrote {out}: 4-bit weights {report['quantized_weights'] / 2**20:.1f} MiB, quantization constants "
          f"{report['quantization_constants'] / 2**20:.2f} MiB, other (embeddings, head, norms) "
          f"{report['other'] / 2**20:.1f} MiB")
    return 0
