"""Training data: read records, render them to token ids, mask the prompt from the loss, batch.

Formats (detected per file from the keys of its records, or set with data.format):
    prompt_completion  {"prompt": ..., "completion": ...}            (optional "answer": the reference)
    alpaca             {"instruction": ..., "input": ..., "output": ...}
    chat               {"messages": [{"role": ..., "content": ...}, ...]}  via the tokenizer's chat template
    text               {"text": ...}                                   every token carries loss

Labels follow transformers' causal-LM convention: labels[i] = input_ids[i], or -100 where no loss
applies (prompt tokens unless train_on_inputs, padding); the model shifts them by one itself.
"""

from __future__ import annotations

import csv
import functools
import io
import json
import random
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .config import BUILTIN_PREFIX

IGNORE = -100
FORMAT_KEYS = {
    "prompt_completion": ("prompt", "completion"),
    "alpaca": ("instruction", "output"),
    "chat": ("messages",),
    "text": ("text",),
    "preference": ("prompt", "chosen", "rejected"),  # pairs for objective dpo / orpo (preference_data.py)
}
ALPACA_PROMPT = (
    "Below is an instruction that describes a task{with_input}. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n{input_block}### Response:\n"
)


class DataError(ValueError):
    """A problem with a data file, naming the file and line."""


@dataclass
class Record:
    fields: dict
    source: str  # "file:line" (or "builtin:task[i]") for error messages


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]
    prompt: str | None = None      # for generation: the text to continue
    reference: str | None = None   # for exact match: the expected answer
    source: str = ""


@dataclass
class Dataset:
    examples: list[Example]
    truncated: int = 0             # examples cut at max_length
    unsupervised: int = 0          # examples left with no label token (all prompt) after truncation
    tokens: int = field(init=False)
    supervised_tokens: int = field(init=False)  # tokens that carry loss (the model predicts them)

    def __post_init__(self):
        self.tokens = sum(len(e.input_ids) for e in self.examples)
        # labels[0] is never predicted (nothing comes before it), as in collate's shift
        self.supervised_tokens = sum(sum(label != IGNORE for label in e.labels[1:]) for e in self.examples)


def read_records(path: str | Path) -> list[Record]:
    """Records of a .jsonl, .json (a list of objects) or .csv file, each with its file:line. A file
    that holds no record is an error (an empty data file is a mistake, never "no data")."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such data file")
    suffix = path.suffix.lower()
    if suffix not in (".jsonl", ".json", ".csv"):
        raise DataError(f"{path}: unknown data file type {suffix!r}; use .jsonl, .json or .csv")
    text = _utf8(path)
    records = []
    if suffix == ".jsonl":
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{number}: not valid JSON ({e.msg})") from e
            if not isinstance(obj, dict):
                raise DataError(f"{path}:{number}: expected a JSON object, got {type(obj).__name__}")
            records.append(Record(obj, f"{path}:{number}"))
    elif suffix == ".json":
        if text.strip():
            try:
                data = json.loads(text)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from e
            if not isinstance(data, list) or not all(isinstance(d, dict) for d in data):
                raise DataError(f"{path}: a .json data file must hold a list of objects")
            records = [Record(d, f"{path}[{i}]") for i, d in enumerate(data)]
    else:
        # line numbers: the header is line 1
        rows = csv.DictReader(io.StringIO(text, newline=""))
        records = [Record(row, f"{path}:{i}") for i, row in enumerate(rows, start=2)]
    if not records:
        raise DataError(f"{path}: holds no records (the file is empty or blank); a data file needs at least one")
    return records


def read_data(spec: str, split: str = "train", n_train: int | None = None, n_test: int | None = None) -> list[Record]:
    """The records `spec` names: a .jsonl/.json/.csv file (read_records), or "builtin:<task>": that
    built-in task's `split` ("train" or "test"; tasks.make_task with n_train/n_test where given),
    each record's source "builtin:<task>[<split> <i>]". What `lorakit train` reads for data.train,
    data.validation and data.test, and `lorakit eval` for --data."""
    if not spec.startswith(BUILTIN_PREFIX):
        return read_records(spec)
    sizes = tuple((k, v) for k, v in (("n_train", n_train), ("n_test", n_test)) if v is not None)
    rows = getattr(_task(spec[len(BUILTIN_PREFIX):], sizes), split)
    return [Record(r, f"{spec}[{split} {i}]") for i, r in enumerate(rows)]


@functools.lru_cache(maxsize=4)  # a run reads a task's train and test splits: generate it once
def _task(name: str, sizes: tuple):
    from .tasks import make_task

    return make_task(name, **dict(sizes))


def _utf8(path: Path) -> str:
    """The file's text; bytes that are not UTF-8 are an error naming the line (a UTF-8 BOM is dropped)."""
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        raise DataError(f"{path}:{line}: not UTF-8 text (byte 0x{raw[e.start]:02x} at offset {e.start}); "
                        "data files must be UTF-8: re-save it as UTF-8") from e


def detect_format(records: list[Record], declared: str = "auto") -> str:
    """The format every record follows; a record that does not fit is an error naming its line."""
    if not records:
        raise DataError("the data file holds no records")
    fmt = declared
    if fmt == "auto":
        first = records[0]
        fmt = next((f for f, keys in FORMAT_KEYS.items() if all(k in first.fields for k in keys)), None)
        if fmt is None:
            raise DataError(f"{first.source}: cannot tell the format from keys {sorted(first.fields)}; "
                            + "; ".join(f"{f}: {', '.join(k)}" for f, k in FORMAT_KEYS.items()))
    for record in records:
        missing = [k for k in FORMAT_KEYS[fmt] if k not in record.fields]
        if missing:
            raise DataError(f"{record.source}: format {fmt} needs key(s) {', '.join(missing)}; "
                            f"this record has {', '.join(sorted(record.fields)) or 'none'}")
    return fmt


def _text(record: Record, key: str, optional: bool = False) -> str:
    value = record.fields.get(key)
    if value is None and optional:
        return ""
    if not isinstance(value, str):
        raise DataError(f"{record.source}: {key!r} must be a string, got {type(value).__name__}")
    return value


def render(record: Record, fmt: str, tokenizer) -> tuple[list[int], list[int], str | None, str | None]:
    """(input_ids, loss_mask, prompt, reference): mask 1 on tokens the model should learn to write."""
    eos = tokenizer.eos_token or ""
    if fmt in ("prompt_completion", "alpaca"):
        if fmt == "alpaca":
            inp = _text(record, "input", optional=True)
            prompt = ALPACA_PROMPT.format(
                with_input=", paired with an input that provides further context" if inp else "",
                instruction=_text(record, "instruction"),
                input_block=f"### Input:\n{inp}\n\n" if inp else "")
            completion = _text(record, "output")
        else:
            prompt, completion = _text(record, "prompt"), _text(record, "completion")
        reference = _text(record, "answer") if "answer" in record.fields else completion
        if eos and not completion.endswith(eos):
            completion += eos  # so the model learns to stop
        p = tokenizer(prompt, add_special_tokens=True)["input_ids"]
        c = tokenizer(completion, add_special_tokens=False)["input_ids"]
        return p + c, [0] * len(p) + [1] * len(c), prompt, reference
    if fmt == "text":
        ids = tokenizer(_text(record, "text") + eos, add_special_tokens=True)["input_ids"]
        return ids, [1] * len(ids), None, None
    return _render_chat(record, tokenizer)


def _render_chat(record: Record, tokenizer):
    messages = record.fields["messages"]
    if not (isinstance(messages, list) and messages and all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in messages)):
        raise DataError(f"{record.source}: 'messages' must be a non-empty list of "
                        "{\"role\": str, \"content\": str} objects")
    if not getattr(tokenizer, "chat_template", None):
        raise DataError(f"{record.source}: chat records need a tokenizer with a chat template; "
                        "this tokenizer has none (use prompt_completion records instead)")
    if messages[-1]["role"] != "assistant":
        raise DataError(f"{record.source}: the last message must be the assistant's (the reply to learn)")

    def ids(msgs, generation_prompt):
        return list(tokenizer.apply_chat_template(msgs, tokenize=True, add_generation_prompt=generation_prompt,
                                                  return_dict=True)["input_ids"])

    full = ids(messages, False)
    mask = [0] * len(full)
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        # The template renders assistant turn i as the tokens between the prompt for it and the
        # conversation up to it, end-of-turn token included (so the model learns to stop).
        start, end = len(ids(messages[:i], True)), len(ids(messages[: i + 1], False))
        if full[:end] != ids(messages[: i + 1], False):
            raise DataError(f"{record.source}: the chat template does not render turns as prefixes; "
                            "cannot locate the assistant tokens")
        mask[start:end] = [1] * (end - start)
    prompt = tokenizer.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True)
    return full, mask, prompt, messages[-1]["content"]


def build_dataset(records: list[Record], tokenizer, fmt: str = "auto", max_length: int = 256,
                  train_on_inputs: bool = False) -> Dataset:
    fmt = detect_format(records, fmt)
    if fmt == "preference":  # two sequences per record: preference_data's pairs
        from .preference_data import build_preference_dataset

        return build_preference_dataset(records, tokenizer, max_length)
    examples, truncated, unsupervised = [], 0, 0
    for record in records:
        ids, mask, prompt, reference = render(record, fmt, tokenizer)
        if len(ids) > max_length:
            ids, mask = ids[:max_length], mask[:max_length]
            truncated += 1
        labels = [t if (m or train_on_inputs) else IGNORE for t, m in zip(ids, mask)]
        if all(label == IGNORE for label in labels[1:]):
            unsupervised += 1
        examples.append(Example(ids, labels, prompt, reference, record.source))
    return Dataset(examples, truncated, unsupervised)


def pack(dataset: Dataset, max_length: int) -> Dataset:
    """Concatenate examples into rows of max_length tokens (fewer padding tokens; attention spans
    example boundaries, as in most packing implementations)."""
    ids, labels, rows = [], [], []
    for e in dataset.examples:
        ids += e.input_ids
        labels += e.labels
        while len(ids) >= max_length:
            rows.append(Example(ids[:max_length], labels[:max_length], source="packed"))
            ids, labels = ids[max_length:], labels[max_length:]
    if ids:
        rows.append(Example(ids, labels, source="packed"))
    packed = Dataset(rows)
    packed.truncated, packed.unsupervised = dataset.truncated, dataset.unsupervised
    return packed


def collate(examples: list[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded batch: input_ids, attention_mask, labels (-100 on padding)."""
    width = max(len(e.input_ids) for e in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e.input_ids)
        input_ids[i, :n] = torch.tensor(e.input_ids)
        labels[i, :n] = torch.tensor(e.labels)
        mask[i, :n] = 1
    return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    """The example order of one epoch: a permutation that depends only on (seed, epoch), so a
    resumed run sees the same batches as an uninterrupted one."""
    order = list(range(n))
    random.Random(seed * 1_000_003 + epoch).shuffle(order)
    return order


def batch_at(dataset: Dataset, step: int, batch_size: int, seed: int) -> list[Example]:
    """The examples of global micro-batch number `step` (0-based), epochs laid end to end; a
    trailing partial batch of an epoch is dropped so every batch has batch_size examples."""
    n = len(dataset.examples)
    per_epoch = n // batch_size
    if per_epoch == 0:
        raise DataError(f"{n} training examples is fewer than one batch of {batch_size}; "
                        "lower train.batch_size or add data")
    epoch, index = divmod(step, per_epoch)
    order = epoch_order(n, seed, epoch)
    return [dataset.examples[i] for i in order[index * batch_size:(index + 1) * batch_size]]


def split_validation(records: list[Record], fraction: float, seed: int) -> tuple[list[Record], list[Record]]:
    """(train, validation): a seeded random `fraction` of the records held out for validation."""
    if fraction <= 0:
        return records, []
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    k = max(1, round(fraction * len(records)))
    held = set(order[:k])
    return [r for i, r in enumerate(records) if i not in held], [records[i] for i in sorted(held)]
