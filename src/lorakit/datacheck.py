"""The data pre-flight check: the mistakes in a run's data that are not syntax errors.

Most failed fine-tunes fail in the data, silently. Checked here, on the datasets exactly as the run
tokenizes them (training.setup.load_data), for `lorakit data CONFIG` and, summarised, at the start
of `lorakit train`:

    eos          every chat/completion example has the EOS or end-of-turn token among its supervised
                 tokens (else the model never learns to stop: "endless generation")     error
    template     the data's chat markers are this tokenizer's (<|im_start|> data for a Llama 3 model
                 is a template mismatch); chat examples hold the template's markers       error
    tokenizer    an EOS token exists and is one token; the pad token is a special token  error / warning
    truncation   supervised tokens that data.max_length cuts away (never learned)        warning
    empty        examples whose completion is empty (they teach to stop at once)         warning
    duplicates   exact and near (same text up to case, spacing and punctuation) copies   warning
    leakage      test / validation examples whose prompt is also a training prompt: an
                 error above `max_leakage` of the split, else a warning                   error / warning

plus the length distribution of every split and a few examples rendered as the model sees them,
the supervised tokens marked.
"""

from __future__ import annotations

import re
import statistics
from dataclasses import asdict, dataclass, field

from .data import IGNORE, Dataset, Example, auto_max_length, chat_markers, end_of_turn_ids, special_ids

MAX_LEAKAGE = 0.01      # a test / validation split with more than this fraction seen in training: an error
HEAVY_TRUNCATION = 0.1  # truncation dropping more than this fraction of the supervised tokens: said loudly
SHOWN = 3               # examples named per finding
# Chat-format markers of the common templates: ChatML / Llama 3 style <|name|>, Llama 2's [INST] and
# <<SYS>>, Gemma's <start_of_turn>.
MARKER = re.compile(r"<\|[A-Za-z0-9_]+\|>|\[/?INST\]|<</?SYS>>|<(?:start|end)_of_turn>")
CHAT_FORMATS = ("chat", "sharegpt")
REPLY_FORMATS = ("prompt_completion", "alpaca", "chat", "sharegpt")  # formats whose examples end with a reply


@dataclass
class Finding:
    level: str                  # "error" or "warning"
    check: str                  # eos, template, tokenizer, truncation, empty, duplicates, leakage
    message: str
    examples: list[str] = field(default_factory=list)  # sources of a few examples that have the problem


@dataclass
class DataReport:
    findings: list[Finding]
    splits: dict[str, dict]     # per split: examples, tokens (min/median/p95/max), supervised, truncated, dropped
    samples: list[dict]         # a few training examples: source, text with supervised tokens marked, label tokens
    max_length: int | None      # where examples are cut
    auto_max_length: int | None  # what data.max_length "auto" would choose for this training data

    @property
    def errors(self) -> list[Finding]:
        return [f for f in self.findings if f.level == "error"]

    @property
    def warnings(self) -> list[Finding]:
        return [f for f in self.findings if f.level == "warning"]

    def to_dict(self) -> dict:
        return {"errors": len(self.errors), "warnings": len(self.warnings), **asdict(self)}


def check(tokenizer, train: Dataset, validation: Dataset | None = None, test: Dataset | None = None,
          max_leakage: float = MAX_LEAKAGE, samples: int = SHOWN, colour: bool = False) -> DataReport:
    """Every check of the module docstring on the run's datasets (validation / test may be None)."""
    splits = {"train": train, "validation": validation, "test": test}
    texts = {name: [tokenizer.decode(e.input_ids) for e in ds.examples] for name, ds in splits.items() if ds}
    findings = (tokenizer_findings(tokenizer, train.format) + eos_findings(tokenizer, train)
                + template_findings(tokenizer, train, texts["train"]) + truncation_findings(train)
                + empty_findings(tokenizer, train) + duplicate_findings(train, texts["train"]))
    for name in ("validation", "test"):
        if splits[name]:
            findings += leakage_findings(name, splits[name], train, texts[name], texts["train"], max_leakage)
    return DataReport(
        findings, {name: split_stats(ds) for name, ds in splits.items() if ds},
        [{"source": e.source, "text": marked(tokenizer, e, colour), "label_tokens": label_tokens(e)}
         for e in train.examples[:samples]],
        train.max_length, auto_max_length([e.full_length or len(e.input_ids) for e in train.examples]))


# --- the checks, one function each -----------------------------------------------------------------

def tokenizer_findings(tokenizer, fmt: str) -> list[Finding]:
    out = []
    eos = tokenizer.eos_token
    if eos is None and fmt != "text":
        out.append(Finding("error", "tokenizer", "the tokenizer has no EOS token: no example can end with one, so "
                           "the model never learns to stop; set tokenizer.eos_token (in tokenizer_config.json)"))
    elif eos is not None and tokenizer(eos, add_special_tokens=False)["input_ids"] != [tokenizer.eos_token_id]:
        out.append(Finding("error", "tokenizer", f"the EOS token {eos!r} is not tokenized as one token (id "
                           f"{tokenizer.eos_token_id}) when written in text, so completions do not end with it; "
                           "the tokenizer's EOS must be a special token"))
    pad = tokenizer.pad_token_id
    added = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    marked = {i for i, t in added.items() if getattr(t, "special", False)}  # naming a token pad does not count
    if pad is not None and pad not in marked | {tokenizer.eos_token_id, tokenizer.bos_token_id, tokenizer.unk_token_id}:
        out.append(Finding("warning", "tokenizer", f"the pad token {tokenizer.pad_token!r} (id {pad}) is an ordinary "
                           "token that text may contain; padding carries no loss here, but generation and other "
                           "tools may drop it from real text: use a special token (or the EOS token) as pad"))
    return out


def eos_findings(tokenizer, train: Dataset) -> list[Finding]:
    """Examples (not truncated: the cut takes the end away) without an end-of-turn token in their labels."""
    ends = set(end_of_turn_ids(tokenizer))
    if train.format not in REPLY_FORMATS or not ends:
        return []
    complete = [e for e in train.examples if not truncated(e)]
    missing = [e for e in complete if not ends & {label for label in e.labels[1:] if label != IGNORE}]
    if not missing:
        return []
    names = ", ".join(repr(tokenizer.convert_ids_to_tokens(i)) for i in sorted(ends))
    return [Finding("error", "eos", f"{len(missing)} of {len(complete)} {train.format} examples have no "
                    f"end-of-turn token ({names}) among their supervised tokens: the model never learns to stop "
                    "and generates without end. "
                    + ("The chat template does not mark the end of an assistant turn with a special token "
                       "inside the reply; use a model/template that does, or end the replies with the EOS token."
                       if train.format in CHAT_FORMATS else
                       "End every completion with the EOS token (lorakit appends it to completions that lack it; "
                       "check the tokenizer's EOS)."), sources(missing))]


def template_findings(tokenizer, train: Dataset, texts: list[str]) -> list[Finding]:
    markers = chat_markers(tokenizer)
    names = [tokenizer.convert_ids_to_tokens(i) for i in markers.get("all", [])]
    if train.format in CHAT_FORMATS:
        wanted = set(markers.get("all", []))
        without = [e for e in train.examples if wanted and not wanted & set(e.input_ids)]
        return [Finding("error", "template", f"{len(without)} chat examples hold none of the chat template's turn "
                        f"markers ({', '.join(names)}): the template did not render them as the model expects",
                        sources(without))] if without else []
    special = {tokenizer.convert_ids_to_tokens(i) for i in special_ids(tokenizer)}
    foreign: dict[str, list[Example]] = {}
    for e, text in zip(train.examples, texts):
        for marker in set(MARKER.findall(text)) - special:
            foreign.setdefault(marker, []).append(e)
    if not foreign:
        return []
    used = sorted(foreign, key=lambda m: (-len(foreign[m]), m))
    affected = list({id(e): e for m in used for e in foreign[m]}.values())
    if names:
        return [Finding("error", "template", f"template mismatch: {len(affected)} of {len(train.examples)} examples "
                        f"use chat markers {', '.join(used)} that this tokenizer does not know (split into ordinary "
                        f"tokens), while its chat template uses {', '.join(names)}: write the prompts with this "
                        "model's template, or give chat records ({\"messages\": [...]}) and let lorakit apply it",
                        sources(affected))]
    return [Finding("warning", "template", f"{len(affected)} of {len(train.examples)} examples use chat markers "
                    f"{', '.join(used)} that are not special tokens of this tokenizer (it has no chat template): "
                    "they are learned as ordinary text", sources(affected))]


def truncation_findings(train: Dataset) -> list[Finding]:
    cut = [e for e in train.examples if e.dropped]
    if not cut:
        return []
    dropped = sum(e.dropped for e in train.examples)
    total = train.supervised_tokens + dropped
    share = dropped / total
    auto = auto_max_length([e.full_length for e in train.examples])
    loud = "HEAVY TRUNCATION: " if share > HEAVY_TRUNCATION else ""
    return [Finding("warning", "truncation", f"{loud}data.max_length={train.max_length} cuts {len(cut)} of "
                    f"{len(train.examples)} training examples and drops {dropped:,} of their {total:,} supervised "
                    f"tokens ({share:.1%}), which are never learned; set data.max_length=auto (here {auto}: the "
                    "longest example) or a larger number", sources(cut))]


def empty_findings(tokenizer, train: Dataset) -> list[Finding]:
    if train.format not in REPLY_FORMATS:
        return []
    special = special_ids(tokenizer)
    empty = [e for e in train.examples if not truncated(e)
             and all(label == IGNORE or label in special for label in e.labels[1:])]
    return [Finding("warning", "empty", f"{len(empty)} of {len(train.examples)} examples have an empty completion "
                    "(nothing but the end-of-turn token to learn): they teach the model to stop at once",
                    sources(empty))] if empty else []


def duplicate_findings(train: Dataset, texts: list[str]) -> list[Finding]:
    exact, near = {}, {}
    same, similar = [], []
    for e, text in zip(train.examples, texts):
        key = (tuple(e.input_ids), tuple(e.labels))
        if key in exact:
            same.append(f"{e.source} = {exact[key].source}")
        elif normalise(text) in near:
            similar.append(f"{e.source} ~ {near[normalise(text)].source}")
        exact.setdefault(key, e)
        near.setdefault(normalise(text), e)
    out = []
    if same:
        out.append(Finding("warning", "duplicates", f"{len(same)} training examples are exact copies of an earlier "
                           "one: they weigh double in the loss and leak into a validation split", same[:SHOWN]))
    if similar:
        out.append(Finding("warning", "duplicates", f"{len(similar)} training examples are near-copies of an earlier "
                           "one (the same text up to case, spacing and punctuation)", similar[:SHOWN]))
    return out


def leakage_findings(name: str, split: Dataset, train: Dataset, texts: list[str], train_texts: list[str],
                     max_leakage: float) -> list[Finding]:
    """`split`'s examples whose prompt (the whole text where there is no prompt) a training example has."""
    seen = {}
    for e, text in zip(train.examples, train_texts):
        seen.setdefault(normalise(e.prompt if e.prompt is not None else text), e)
    leaked = [f"{e.source} = {seen[k].source}" for e, text in zip(split.examples, texts)
              if (k := normalise(e.prompt if e.prompt is not None else text)) in seen]
    if not leaked:
        return []
    share = len(leaked) / len(split.examples)
    level = "error" if share > max_leakage else "warning"
    return [Finding(level, "leakage", f"{len(leaked)} of {len(split.examples)} {name} examples ({share:.1%}) also "
                    f"appear in the training data (the same prompt): their {name} scores measure memory, not "
                    f"generalisation" + (f" (more than data.max_leakage={max_leakage:g}: remove them from one of the two, "
                                            "or raise data.max_leakage if the repeats are intended)"
                                         if level == "error" else ""), leaked[:SHOWN])]


# --- helpers -----------------------------------------------------------------------------------------

def truncated(e: Example) -> bool:
    return e.full_length > len(e.input_ids)


def normalise(text: str) -> str:
    """Text up to case, spacing and punctuation: what near-duplicates share."""
    return " ".join(re.sub(r"[^\w\s]", " ", text.lower()).split())


def sources(examples: list[Example]) -> list[str]:
    return [e.source for e in examples[:SHOWN]]


def label_tokens(e: Example) -> int:
    """The tokens the example is trained on (labels after the first that are not ignored)."""
    return sum(label != IGNORE for label in e.labels[1:])


def split_stats(ds: Dataset) -> dict:
    lengths = sorted(e.full_length or len(e.input_ids) for e in ds.examples)
    return {"examples": len(ds.examples), "format": ds.format,
            "tokens": {"min": lengths[0], "median": statistics.median(lengths),
                       "p95": lengths[min(len(lengths) - 1, int(0.95 * len(lengths)))], "max": lengths[-1]},
            "supervised_tokens": ds.supervised_tokens, "truncated": ds.truncated,
            "dropped_supervised_tokens": sum(e.dropped for e in ds.examples)}


def marked(tokenizer, e: Example, colour: bool = False) -> str:
    """The example's text as the model sees it, the supervised tokens (those it learns to write) in
    [brackets], or green in a terminal (colour)."""
    start, end = ("\033[32m", "\033[0m") if colour else ("[", "]")
    flags = [i > 0 and label != IGNORE for i, label in enumerate(e.labels)]
    out, i = [], 0
    while i < len(flags):
        j = i
        while j < len(flags) and flags[j] == flags[i]:
            j += 1
        text = tokenizer.decode(e.input_ids[i:j])
        out.append(f"{start}{text}{end}" if flags[i] else text)
        i = j
    return "".join(out)


def render_report(report: DataReport) -> str:
    """The report as text: the examples, the length table, then the errors and warnings."""
    lines = []
    for s in report.samples:
        lines += [f"--- {s['source']} ({s['label_tokens']} label tokens)", s["text"]]
    lines.append("")
    lines.append(f"{'split':<11} {'examples':>8} {'min':>6} {'median':>7} {'p95':>6} {'max':>6} "
                 f"{'supervised':>10} {'truncated':>9}")
    for name, s in report.splits.items():
        t = s["tokens"]
        lines.append(f"{name:<11} {s['examples']:>8,} {t['min']:>6} {t['median']:>7g} {t['p95']:>6} {t['max']:>6} "
                     f"{s['supervised_tokens']:>10,} {s['truncated']:>9,}")
    lines.append(f"data.max_length: {report.max_length} (auto would choose {report.auto_max_length})")
    lines += [""] + [finding_line(f) for f in report.findings]
    lines.append(f"{len(report.errors)} error(s), {len(report.warnings)} warning(s)")
    return "\n".join(lines)


def finding_line(f: Finding) -> str:
    return f"{f.level}: [{f.check}] {f.message}" + (f" (e.g. {'; '.join(f.examples)})" if f.examples else "")


def summary(report: DataReport) -> list[str]:
    """A few lines for the start of `lorakit train`: the lengths and every finding."""
    t = report.splits["train"]["tokens"]
    return [f"data check: train tokens per example min {t['min']} / median {t['median']:g} / p95 {t['p95']} / max "
            f"{t['max']}; {len(report.errors)} error(s), {len(report.warnings)} warning(s)"
            + (" (lorakit data CONFIG shows them in full)" if report.findings else "")] + \
        [finding_line(f) for f in report.findings]
