"""The merge check: a merged or exported model must give the logits of the adapter on its base.

Users report merged models that behave differently from the adapter they trained (a QLoRA merge
re-quantized, a merge into the wrong base weights). `lorakit merge` and `lorakit export` run
both models on a few held-out texts and compare every next-token distribution:

    max |Δlogit| = max over positions and vocabulary of |z_merged - z_adapter|
    top-1 agreement = share of positions where both pick the same next token

and refuse to write anything beyond the tolerance of the output's number format. The reference
is the adapter on its base computed in float32 (the base dequantized if it is NF4); the
candidate is the merged model whose weights were rounded to the output format exactly as they
are written (for GGUF: decoded from the very bytes that go into the file).

Two stages for an export: first the merged float32 model itself (this is what catches a wrong
merge: tolerance "float32"), then the weights rounded to the output format (this bounds the damage
of the rounding or quantization). Tolerances, with what SmolLM2-135M-Instruct gives (an r=8
all-linear adapter, BUILTIN_TEXTS, 80 tokens, logits of magnitude ~20):

    output    max |Δlogit|  top-1     measured
    float32   <= 5e-3       >= 99%    8.9e-05, 100%
    f16       <= 0.25       >= 97%    0.051, 100%
    bf16      <= 1.5        >= 90%    0.245, 100%
    q8_0      <= 3          >= 90%    1.09, 97.5%
    q4_0      <= 40         >= 50%    17.6, 66.3%   (4-bit hurts a 135M model; larger ones less)

A merge into the wrong weights moves logits by whole units: the float32 stage fails it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

# output format -> (largest max |Δlogit|, smallest top-1 agreement) that still passes
TOLERANCES = {
    "float32": (5e-3, 0.99),
    "f32": (5e-3, 0.99),
    "float16": (0.25, 0.97),
    "f16": (0.25, 0.97),
    "bfloat16": (1.5, 0.90),
    "bf16": (1.5, 0.90),
    "q8_0": (3.0, 0.90),
    "q4_0": (40.0, 0.50),
    "nf4": (40.0, 0.50),  # lorakit merge --requantize: the merged weights in NF4 again
}

# Held-out texts when the run brings none: chat-formatted and plain English, numbers and code.
BUILTIN_TEXTS = (
    "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\nThe capital of France is Paris.",
    "The quick brown fox jumps over the lazy dog. 1 2 3 4 5",
    "def add(a, b):\n    return a + b\n\nprint(add(2, 3))",
    "Photosynthesis turns sunlight, water and carbon dioxide into sugar and oxygen.",
)


class MergeCheckError(ValueError):
    """The merged or exported model does not reproduce the adapter on its base."""


@dataclass(frozen=True)
class MergeCheck:
    max_abs: float        # max |Δlogit|
    top1: float           # share of positions with the same argmax, 0..1
    tokens: int           # positions compared
    output: str           # the output format the tolerance is for
    tolerance: tuple[float, float]

    @property
    def passed(self) -> bool:
        return self.max_abs <= self.tolerance[0] and self.top1 >= self.tolerance[1]

    def line(self) -> str:
        return (f"merge check: max |Δlogit| {self.max_abs:.3g}, top-1 agreement {100 * self.top1:.1f}% over "
                f"{self.tokens} tokens ({self.output}: tolerance max |Δlogit| <= {self.tolerance[0]:g}, "
                f"top-1 >= {100 * self.tolerance[1]:g}%)")


def check_inputs(tokenizer, texts=BUILTIN_TEXTS) -> list[torch.Tensor]:
    """Token ids of each text, (1, T), run one at a time (no padding to get in the way)."""
    return [tokenizer(t, return_tensors="pt")["input_ids"] for t in texts]


@torch.no_grad()
def logits_of(model: nn.Module, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
    return [model(input_ids=ids).logits[0].float() for ids in inputs]


def compare(reference: list[torch.Tensor], candidate: list[torch.Tensor], output: str) -> MergeCheck:
    """Max |Δlogit| and top-1 agreement of two lists of (T, V) logits."""
    if output not in TOLERANCES:
        raise ValueError(f"no merge-check tolerance for output {output!r}; known: {', '.join(TOLERANCES)}")
    ref, got = torch.cat(reference), torch.cat(candidate)
    return MergeCheck(max_abs=(ref - got).abs().max().item(),
                      top1=(ref.argmax(-1) == got.argmax(-1)).float().mean().item(),
                      tokens=ref.shape[0], output=output, tolerance=TOLERANCES[output])


def require(result: MergeCheck) -> MergeCheck:
    """The result if it passed, else MergeCheckError saying why (the caller writes nothing)."""
    if not result.passed:
        raise MergeCheckError(f"{result.line()}: the merged model does not reproduce the adapter on its base; "
                              "nothing was written (--no-check skips this check)")
    return result
