"""Preference data: (prompt, chosen, rejected) records, each rendered as two sequences that share the prompt.

A record (data.format: preference, detected from the keys prompt, chosen, rejected), in one of trl's
two layouts:
    standard        {"prompt": str, "chosen": str, "rejected": str}
                    the prompt as written (as the prompt_completion format takes it: the built-in
                    tasks' prompts are already in the chat format), each answer + the eos token
    conversational  {"prompt": [messages], "chosen": [messages], "rejected": [messages]}
                    messages = {"role": str, "content": str}; the prompt rendered by the tokenizer's
                    chat template with the generation prompt, each answer as the template renders
                    the turns after the prompt (its end-of-turn token included)
Optional "answer": the reference for exact match (default: the chosen answer).

A pair becomes prompt + chosen and prompt + rejected; labels are -100 (no loss) on the prompt tokens
and on padding, so the objectives score the answers only. Each sequence is cut at max_length and
keeps its length before the cut and the supervised tokens the cut dropped (as data.Example does),
for the data check (datacheck). collate_pairs stacks a batch of B pairs
as 2B rows, the B chosen sequences first, then the B rejected ones (trl's layout): one forward runs
both. A record that cannot be a preference (a field missing or of the wrong type, an empty answer,
chosen equal to rejected) is an error naming its file and line.

data.build_dataset hands records of format "preference" to build_preference_dataset; this module
takes records as data.Record objects (fields, source) and imports nothing from data.py (data
imports this module: importing data here would be a cycle). So the few lines both need for chat
messages (their shape, the chat template's ids) are written in both.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .config import MAX_LENGTH_AUTO_CAP

IGNORE = -100  # transformers' ignore index, as data.IGNORE: no loss at this position
FIELDS = ("prompt", "chosen", "rejected")


class PreferenceDataError(ValueError):
    """A preference record that cannot be trained on, naming its file and line."""


@dataclass
class Pair:
    """One preference: token ids and labels of prompt + chosen and of prompt + rejected."""

    chosen_ids: list[int]
    chosen_labels: list[int]
    rejected_ids: list[int]
    rejected_labels: list[int]
    prompt: str | None = None      # for generation: the text to continue
    reference: str | None = None   # for exact match: the chosen answer (or the record's "answer")
    source: str = ""
    chosen_length: int = 0         # tokens of prompt + chosen before the cut at max_length (0: not recorded)
    rejected_length: int = 0
    chosen_dropped: int = 0        # supervised tokens of prompt + chosen that the cut removed
    rejected_dropped: int = 0
    chat: bool = False             # rendered by the chat template (records of chat messages)


@dataclass
class PreferenceDataset:
    """Pairs with data.Dataset's counts (check_data and the run's log read them): tokens and
    supervised tokens count both sequences of every pair."""

    examples: list[Pair]
    truncated: int = 0             # pairs with a sequence cut at max_length
    unsupervised: int = 0          # pairs with an answer left without a label token after truncation
    max_length: int | None = None  # where sequences were cut (data.max_length, "auto" resolved)
    format: str = "preference"     # as data.Dataset.format
    tokens: int = field(init=False)
    supervised_tokens: int = field(init=False)

    def __post_init__(self):
        self.tokens = sum(len(p.chosen_ids) + len(p.rejected_ids) for p in self.examples)
        # labels[0] is never predicted (nothing comes before it)
        self.supervised_tokens = sum(_supervised(p.chosen_labels) + _supervised(p.rejected_labels)
                                     for p in self.examples)


def _supervised(labels: list[int]) -> int:
    return sum(label != IGNORE for label in labels[1:])


def is_preference(dataset) -> bool:
    return isinstance(dataset, PreferenceDataset)


def build_preference_dataset(records: list, tokenizer, max_length: int | str = 256) -> PreferenceDataset:
    """The pairs of `records` (data.Record: fields, source), each sequence cut at max_length tokens
    ("auto": the longest sequence, at most config.MAX_LENGTH_AUTO_CAP, as data.auto_max_length)."""
    rendered = [render_pair(record, tokenizer) for record in records]
    if max_length == "auto":
        max_length = min(max(len(p) + max(len(c), len(r)) for p, c, r, *_ in rendered), MAX_LENGTH_AUTO_CAP)
    pairs, truncated, unsupervised = [], 0, 0
    for record, (prompt_ids, chosen, rejected, prompt, reference, chat) in zip(records, rendered):
        sequences, lengths, dropped = [], [], []
        for answer in (chosen, rejected):
            ids, labels = prompt_ids + answer, [IGNORE] * len(prompt_ids) + answer
            sequences += [ids[:max_length], labels[:max_length]]
            lengths.append(len(ids))
            dropped.append(sum(label != IGNORE for label in labels[max_length:]))
        truncated += max(lengths) > max_length
        unsupervised += _supervised(sequences[1]) == 0 or _supervised(sequences[3]) == 0
        pairs.append(Pair(*sequences, prompt=prompt, reference=reference, source=record.source,
                          chosen_length=lengths[0], rejected_length=lengths[1], chosen_dropped=dropped[0],
                          rejected_dropped=dropped[1], chat=chat))
    return PreferenceDataset(pairs, truncated, unsupervised, max_length)


def render_pair(record, tokenizer) -> tuple[list[int], list[int], list[int], str, str, bool]:
    """(prompt ids, chosen ids, rejected ids, prompt text, reference, chat) of one record; the
    answers' ids are the tokens after the prompt; chat: rendered by the chat template."""
    fields, where = record.fields, record.source
    missing = [k for k in FIELDS if k not in fields]
    if missing:
        raise PreferenceDataError(f"{where}: a preference record needs {', '.join(FIELDS)}; it lacks "
                                  f"{', '.join(missing)}")
    prompt, chosen, rejected = (fields[k] for k in FIELDS)
    if all(isinstance(v, str) for v in (prompt, chosen, rejected)):
        out, chat = _render_text(prompt, chosen, rejected, tokenizer, where), False
    elif all(isinstance(v, list) for v in (prompt, chosen, rejected)):
        out, chat = _render_messages(prompt, chosen, rejected, tokenizer, where), True
    else:
        kinds = ", ".join(f"{k}: {type(fields[k]).__name__}" for k in FIELDS)
        raise PreferenceDataError(f"{where}: prompt, chosen and rejected must all be strings or all be lists of "
                                  f"chat messages; got {kinds}")
    if "answer" in fields:
        if not isinstance(fields["answer"], str):
            raise PreferenceDataError(f"{where}: 'answer' must be a string, got {type(fields['answer']).__name__}")
        out = (*out[:4], fields["answer"])
    return (*out, chat)


def _check_answers(chosen_text: str, rejected_text: str, where: str) -> None:
    for name, text in (("chosen", chosen_text), ("rejected", rejected_text)):
        if not text.strip():
            raise PreferenceDataError(f"{where}: {name} is empty; a preference needs two non-empty answers")
    if chosen_text == rejected_text:
        raise PreferenceDataError(f"{where}: chosen and rejected are the same answer ({chosen_text[:60]!r}); "
                                  "a preference needs two different ones")


def _render_text(prompt: str, chosen: str, rejected: str, tokenizer, where: str):
    _check_answers(chosen, rejected, where)
    eos = tokenizer.eos_token or ""

    def answer_ids(text: str) -> list[int]:
        if eos and not text.endswith(eos):
            text += eos  # so the model learns to stop, as prompt_completion does
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    prompt_ids = tokenizer(prompt, add_special_tokens=True)["input_ids"]
    return prompt_ids, answer_ids(chosen), answer_ids(rejected), prompt, chosen


def _render_messages(prompt: list, chosen: list, rejected: list, tokenizer, where: str):
    for name, messages in (("prompt", prompt), ("chosen", chosen), ("rejected", rejected)):
        if not (messages and all(isinstance(m, dict) and isinstance(m.get("role"), str)
                                 and isinstance(m.get("content"), str) for m in messages)):
            raise PreferenceDataError(f"{where}: {name!r} must be a non-empty list of "
                                      "{\"role\": str, \"content\": str} objects")
    for name, messages in (("chosen", chosen), ("rejected", rejected)):
        if messages[-1]["role"] != "assistant":
            raise PreferenceDataError(f"{where}: the last message of {name!r} must be the assistant's, "
                                      f"not {messages[-1]['role']!r}")
    if not getattr(tokenizer, "chat_template", None):
        raise PreferenceDataError(f"{where}: chat-message records need a tokenizer with a chat template; this "
                                  "tokenizer has none (use string prompt, chosen and rejected instead)")
    _check_answers("\n".join(m["content"] for m in chosen), "\n".join(m["content"] for m in rejected), where)

    def ids(messages: list, generation_prompt: bool) -> list[int]:
        return list(tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=generation_prompt,
                                                  return_dict=True)["input_ids"])

    prompt_ids = ids(prompt, True)
    answers = []
    for messages in (chosen, rejected):
        full = ids(prompt + messages, False)
        if full[:len(prompt_ids)] != prompt_ids:
            raise PreferenceDataError(f"{where}: the chat template does not render the prompt as a prefix of the "
                                      "conversation; cannot tell the answer's tokens from the prompt's")
        answers.append(full[len(prompt_ids):])
    text = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    return prompt_ids, answers[0], answers[1], text, chosen[-1]["content"]


def collate_pairs(pairs: list[Pair], pad_id: int) -> dict[str, torch.Tensor]:
    """A right-padded batch of 2B rows: the B chosen sequences, then the B rejected ones
    (input_ids, attention_mask, labels with -100 on prompt and padding)."""
    rows = [(p.chosen_ids, p.chosen_labels) for p in pairs] + [(p.rejected_ids, p.rejected_labels) for p in pairs]
    width = max(len(ids) for ids, _ in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (ids, row_labels) in enumerate(rows):
        input_ids[i, :len(ids)] = torch.tensor(ids)
        labels[i, :len(ids)] = torch.tensor(row_labels)
        mask[i, :len(ids)] = 1
    return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}
