"""Preference records: two sequences per pair with the prompt masked, trl's two layouts, auto-detection,
the batch layout (chosen rows first), and an error naming file and line for every bad record."""

import json

import pytest
from conftest import char_tokenizer

from lorakit.data import DataError, build_dataset, detect_format, read_records
from lorakit.preference_data import IGNORE, Pair, PreferenceDataError, PreferenceDataset, collate_pairs

tok = char_tokenizer()
EOS = tok.eos_token_id  # 2


def ids(text):
    return tok(text, add_special_tokens=False)["input_ids"]


def write_jsonl(path, rows):
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def test_string_records_mask_the_prompt_and_end_each_answer_with_eos(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "Q:ab=", "chosen": "ba", "rejected": "abc"}])
    data = build_dataset(read_records(path), tok)  # format auto: detected from prompt, chosen, rejected
    assert isinstance(data, PreferenceDataset)
    (pair,) = data.examples
    assert pair.chosen_ids == ids("Q:ab=ba") + [EOS]
    assert pair.chosen_labels == [IGNORE] * 5 + ids("ba") + [EOS]
    assert pair.rejected_ids == ids("Q:ab=abc") + [EOS]
    assert pair.rejected_labels == [IGNORE] * 5 + ids("abc") + [EOS]
    assert (pair.prompt, pair.reference, pair.source) == ("Q:ab=", "ba", f"{path}:1")
    # both sequences count: 8 + 9 tokens; 3 + 4 supervised (the answers and their eos)
    assert (data.tokens, data.supervised_tokens, data.truncated, data.unsupervised) == (17, 7, 0, 0)
    assert detect_format(read_records(path)) == "preference"
    assert isinstance(build_dataset(read_records(path), tok, "preference"), PreferenceDataset)


def test_an_answer_that_ends_with_eos_gets_no_second_one():
    from lorakit.data import Record

    (pair,) = build_dataset([Record({"prompt": "x", "chosen": "a<|im_end|>", "rejected": "b"}, "m:1")], tok).examples
    assert pair.chosen_ids == ids("xa") + [EOS] and pair.rejected_ids == ids("xb") + [EOS]


def test_chat_message_records_render_the_prompt_with_the_chat_template(tmp_path):
    prompt = [{"role": "system", "content": "S"}, {"role": "user", "content": "hi"}]
    row = {"prompt": prompt, "chosen": [{"role": "assistant", "content": "yes"}],
           "rejected": [{"role": "assistant", "content": "no"}]}
    path = write_jsonl(tmp_path / "c.jsonl", [row])
    (pair,) = build_dataset(read_records(path), tok).examples
    prompt_text = "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    prompt_ids = tok(prompt_text, add_special_tokens=False)["input_ids"]
    # the answer as the template renders the assistant turn: its end-of-turn token and newline included
    assert pair.chosen_ids == prompt_ids + ids("yes") + [EOS] + ids("\n")
    assert pair.chosen_labels == [IGNORE] * len(prompt_ids) + ids("yes") + [EOS] + ids("\n")
    assert pair.rejected_ids == prompt_ids + ids("no") + [EOS] + ids("\n")
    assert (pair.prompt, pair.reference) == (prompt_text, "yes")


def test_answer_key_is_the_exact_match_reference():
    from lorakit.data import Record

    (pair,) = build_dataset([Record({"prompt": "q", "chosen": "A!", "rejected": "B", "answer": "A"}, "m:1")],
                            tok).examples
    assert pair.reference == "A"


def test_truncation_cuts_each_sequence_and_counts_pairs_left_without_an_answer():
    from lorakit.data import Record

    rows = [Record({"prompt": "abcdef", "chosen": "x", "rejected": "yz"}, "m:1"),
            Record({"prompt": "ab", "chosen": "x", "rejected": "y"}, "m:2")]
    data = build_dataset(rows, tok, max_length=6)
    first, second = data.examples
    assert first.chosen_ids == ids("abcdef") and first.chosen_labels == [IGNORE] * 6
    assert second.chosen_ids == ids("abx") + [EOS]
    assert (data.truncated, data.unsupervised) == (1, 1)
    assert build_dataset(rows, tok, max_length="auto").truncated == 0  # auto: the longest sequence (9)


def test_collate_pairs_puts_the_chosen_rows_first_and_pads_right():
    a = Pair([5, 6, 7], [IGNORE, 6, 7], [5, 8], [IGNORE, 8])
    b = Pair([9, 10], [IGNORE, 10], [9, 11, 12, 13], [IGNORE, 11, 12, 13])
    batch = collate_pairs([a, b], pad_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 0], [9, 10, 0, 0], [5, 8, 0, 0], [9, 11, 12, 13]]
    assert batch["labels"].tolist() == [[IGNORE, 6, 7, IGNORE], [IGNORE, 10, IGNORE, IGNORE],
                                        [IGNORE, 8, IGNORE, IGNORE], [IGNORE, 11, 12, 13]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 0, 0], [1, 1, 1, 1]]


GOOD = {"prompt": "q", "chosen": "a", "rejected": "b"}
USER = [{"role": "user", "content": "q"}]
BAD_RECORDS = [
    ({"prompt": "q", "chosen": "", "rejected": "b"}, "chosen is empty; a preference needs two non-empty answers"),
    ({"prompt": "q", "chosen": "  ", "rejected": "b"}, "chosen is empty"),
    ({"prompt": "q", "chosen": "a", "rejected": ""}, "rejected is empty"),
    ({"prompt": "q", "chosen": "same", "rejected": "same"},
     "chosen and rejected are the same answer ('same'); a preference needs two different ones"),
    ({"prompt": "q", "chosen": 3, "rejected": "b"},
     "prompt, chosen and rejected must all be strings or all be lists of chat messages; got prompt: str, "
     "chosen: int, rejected: str"),
    ({"prompt": USER, "chosen": "a", "rejected": "b"}, "must all be strings or all be lists of chat messages"),
    ({"prompt": USER, "chosen": [{"role": "assistant"}], "rejected": [{"role": "assistant", "content": "b"}]},
     "'chosen' must be a non-empty list of {\"role\": str, \"content\": str} objects"),
    ({"prompt": [], "chosen": [{"role": "assistant", "content": "a"}],
      "rejected": [{"role": "assistant", "content": "b"}]}, "'prompt' must be a non-empty list"),
    ({"prompt": USER, "chosen": [{"role": "user", "content": "a"}],
      "rejected": [{"role": "assistant", "content": "b"}]},
     "the last message of 'chosen' must be the assistant's, not 'user'"),
    ({"prompt": USER, "chosen": [{"role": "assistant", "content": "a"}],
      "rejected": [{"role": "assistant", "content": "a"}]}, "chosen and rejected are the same answer"),
    ({"prompt": USER, "chosen": [{"role": "assistant", "content": ""}],
      "rejected": [{"role": "assistant", "content": "b"}]}, "chosen is empty"),
    ({**GOOD, "answer": 5}, "'answer' must be a string, got int"),
]


@pytest.mark.parametrize("row,message", BAD_RECORDS)
def test_every_bad_record_is_an_error_naming_its_file_and_line(tmp_path, row, message):
    path = write_jsonl(tmp_path / "bad.jsonl", [GOOD, row])
    with pytest.raises(PreferenceDataError) as e:
        build_dataset(read_records(path), tok, "preference")
    assert str(e.value).startswith(f"{path}:2: ") and message in str(e.value)
    assert isinstance(e.value, ValueError)


def test_a_missing_field_is_an_error_naming_its_file_and_line(tmp_path):
    path = write_jsonl(tmp_path / "bad.jsonl", [GOOD, {"prompt": "q", "chosen": "a"}])
    with pytest.raises(DataError, match=f"{path}:2: format preference needs key\\(s\\) rejected; "
                                        "this record has chosen, prompt"):
        build_dataset(read_records(path), tok)
    from lorakit.data import Record
    from lorakit.preference_data import render_pair

    with pytest.raises(PreferenceDataError, match="m:7: a preference record needs prompt, chosen, rejected; it "
                                                  "lacks chosen, rejected"):
        render_pair(Record({"prompt": "q"}, "m:7"), tok)


def test_chat_records_need_a_chat_template(tmp_path):
    plain = char_tokenizer()
    plain.chat_template = None
    row = {"prompt": USER, "chosen": [{"role": "assistant", "content": "a"}],
           "rejected": [{"role": "assistant", "content": "b"}]}
    path = write_jsonl(tmp_path / "c.jsonl", [row])
    with pytest.raises(PreferenceDataError, match=f"{path}:1: chat-message records need a tokenizer with a chat "
                                                  "template"):
        build_dataset(read_records(path), plain)


def test_the_builtin_stardate_pairs_task_pairs_each_right_answer_with_a_plausible_wrong_one():
    import random

    from lorakit.config import RunConfig
    from lorakit.data import read_data
    from lorakit.tasks import END_OF_TURN, make_task, wrong_stardate

    pairs, sft = make_task("stardate_pairs", n_train=300, n_test=50), make_task("stardate", n_train=300, n_test=50)
    for split in ("train", "test"):  # the same questions and right answers as the SFT task: the same held-out dates
        assert [(r["prompt"], r["chosen"], r["answer"]) for r in getattr(pairs, split)] == \
               [(r["prompt"], r["completion"], r["answer"]) for r in getattr(sft, split)]
    assert all(r["rejected"] != r["chosen"] and r["rejected"].endswith(END_OF_TURN) for r in pairs.train + pairs.test)
    assert pairs.test == make_task("stardate_pairs", n_train=10, n_test=50).test  # the test split depends on n_test only
    # each mistake of the rule, for 2024-07-09 (right: 09.VII.2024), and the ones equal to the right answer skipped
    seen = {wrong_stardate("2024-07-09", random.Random(i)) for i in range(200)}
    assert seen == {"09.7.2024", "09.VIII.2024", "09.VI.2024", "2024.VII.09", "9.VII.2024", "07.IX.2024"}
    assert "19.VII.2024" not in {wrong_stardate("2024-07-19", random.Random(i)) for i in range(200)}
    assert wrong_stardate("2024-01-25", random.Random(0)) != "25.I.2024"
    data = build_dataset(read_data("builtin:stardate_pairs", "test", 10, 4), tok)
    assert isinstance(data, PreferenceDataset) and len(data.examples) == 4
    assert data.examples[0].reference == pairs.test[0]["answer"]
    assert RunConfig.from_dict({"objective": "dpo", "data": {"train": "builtin:stardate_pairs"}}).problems() == []
