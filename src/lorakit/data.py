"""Training data: read records, render them to token ids, mask the prompt from the loss, batch.

Formats (detected per file from the keys of its records, or set with data.format):
    prompt_completion  {"prompt": ..., "completion": ...}            (optional "answer": the reference)
    alpaca             {"instruction": ..., "input": ..., "output": ...}
    chat               {"messages": [{"role": ..., "content": ...}, ...]}  via the tokenizer's chat template
    sharegpt           {"conversations": [{"from": ..., "value": ...}, ...]}  as chat, roles mapped (SHAREGPT_ROLES)
    text               {"text": ...}                                   every token carries loss

Files: .jsonl, .json (a list of objects), .csv, .parquet (with pyarrow installed), and Hugging Face
`datasets` datasets read locally: "hf:DIR[:split]" (saved with save_to_disk) or "hf:NAME[:split]" (in
the local cache; never downloaded). data.columns renames a file's fields to the format's keys.

Labels follow transformers' causal-LM convention: labels[i] = input_ids[i], or -100 where no loss
applies (prompt tokens unless train_on_inputs, padding); the model shifts them by one itself.
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import io
import json
import os
import random
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .config import BUILTIN_PREFIX, MAX_LENGTH_AUTO_CAP

IGNORE = -100
FORMAT_KEYS = {
    "prompt_completion": ("prompt", "completion"),
    "alpaca": ("instruction", "output"),
    "chat": ("messages",),
    "sharegpt": ("conversations",),
    "text": ("text",),
    "preference": ("prompt", "chosen", "rejected"),  # pairs for objective dpo / orpo (preference_data.py)
}
# ShareGPT's speaker names ("from") -> chat roles
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant",
                  "assistant": "assistant", "model": "assistant", "chatgpt": "assistant", "bing": "assistant",
                  "bard": "assistant", "tool": "tool", "function": "tool", "observation": "tool"}
HF_PREFIX = "hf:"
MEGABATCH = 50          # data.group_by_length: batches are grouped by length within MEGABATCH x batch examples
PADDING_HINT = 0.25     # load_data suggests data.padding_free when this share of padded batches is padding
PROGRESS_MIN = 10_000   # build_dataset shows a progress bar (terminal, rank 0) above this many records
FILE_TYPES = (".jsonl", ".json", ".csv", ".parquet")
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
    full_length: int = 0           # tokens before truncation at max_length (0: not recorded)
    dropped: int = 0               # supervised tokens truncation removed
    lengths: list[int] | None = None  # a packed row: the lengths of the examples it holds, in order


@dataclass
class Dataset:
    examples: list[Example]
    truncated: int = 0             # examples cut at max_length
    unsupervised: int = 0          # examples left with no label token (all prompt) after truncation
    format: str = ""               # the records' format (detect_format)
    max_length: int | None = None  # where examples were cut (data.max_length, "auto" resolved)
    group_by_length: bool = False  # batch_at batches examples of similar length (data.group_by_length)
    tokens: int = field(init=False)
    supervised_tokens: int = field(init=False)  # tokens that carry loss (the model predicts them)

    def __post_init__(self):
        self.tokens = sum(len(e.input_ids) for e in self.examples)
        # labels[0] is never predicted (nothing comes before it), as in collate's shift
        self.supervised_tokens = sum(sum(label != IGNORE for label in e.labels[1:]) for e in self.examples)


def read_records(path: str | Path) -> list[Record]:
    """Records of a .jsonl, .json (a list of objects), .csv or .parquet file, each with its file:line
    (file[row] for .json and .parquet). A file that holds no record is an error (an empty data file
    is a mistake, never "no data")."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such data file")
    suffix = path.suffix.lower()
    if suffix not in FILE_TYPES:
        raise DataError(f"{path}: unknown data file type {suffix!r}; use .jsonl, .json, .csv or .parquet")
    if suffix == ".parquet":
        records = _parquet_records(path)
        if not records:
            raise DataError(f"{path}: holds no records (the table has no rows); a data file needs at least one")
        return records
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


def _parquet_records(path: Path) -> list[Record]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(f"{path}: reading .parquet files needs pyarrow, which is not installed "
                        "(pip install pyarrow), or convert the file to .jsonl") from None
    try:
        rows = pq.read_table(path).to_pylist()
    except Exception as e:  # pyarrow raises its own error types for a damaged or non-parquet file
        raise DataError(f"{path}: not a readable parquet file ({e})") from e
    return [Record(row, f"{path}[{i}]") for i, row in enumerate(rows)]


def read_hf(spec: str, split: str) -> list[Record]:
    """Records of a Hugging Face `datasets` dataset, read locally only: "hf:DIR[:split]" (a directory
    written by save_to_disk) or "hf:NAME[:split]" (a dataset in the local `datasets` cache; nothing
    is downloaded). Without ":split": `split` if the dataset has it, else its only split."""
    name, _, named_split = spec[len(HF_PREFIX):].partition(":")
    try:
        import datasets
    except ImportError:
        raise DataError(f"{spec}: reading Hugging Face datasets needs the `datasets` package, which is not "
                        "installed (pip install datasets), or export the data to .jsonl/.parquet") from None
    if Path(name).is_dir():
        try:
            data = datasets.load_from_disk(name)
        except FileNotFoundError as e:
            raise DataError(f"{spec}: {name} is not a dataset saved with save_to_disk ({e})") from None
    else:
        data = _cached_hf(datasets, spec, name, named_split or None)
    if isinstance(data, datasets.DatasetDict):
        splits = list(data)
        chosen = named_split or (split if split in data else splits[0] if len(splits) == 1 else None)
        if chosen not in data:
            raise DataError(f"{spec}: no split {chosen or split!r}; this dataset's splits: {', '.join(splits)} "
                            f"(name one: {HF_PREFIX}{name}:{splits[0]})")
        data, split = data[chosen], chosen
    elif named_split and not Path(name).is_dir():
        split = named_split
    rows = data.to_list()
    if not rows:
        raise DataError(f"{spec}: holds no records; a dataset needs at least one")
    return [Record(row, f"{HF_PREFIX}{name}[{split} {i}]") for i, row in enumerate(rows)]


def _cached_hf(datasets, spec: str, name: str, split: str | None):
    """load_dataset(name) from the local cache only: the hub is never asked (offline mode for the call)."""
    import huggingface_hub.constants as hub

    saved = datasets.config.HF_HUB_OFFLINE, hub.HF_HUB_OFFLINE
    datasets.config.HF_HUB_OFFLINE = hub.HF_HUB_OFFLINE = True
    try:
        return datasets.load_dataset(name, split=split)
    except (FileNotFoundError, ConnectionError, ValueError) as e:
        raise DataError(f"{spec}: {name!r} is neither a directory written by save_to_disk nor a dataset in the "
                        f"local Hugging Face cache ({datasets.config.HF_DATASETS_CACHE}); lorakit reads datasets "
                        "locally only, never from the network: download it first (datasets.load_dataset(...)"
                        f".save_to_disk(DIR), then data.train={HF_PREFIX}DIR) [{type(e).__name__}: {e}]") from None
    finally:
        datasets.config.HF_HUB_OFFLINE, hub.HF_HUB_OFFLINE = saved


def map_columns(records: list[Record], columns: dict[str, str] | None) -> list[Record]:
    """Records with the file's field names renamed to the format's: columns {format key: file field},
    e.g. {"prompt": "question", "completion": "answer"}. A record without a mapped field is an error."""
    if not columns:
        return records
    out = []
    for record in records:
        missing = [field for field in columns.values() if field not in record.fields]
        if missing:
            raise DataError(f"{record.source}: data.columns maps to field(s) {', '.join(map(repr, missing))}, which "
                            f"this record lacks; its fields: {', '.join(sorted(record.fields)) or 'none'}")
        renamed = {k: v for k, v in record.fields.items() if k not in columns.values()}
        renamed.update({key: record.fields[field] for key, field in columns.items()})
        out.append(Record(renamed, record.source))
    return out


def read_data(spec: str, split: str = "train", n_train: int | None = None, n_test: int | None = None) -> list[Record]:
    """The records `spec` names: a .jsonl/.json/.csv/.parquet file (read_records), "hf:DIR-or-NAME[:split]"
    (read_hf; `split` when the spec names none), or "builtin:<task>": that built-in task's `split`
    ("train" or "test"; tasks.make_task with n_train/n_test where given), each record's source
    "builtin:<task>[<split> <i>]". What `lorakit train` reads for data.train, data.validation and
    data.test, and `lorakit eval` for --data."""
    if spec.startswith(HF_PREFIX):
        return read_hf(spec, split)
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
    if fmt == "sharegpt":
        return _render_chat(record, sharegpt_messages(record), tokenizer)
    return _render_chat(record, record.fields["messages"], tokenizer)


def sharegpt_messages(record: Record) -> list[dict]:
    """A ShareGPT record's "conversations" ([{"from": "human", "value": ...}, ...]) as chat messages
    ([{"role": "user", "content": ...}, ...]), speakers mapped by SHAREGPT_ROLES."""
    turns = record.fields["conversations"]
    if not (isinstance(turns, list) and turns and all(
            isinstance(t, dict) and isinstance(t.get("from"), str) and isinstance(t.get("value"), str) for t in turns)):
        raise DataError(f"{record.source}: 'conversations' must be a non-empty list of "
                        "{\"from\": str, \"value\": str} objects")
    unknown = sorted({t["from"] for t in turns} - SHAREGPT_ROLES.keys())
    if unknown:
        raise DataError(f"{record.source}: unknown speaker(s) {', '.join(map(repr, unknown))} in 'from'; "
                        f"known: {', '.join(SHAREGPT_ROLES)}")
    return [{"role": SHAREGPT_ROLES[t["from"]], "content": t["value"]} for t in turns]


def _render_chat(record: Record, messages, tokenizer):
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


def progress(items: list, desc: str):
    """`items`, behind a tqdm progress bar on stderr when there are more than PROGRESS_MIN of them,
    stderr is a terminal and this is rank 0 (under torchrun RANK is set); otherwise `items` as they
    are (tests, logs redirected to a file, other ranks, tqdm not installed)."""
    if len(items) <= PROGRESS_MIN or os.environ.get("RANK", "0") != "0" or not sys.stderr.isatty():
        return items
    try:
        from tqdm import tqdm
    except ImportError:
        return items
    return tqdm(items, desc=desc, unit=" records", file=sys.stderr, leave=False)


def auto_max_length(lengths: list[int], cap: int = MAX_LENGTH_AUTO_CAP) -> int:
    """data.max_length "auto": the longest example's tokens, at most `cap`."""
    return min(max(lengths), cap)


def build_dataset(records: list[Record], tokenizer, fmt: str = "auto", max_length: int | str = 256,
                  train_on_inputs: bool = False) -> Dataset:
    """Render every record (render) and cut it at max_length tokens ("auto": auto_max_length of
    these records); labels are the ids where the mask is 1 (every id with train_on_inputs), else
    IGNORE. Each example keeps its length before the cut and the supervised tokens the cut dropped."""
    fmt = detect_format(records, fmt)
    if fmt == "preference":  # two sequences per record: preference_data's pairs
        from .preference_data import build_preference_dataset

        return build_preference_dataset(records, tokenizer, max_length)
    rendered = [render(record, fmt, tokenizer) for record in progress(records, "tokenizing")]
    if max_length == "auto":
        max_length = auto_max_length([len(ids) for ids, *_ in rendered])
    examples, truncated, unsupervised = [], 0, 0
    for record, (ids, mask, prompt, reference) in zip(records, rendered):
        full_length = len(ids)
        labels = [t if (m or train_on_inputs) else IGNORE for t, m in zip(ids, mask)]
        dropped = sum(label != IGNORE for label in labels[max_length:])
        if full_length > max_length:
            ids, labels = ids[:max_length], labels[:max_length]
            truncated += 1
        if all(label == IGNORE for label in labels[1:]):
            unsupervised += 1
        examples.append(Example(ids, labels, prompt, reference, record.source, full_length, dropped))
    return Dataset(examples, truncated, unsupervised, fmt, max_length)


def pack(dataset: Dataset, max_length: int) -> Dataset:
    """Whole examples packed into rows of at most max_length tokens (best fit, longest first): no
    example is split across rows; one longer than a row is cut to it and counted (truncated; those
    of build_dataset at the same max_length already are).

    Packing is exact: collate gives a packed row position ids that restart at 0 with each example,
    and the model masks attention to the block-diagonal causal mask they imply (loss.SummedLoss),
    so every token sees only its own example, at the positions it has unpacked. Each example's first
    label is ignored in the row, as it is unpacked (nothing before it predicts it): the last token of
    one example never learns to predict the first of the next. The row's loss is then the sum of its
    examples' losses, token for token.
    """
    import bisect

    examples = [e if len(e.input_ids) <= max_length else
                dataclasses.replace(e, input_ids=e.input_ids[:max_length], labels=e.labels[:max_length],
                                    dropped=e.dropped + sum(label != IGNORE for label in e.labels[max_length:]))
                for e in dataset.examples]
    cut = sum(len(e.input_ids) > max_length for e in dataset.examples)
    order = sorted(range(len(examples)), key=lambda i: -len(examples[i].input_ids))
    rows: list[list[int]] = []            # example indices per row
    free: list[tuple[int, int]] = []      # (tokens left, row), sorted: the best fit is the first that fits
    for i in order:
        n = len(examples[i].input_ids)
        at = bisect.bisect_left(free, (n, -1))
        if at == len(free):
            rows.append([i])
            left, row = max_length - n, len(rows) - 1
        else:
            left, row = free.pop(at)
            rows[row].append(i)
            left -= n
        if left > 0:
            bisect.insort(free, (left, row))
    packed = [join([examples[i] for i in sorted(members)]) for members in rows]  # dataset order within a row
    return Dataset(packed, dataset.truncated + cut, dataset.unsupervised, dataset.format, max_length)


def join(examples: list[Example]) -> Example:
    """The examples end to end in one row, as exact packing lays them out: `lengths` says where
    each begins (collate restarts the position ids there), and each one's first label is ignored,
    as unpacked (nothing before it predicts it). Examples that are packed rows already keep their
    members' boundaries."""
    return Example([t for e in examples for t in e.input_ids],
                   [t for e in examples for t in [IGNORE, *e.labels[1:]]],
                   source="packed: " + ", ".join(e.source.removeprefix("packed: ") for e in examples),
                   lengths=[n for e in examples for n in (e.lengths or [len(e.input_ids)])])


def collate(examples: list[Example], pad_id: int, padding_free: bool = False) -> dict[str, torch.Tensor]:
    """Right-padded batch: input_ids, attention_mask, labels (-100 on padding). Packed rows (pack)
    also get position_ids (B, T) that restart at 0 with each example and with the padding, from
    which the model derives the block-diagonal causal mask (loss.SummedLoss).

    padding_free (data.padding_free): the examples joined into one row (1, total tokens) instead,
    laid out as a packed row: the padded batch's supervised tokens and losses, and no padding."""
    if padding_free:
        examples = [join(examples)]
    width = max(len(e.input_ids) for e in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e.input_ids)
        input_ids[i, :n] = torch.tensor(e.input_ids)
        labels[i, :n] = torch.tensor(e.labels)
        mask[i, :n] = 1
    batch = {"input_ids": input_ids, "attention_mask": mask, "labels": labels}
    if any(e.lengths is not None for e in examples):
        batch["position_ids"] = torch.tensor([
            [p for n in (e.lengths or [len(e.input_ids)]) + [width - len(e.input_ids)] for p in range(n)]
            for e in examples])
    return batch


def end_of_turn_ids(tokenizer) -> list[int]:
    """The token ids that end a reply: the EOS token and, where the chat template ends a turn with
    another special token (Llama 3's <|eot_id|>, Gemma's <end_of_turn>), that one; generation stops
    at any of them."""
    ids = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    turn = chat_markers(tokenizer)
    end = next((t for t in turn.get("after_reply", []) if t not in ids), None)
    return ids + ([end] if end is not None else [])


PROBE_REPLY = "lorakit probe reply"


def chat_markers(tokenizer) -> dict[str, list[int]]:
    """The special tokens the chat template writes, found by rendering a probe conversation:
    {"all": every special token id in it, "after_reply": those right after the assistant's reply}
    (empty without a template, or when the template refuses the probe)."""
    if not getattr(tokenizer, "chat_template", None):
        return {}
    probe = [{"role": "user", "content": "lorakit probe"}, {"role": "assistant", "content": PROBE_REPLY}]
    try:
        text = tokenizer.apply_chat_template(probe, tokenize=False)
    except Exception:  # a template may raise on anything (its own checks, jinja errors): no markers known
        return {}
    special = special_ids(tokenizer)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    after = tokenizer(text.split(PROBE_REPLY, 1)[1], add_special_tokens=False)["input_ids"] if PROBE_REPLY in text else []
    return {"all": list(dict.fromkeys(i for i in ids if i in special)),
            "after_reply": [i for i in after if i in special][:1]}


def special_ids(tokenizer) -> set[int]:
    """Ids of every special token: the named ones (eos, pad, ...) and added tokens marked special."""
    added = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    return set(tokenizer.all_special_ids) | {i for i, t in added.items() if getattr(t, "special", False)}


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    """The example order of one epoch: a permutation that depends only on (seed, epoch), so a
    resumed run sees the same batches as an uninterrupted one."""
    order = list(range(n))
    random.Random(seed * 1_000_003 + epoch).shuffle(order)
    return order


def batch_at(dataset: Dataset, step: int, batch_size: int, seed: int) -> list[Example]:
    """The examples of global micro-batch number `step` (0-based), epochs laid end to end; a
    trailing partial batch of an epoch is dropped so every batch has batch_size examples. With
    dataset.group_by_length the epoch's batches are those of grouped_batches instead."""
    n = len(dataset.examples)
    per_epoch = n // batch_size
    if per_epoch == 0:
        raise DataError(f"{n} training examples is fewer than one batch of {batch_size}; "
                        "lower train.batch_size or add data")
    epoch, index = divmod(step, per_epoch)
    return [dataset.examples[i] for i in epoch_batches(dataset, batch_size, seed, epoch)[index]]


def epoch_batches(dataset: Dataset, batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """The example indices of every batch of one epoch, in order: epoch_order cut into batches of
    batch_size (a trailing partial one dropped), or with dataset.group_by_length grouped_batches."""
    if getattr(dataset, "group_by_length", False):  # preference_data's pairs are never grouped
        return grouped_batches([len(e.input_ids) for e in dataset.examples], batch_size, seed, epoch)
    n = len(dataset.examples)
    order = epoch_order(n, seed, epoch)
    return [order[i:i + batch_size] for i in range(0, n // batch_size * batch_size, batch_size)]


def grouped_batches(lengths: list[int], batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """One epoch's batches (example indices) for data.group_by_length, a function of (lengths,
    batch_size, seed, epoch) only, so a resumed run sees the same batches:

    1. the epoch's examples are those batch_at uses without grouping: epoch_order, less the
       trailing partial batch;
    2. that order is cut into megabatches of MEGABATCH x batch_size consecutive examples, each
       sorted by length, longest first (ties keep their shuffled order), and cut into batches:
       examples of similar length share a batch, so little of it is padding;
    3. the batches are shuffled (seeded by seed and epoch), so the lengths do not run from long
       to short through a megabatch.

    Every example of the ungrouped epoch appears exactly once, as there; only the grouping into
    batches and their order differ.
    """
    used = len(lengths) // batch_size * batch_size
    order = epoch_order(len(lengths), seed, epoch)[:used]
    span = MEGABATCH * batch_size
    batches = []
    for start in range(0, used, span):
        mega = sorted(order[start:start + span], key=lambda i: -lengths[i])
        batches += [mega[k:k + batch_size] for k in range(0, len(mega), batch_size)]
    random.Random(f"lorakit group_by_length {seed} {epoch}").shuffle(batches)
    return batches


def padding_share(dataset: Dataset, batch_size: int, seed: int) -> float:
    """The share of padding among the tokens of epoch 0's batches as collate pads them (each batch
    to its longest example): the compute data.padding_free saves."""
    lengths = [len(e.input_ids) for e in dataset.examples]
    batches = epoch_batches(dataset, batch_size, seed, 0)
    padded = sum(len(b) * max(lengths[i] for i in b) for b in batches)
    return 1 - sum(lengths[i] for b in batches for i in b) / padded if padded else 0.0


def split_validation(records: list[Record], fraction: float, seed: int) -> tuple[list[Record], list[Record]]:
    """(train, validation): a seeded random `fraction` of the records held out for validation."""
    if fraction <= 0:
        return records, []
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    k = max(1, round(fraction * len(records)))
    held = set(order[:k])
    return [r for i, r in enumerate(records) if i not in held], [records[i] for i in sorted(held)]


def derive_max_new_tokens(dataset: Dataset, tokenizer) -> int | None:
    """eval.max_new_tokens when not set: the longest reference of the dataset in tokens, + 1 for the
    end-of-turn token that ends the reply, + 1 because a reference tokenised alone may take one token
    fewer than the same text generated after a prompt. None when no example has a reference."""
    references = [e.reference for e in dataset.examples if e.reference is not None]
    if not references:
        return None
    return max(len(tokenizer(r, add_special_tokens=False)["input_ids"]) for r in references) + 2
