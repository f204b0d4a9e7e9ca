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

Preference pairs (preference_data: data.format preference, objective dpo / orpo) get the checks that
apply to them (check_pairs): on each of a pair's two sequences, prompt + chosen and prompt +
rejected, tokenizer, eos, template and truncation as above, the lengths and the rendered examples;
on the pairs:

    no signal    pairs whose two sequences are the same after the cut at data.max_length (the
                 answers differ only in the tokens cut away): DPO's loss of such a pair is
                 constant (its log-ratio difference is 0), so it teaches nothing      warning (all: error)
    duplicates   exact and near copies of a pair (chosen and rejected alike)          warning
    leakage      test / validation pairs whose prompt is also a training prompt       error / warning
"""

from __future__ import annotations

import re
import statistics
from dataclasses import asdict, dataclass, field

from .data import IGNORE, Dataset, Example, auto_max_length, chat_markers, end_of_turn_ids, special_ids
from .preference_data import Pair, PreferenceDataset, is_preference

MAX_LEAKAGE = 0.01      # a test / validation split with more than this fraction seen in training: an error
HEAVY_TRUNCATION = 0.1  # truncation dropping more than this fraction of the supervised tokens: said loudly
SHOWN = 3               # examples named per finding
# Chat-format markers of the common templates: ChatML / Llama 3 style <|name|>, Llama 2's [INST] and
# <<SYS>>, Gemma's <start_of_turn>.
MARKER = re.compile(r"<\|[A-Za-z0-9_]+\|>|\[/?INST\]|<</?SYS>>|<(?:start|end)_of_turn>")
CHAT_FORMATS = ("chat", "sharegpt")
REPLY_FORMATS = ("prompt_completion", "alpaca", "chat", "sharegpt")  # formats whose examples end with a reply
SEQUENCES = "preference sequences (prompt + chosen, prompt + rejected)"  # what the pair checks count


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


def check(tokenizer, train: Dataset | PreferenceDataset, validation=None, test=None,
          max_leakage: float = MAX_LEAKAGE, samples: int = SHOWN, colour: bool = False) -> DataReport:
    """Every check of the module docstring on the run's datasets (validation / test may be None);
    preference pairs go to check_pairs."""
    if is_preference(train):
        return check_pairs(tokenizer, train, validation, test, max_leakage, samples, colour)
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


def check_pairs(tokenizer, train: PreferenceDataset, validation=None, test=None, max_leakage: float = MAX_LEAKAGE,
                samples: int = SHOWN, colour: bool = False) -> DataReport:
    """The checks of the module docstring that apply to preference pairs: those of one sequence on
    both of each pair's sequences (sequences()), the rest on the pairs. The lengths count sequences
    (tokens, supervised tokens, dropped), the examples and truncated columns pairs; the samples show
    prompt + chosen and prompt + rejected of the first `samples` pairs."""
    splits = {"train": train, "validation": validation, "test": test}
    seqs = {name: sequences(ds) for name, ds in splits.items() if ds}
    texts = [tokenizer.decode(e.input_ids) for e in seqs["train"].examples]  # chosen, rejected of each pair
    findings = (tokenizer_findings(tokenizer, train.format) + eos_findings(tokenizer, seqs["train"], SEQUENCES)
                + template_findings(tokenizer, seqs["train"], texts, SEQUENCES)
                + truncation_findings(seqs["train"], "training " + SEQUENCES) + no_signal_findings(train)
                + duplicates([p.source for p in train.examples],
                             [(tuple(p.chosen_ids), tuple(p.chosen_labels), tuple(p.rejected_ids), tuple(p.rejected_labels))
                              for p in train.examples],
                             [normalise(c) + "\n" + normalise(r) for c, r in zip(texts[::2], texts[1::2])],
                             "training pairs"))
    for name in ("validation", "test"):
        if splits[name]:
            findings += leakage_findings(name, splits[name], train, first_texts(tokenizer, splits[name]), texts[::2],
                                         max_leakage, "pairs" if is_preference(splits[name]) else "examples")
    shown = seqs["train"].examples[:2 * samples]
    return DataReport(
        findings, {name: pair_stats(splits[name], ds) for name, ds in seqs.items()},
        [{"source": e.source, "text": marked(tokenizer, e, colour), "label_tokens": label_tokens(e)} for e in shown],
        train.max_length, auto_max_length([e.full_length or len(e.input_ids) for e in seqs["train"].examples]))


def sequences(pairs) -> Dataset:
    """A preference dataset's pairs as the single sequences the model reads, prompt + chosen then
    prompt + rejected of each pair (sources "<pair> chosen" / "<pair> rejected"), with their lengths
    before the cut and the supervised tokens it dropped; format "chat" when every pair was rendered
    by the chat template (the template's markers are then checked for), else "prompt_completion".
    A dataset of single sequences is returned as it is."""
    if not is_preference(pairs):
        return pairs
    examples = [Example(ids, labels, p.prompt, p.reference, f"{p.source} {side}", length, dropped)
                for p in pairs.examples
                for side, ids, labels, length, dropped in (
                    ("chosen", p.chosen_ids, p.chosen_labels, p.chosen_length, p.chosen_dropped),
                    ("rejected", p.rejected_ids, p.rejected_labels, p.rejected_length, p.rejected_dropped))]
    fmt = "chat" if pairs.examples and all(p.chat for p in pairs.examples) else "prompt_completion"
    return Dataset(examples, sum(truncated(e) for e in examples), 0, fmt, pairs.max_length)


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


def eos_findings(tokenizer, train: Dataset, noun: str | None = None) -> list[Finding]:
    """Examples (not truncated: the cut takes the end away) without an end-of-turn token in their
    labels; noun: what the message calls them (default: "<format> examples")."""
    ends = set(end_of_turn_ids(tokenizer))
    if train.format not in REPLY_FORMATS or not ends:
        return []
    complete = [e for e in train.examples if not truncated(e)]
    missing = [e for e in complete if not ends & {label for label in e.labels[1:] if label != IGNORE}]
    if not missing:
        return []
    names = ", ".join(repr(tokenizer.convert_ids_to_tokens(i)) for i in sorted(ends))
    return [Finding("error", "eos", f"{len(missing)} of {len(complete)} {noun or train.format + ' examples'} have no "
                    f"end-of-turn token ({names}) among their supervised tokens: the model never learns to stop "
                    "and generates without end. "
                    + ("The chat template does not mark the end of an assistant turn with a special token "
                       "inside the reply; use a model/template that does, or end the replies with the EOS token."
                       if train.format in CHAT_FORMATS else
                       "End every completion with the EOS token (lorakit appends it to completions that lack it; "
                       "check the tokenizer's EOS)."), sources(missing))]


def template_findings(tokenizer, train: Dataset, texts: list[str], noun: str | None = None) -> list[Finding]:
    """noun: what the messages call the examples (default: "chat examples", "examples")."""
    markers = chat_markers(tokenizer)
    names = [tokenizer.convert_ids_to_tokens(i) for i in markers.get("all", [])]
    if train.format in CHAT_FORMATS:
        wanted = set(markers.get("all", []))
        without = [e for e in train.examples if wanted and not wanted & set(e.input_ids)]
        return [Finding("error", "template", f"{len(without)} {noun or 'chat examples'} hold none of the chat template's turn "
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
        return [Finding("error", "template", f"template mismatch: {len(affected)} of {len(train.examples)} "
                        f"{noun or 'examples'} "
                        f"use chat markers {', '.join(used)} that this tokenizer does not know (split into ordinary "
                        f"tokens), while its chat template uses {', '.join(names)}: write the prompts with this "
                        "model's template, or give chat records ({\"messages\": [...]}) and let lorakit apply it",
                        sources(affected))]
    return [Finding("warning", "template", f"{len(affected)} of {len(train.examples)} {noun or 'examples'} "
                    "use chat markers "
                    f"{', '.join(used)} that are not special tokens of this tokenizer (it has no chat template): "
                    "they are learned as ordinary text", sources(affected))]


def truncation_findings(train: Dataset, noun: str = "training examples") -> list[Finding]:
    cut = [e for e in train.examples if e.dropped]
    if not cut:
        return []
    dropped = sum(e.dropped for e in train.examples)
    total = train.supervised_tokens + dropped
    share = dropped / total
    auto = auto_max_length([e.full_length for e in train.examples])
    loud = "HEAVY TRUNCATION: " if share > HEAVY_TRUNCATION else ""
    return [Finding("warning", "truncation", f"{loud}data.max_length={train.max_length} cuts {len(cut)} of "
                    f"{len(train.examples)} {noun} and drops {dropped:,} of their {total:,} supervised "
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
    return duplicates([e.source for e in train.examples], [(tuple(e.input_ids), tuple(e.labels)) for e in train.examples],
                      [normalise(text) for text in texts], "training examples")


def duplicates(names: list[str], exact_keys: list, near_keys: list[str], noun: str) -> list[Finding]:
    """Items (named by `names`) whose exact key, else whose near key (normalised text), an earlier one has."""
    exact, near = {}, {}
    same, similar = [], []
    for name, key, text in zip(names, exact_keys, near_keys):
        if key in exact:
            same.append(f"{name} = {exact[key]}")
        elif text in near:
            similar.append(f"{name} ~ {near[text]}")
        exact.setdefault(key, name)
        near.setdefault(text, name)
    out = []
    if same:
        out.append(Finding("warning", "duplicates", f"{len(same)} {noun} are exact copies of an earlier "
                           "one: they weigh double in the loss and leak into a validation split", same[:SHOWN]))
    if similar:
        out.append(Finding("warning", "duplicates", f"{len(similar)} {noun} are near-copies of an earlier "
                           "one (the same text up to case, spacing and punctuation)", similar[:SHOWN]))
    return out


def leakage_findings(name: str, split: Dataset, train: Dataset, texts: list[str], train_texts: list[str],
                     max_leakage: float, noun: str = "examples") -> list[Finding]:
    """`split`'s examples (pairs: noun) whose prompt (the whole text where there is no prompt) a
    training example has."""
    seen = {}
    for e, text in zip(train.examples, train_texts):
        seen.setdefault(normalise(e.prompt if e.prompt is not None else text), e)
    leaked = [f"{e.source} = {seen[k].source}" for e, text in zip(split.examples, texts)
              if (k := normalise(e.prompt if e.prompt is not None else text)) in seen]
    if not leaked:
        return []
    share = len(leaked) / len(split.examples)
    level = "error" if share > max_leakage else "warning"
    return [Finding(level, "leakage", f"{len(leaked)} of {len(split.examples)} {name} {noun} ({share:.1%}) also "
                    f"appear in the training data (the same prompt): their {name} scores measure memory, not "
                    f"generalisation" + (f" (more than data.max_leakage={max_leakage:g}: remove them from one of the two, "
                                            "or raise data.max_leakage if the repeats are intended)"
                                         if level == "error" else ""), leaked[:SHOWN])]


def no_signal_findings(train: PreferenceDataset) -> list[Finding]:
    """Pairs whose chosen and rejected sequences are one sequence after the cut at max_length:
    log π(y_w|x) - log π(y_l|x) is then 0 whatever the weights, so DPO's loss of the pair is a
    constant (ln 2 for the sigmoid loss) with no gradient, and ORPO learns only its SFT term."""
    same = [p for p in train.examples if p.chosen_ids == p.rejected_ids]
    if not same:
        return []
    level = "error" if len(same) == len(train.examples) else "warning"
    return [Finding(level, "no signal", f"{len(same)} of {len(train.examples)} training pairs are the same sequence "
                    f"after data.max_length={train.max_length} cuts them (chosen and rejected differ only in the "
                    "tokens cut away): they carry no preference, DPO learns nothing from them; set "
                    "data.max_length=auto or a larger number, or shorten the prompts", sources(same))]


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


def first_texts(tokenizer, ds) -> list[str]:
    """Each example's text as the model reads it (a pair's: prompt + chosen)."""
    return [tokenizer.decode(e.chosen_ids if isinstance(e, Pair) else e.input_ids) for e in ds.examples]


def pair_stats(ds, seqs: Dataset) -> dict:
    """split_stats of a split's sequences; for pairs, examples and truncated count pairs, and
    sequences counts the sequences the lengths are of."""
    stats = split_stats(seqs)
    if is_preference(ds):
        stats.update(examples=len(ds.examples), format=ds.format, truncated=ds.truncated, sequences=len(seqs.examples))
    return stats


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
    if "sequences" in report.splits["train"]:
        lines.append("preference pairs: tokens per sequence (prompt + chosen, prompt + rejected); examples and "
                     "truncated count pairs")
    lines.append(f"data.max_length: {report.max_length} (auto would choose {report.auto_max_length})")
    lines += [""] + [finding_line(f) for f in report.findings]
    lines.append(f"{len(report.errors)} error(s), {len(report.warnings)} warning(s)")
    return "\n".join(lines)


def finding_line(f: Finding) -> str:
    return f"{f.level}: [{f.check}] {f.message}" + (f" (e.g. {'; '.join(f.examples)})" if f.examples else "")


def summary(report: DataReport) -> list[str]:
    """A few lines for the start of `lorakit train`: the lengths and every finding."""
    t = report.splits["train"]["tokens"]
    unit = "sequence (prompt + chosen, prompt + rejected)" if "sequences" in report.splits["train"] else "example"
    return [f"data check: train tokens per {unit} min {t['min']} / median {t['median']:g} / p95 {t['p95']} / max "
            f"{t['max']}; {len(report.errors)} error(s), {len(report.warnings)} warning(s)"
            + (" (lorakit data CONFIG shows them in full)" if report.findings else "")] + \
        [finding_line(f) for f in report.findings]
