"""NF4 throughput on CPU: lorakit.nf4 vs bitsandbytes, quantize, dequantize, and a 4-bit linear's forward.

    .venv/bin/python bench/nf4_throughput.py [--reps 7]

Weights: the shapes of one SmolLM2-135M decoder layer's projections (576x576 q/o, 192x576 k/v,
1536x576 gate/up, 576x1536 down), float32, NF4 with double quantization, blocksize 64 (QLoRA's
recipe). Throughput is weight elements per second, median of interleaved repetitions (common.py).
The forward is y = x W^T for x: (1024, 576), batch 8 x 128 tokens, dequantizing W on the fly
(lorakit NF4Linear, bitsandbytes Linear4bit with float32 compute), with nn.Linear for reference.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import common as C  # noqa: E402

SHAPES = [(576, 576), (192, 576), (192, 576), (576, 576), (1536, 576), (1536, 576), (576, 1536)]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=7)
    args = parser.parse_args(argv)
    C.setup(2)
    import bitsandbytes as bnb
    import bitsandbytes.functional as bf

    from lorakit.nf4 import NF4Linear, dequantize, quantize_nf4

    g = torch.Generator().manual_seed(0)
    weights = [torch.randn(shape, generator=g) * 0.02 for shape in SHAPES]
    n = sum(w.numel() for w in weights)
    ours = [quantize_nf4(w) for w in weights]
    theirs = [bf.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4") for w in weights]
    # Same bytes (the library's tests check this too), so the dequantize timings compare like with like.
    assert all(torch.equal(o.packed.view(-1), t[0].view(-1)) for o, t in zip(ours, theirs))

    timed = [
        C.Contender("quantize lorakit", lambda: [quantize_nf4(w) for w in weights]),
        C.Contender("quantize bnb", lambda: [bf.quantize_4bit(w, blocksize=64, compress_statistics=True,
                                                              quant_type="nf4") for w in weights]),
        C.Contender("dequantize lorakit", lambda: [dequantize(s, torch.float32) for s in ours]),
        C.Contender("dequantize bnb", lambda: [bf.dequantize_4bit(p, s) for p, s in theirs]),
    ]
    C.time_alternating(timed, reps=args.reps, warmup=1, verbose=False)
    rows = [[c.name, f"{c.median * 1e3:.1f} ms", f"{n / c.median / 1e6:,.0f}"] for c in timed]
    print(f"\nNF4 (double quant, blocksize 64) on {n / 1e6:.2f}M float32 weights (one SmolLM2 layer), "
          f"{args.reps} interleaved reps")
    print(C.table(["operation", "median", "M weights/s"], rows))
    for op in ("quantize", "dequantize"):
        a, b = (c for c in timed if c.name.startswith(op + " "))
        print(f"{op}: lorakit / bnb time = {a.median / b.median:.2f}")

    # On-the-fly dequantize in the forward of a 4-bit linear layer.
    x = torch.randn(1024, 576, generator=g)
    dense = [torch.nn.Linear(w.shape[1], w.shape[0], bias=False) for w in weights]
    for layer, w in zip(dense, weights):
        layer.weight.data.copy_(w)
    ours_l = [NF4Linear.from_linear(layer, torch.float32) for layer in dense]
    theirs_l = []
    for layer in dense:
        q = bnb.nn.Linear4bit(layer.in_features, layer.out_features, bias=False, compute_dtype=torch.float32,
                              compress_statistics=True, quant_type="nf4")
        q.weight = bnb.nn.Params4bit(layer.weight.data.clone(), requires_grad=False, quant_type="nf4",
                                     compress_statistics=True, blocksize=64)
        theirs_l.append(q.to("cpu"))  # quantizes on the move

    x_down = torch.randn(1024, 1536, generator=g)

    def forward_all(layers):
        def run():
            with torch.no_grad():
                for layer in layers:
                    layer(x if layer.in_features == 576 else x_down)
        return run

    timed = [C.Contender("nn.Linear float32", forward_all(dense)),
             C.Contender("lorakit NF4Linear", forward_all(ours_l)),
             C.Contender("bnb Linear4bit", forward_all(theirs_l))]
    C.time_alternating(timed, reps=args.reps, warmup=1, verbose=False)
    ref = timed[0].median
    rows = [[c.name, f"{c.median * 1e3:.1f} ms", f"{c.median / ref:.2f}"] for c in timed]
    print(f"\nForward of the 7 projections, x: (1024, in), float32 compute, {args.reps} interleaved reps")
    print(C.table(["layer", "median", "time / nn.Linear"], rows))
    print(f"NF4Linear / Linear4bit time = {timed[1].median / timed[2].median:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
