import json
import sys

import pytest
from conftest import char_tokenizer

from lorakit.data import (
    IGNORE,
    DataError,
    Record,
    auto_max_length,
    batch_at,
    build_dataset,
    chat_markers,
    collate,
    derive_max_new_tokens,
    detect_format,
    end_of_turn_ids,
    epoch_order,
    map_columns,
    pack,
    read_data,
    read_records,
    split_validation,
)

tok = char_tokenizer()
EOS = tok.eos_token_id  # 2


def ids(text):
    return tok(text, add_special_tokens=False)["input_ids"]


def write_jsonl(path, rows):
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def test_prompt_completion_masks_the_prompt(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "Q:ab ", "completion": "cd"}])
    (e,) = build_dataset(read_records(path), tok).examples
    assert e.input_ids == ids("Q:ab ") + ids("cd") + [EOS]
    assert e.labels == [IGNORE] * 5 + ids("cd") + [EOS]
    assert (e.prompt, e.reference, e.source) == ("Q:ab ", "cd", f"{path}:1")
    (e,) = build_dataset(read_records(path), tok, train_on_inputs=True).examples
    assert e.labels == e.input_ids


def test_completion_already_ending_in_eos_gets_no_second_one():
    r = Record({"prompt": "p", "completion": "x<|im_end|>", "answer": "x"}, "mem:1")
    (e,) = build_dataset([r], tok).examples
    assert e.input_ids == ids("p") + ids("x") + [EOS] and e.reference == "x"


def test_alpaca_with_and_without_input():
    rows = [Record({"instruction": "Add", "input": "1 2", "output": "3"}, "a:1"),
            Record({"instruction": "Hi", "output": "yo"}, "a:2")]
    with_input, without = build_dataset(rows, tok).examples
    prompt = ("Below is an instruction that describes a task, paired with an input that provides further "
              "context. Write a response that appropriately completes the request.\n\n"
              "### Instruction:\nAdd\n\n### Input:\n1 2\n\n### Response:\n")
    assert with_input.prompt == prompt
    assert with_input.input_ids == ids(prompt) + ids("3") + [EOS]
    assert with_input.labels == [IGNORE] * len(prompt) + ids("3") + [EOS]
    assert without.prompt.endswith("### Instruction:\nHi\n\n### Response:\n") and "Input" not in without.prompt


def test_chat_masks_all_but_assistant_turns_including_end_of_turn():
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"},
            {"role": "user", "content": "ok"}, {"role": "assistant", "content": "k"}]
    (e,) = build_dataset([Record({"messages": msgs}, "c:1")], tok).examples
    text = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in msgs)
    assert tok.decode(e.input_ids) == text
    learned = [t for t, label in zip(e.input_ids, e.labels) if label != IGNORE]
    # each assistant reply, its end-of-turn token and the newline the template puts after it
    assert learned == ids("yo") + [EOS] + ids("\n") + ids("k") + [EOS] + ids("\n")
    assert e.reference == "k" and e.prompt.endswith("<|im_start|>assistant\n")


def test_text_format_learns_every_token():
    (e,) = build_dataset([Record({"text": "abc"}, "t:1")], tok).examples
    assert e.input_ids == ids("abc") + [EOS] and e.labels == e.input_ids and e.reference is None


def test_truncation_is_counted():
    rows = [Record({"prompt": "p" * 6, "completion": "c" * 6}, f"x:{i}") for i in range(3)]
    rows.append(Record({"prompt": "p", "completion": "c"}, "x:4"))
    ds = build_dataset(rows, tok, max_length=5)
    assert ds.truncated == 3 and ds.unsupervised == 3  # the cut left only prompt tokens
    assert [len(e.input_ids) for e in ds.examples] == [5, 5, 5, 3]
    assert ds.tokens == 18


def test_packing_puts_whole_examples_into_rows():
    rows = [Record({"text": "a" * n}, f"x:{n}") for n in (3, 5, 6)]  # 4 + 6 + 7 = 17 tokens
    packed = pack(build_dataset(rows, tok), max_length=10)
    # best fit, longest first: 7 alone (3 left), then 6 and 4 share a row; no example is split
    assert [e.lengths for e in packed.examples] == [[7], [4, 6]]
    assert [len(e.input_ids) for e in packed.examples] == [7, 10]
    assert [e.source for e in packed.examples] == ["packed: x:6", "packed: x:3, x:5"]
    flat = [t for e in packed.examples for t in e.input_ids]
    assert flat == ids("aaaaaa") + [EOS] + ids("aaa") + [EOS] + ids("aaaaa") + [EOS]
    # each example's first label is not predicted, as unpacked: 16 + ... = the unpacked count
    assert packed.examples[1].labels == [IGNORE] + ids("aa") + [EOS] + [IGNORE] + ids("aaaa") + [EOS]
    assert packed.supervised_tokens == build_dataset(rows, tok).supervised_tokens == 14
    batch = collate(packed.examples, pad_id=0)
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 4, 5, 6, 0, 1, 2], [0, 1, 2, 3, 0, 1, 2, 3, 4, 5]]
    assert batch["attention_mask"].tolist() == [[1] * 7 + [0] * 3, [1] * 10]
    assert "position_ids" not in collate(build_dataset(rows, tok).examples, pad_id=0)  # unpacked: as before


def test_collate_pads_right_with_ignored_labels():
    rows = [Record({"prompt": "ab", "completion": "c"}, "x:1"), Record({"text": "a"}, "x:2")]
    a, b = build_dataset([rows[0]], tok).examples + build_dataset([rows[1]], tok).examples
    batch = collate([a, b], pad_id=0)
    assert batch["input_ids"].tolist() == [a.input_ids, b.input_ids + [0, 0]]
    assert batch["labels"].tolist() == [[IGNORE, IGNORE, *ids("c"), EOS], [*ids("a"), EOS, IGNORE, IGNORE]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 0, 0]]


def test_batches_are_a_pure_function_of_step():
    rows = [Record({"text": str(i)}, f"x:{i}") for i in range(10)]
    ds = build_dataset(rows, tok)
    first_epoch = [e.source for s in range(3) for e in batch_at(ds, s, 3, seed=7)]
    order = epoch_order(10, 7, 0)
    assert first_epoch == [f"x:{i}" for i in order[:9]]  # the 10th example is dropped this epoch
    assert [e.source for e in batch_at(ds, 3, 3, seed=7)] == [f"x:{i}" for i in epoch_order(10, 7, 1)[:3]]
    assert epoch_order(10, 7, 1) != order
    with pytest.raises(DataError, match="fewer than one batch of 11"):
        batch_at(ds, 0, 11, seed=0)


def test_validation_split_is_seeded_and_disjoint():
    rows = [Record({"text": str(i)}, f"x:{i}") for i in range(100)]
    train, val = split_validation(rows, 0.1, seed=3)
    assert len(val) == 10 and len(train) == 90
    assert {r.source for r in train}.isdisjoint(r.source for r in val)
    assert [r.source for r in split_validation(rows, 0.1, seed=3)[1]] == [r.source for r in val]


def test_file_formats_and_errors_name_file_and_line(tmp_path):
    (tmp_path / "d.json").write_text(json.dumps([{"text": "a"}, {"text": "b"}]))
    assert [r.source for r in read_records(tmp_path / "d.json")] == [f"{tmp_path / 'd.json'}[{i}]" for i in (0, 1)]
    (tmp_path / "d.csv").write_text("prompt,completion\nhi,yo\n")
    (r,) = read_records(tmp_path / "d.csv")
    assert r.fields == {"prompt": "hi", "completion": "yo"} and r.source.endswith("d.csv:2")

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "a"}\n{"text": "b"\n')
    with pytest.raises(DataError, match=rf"{bad}:2: not valid JSON"):
        read_records(bad)
    bad.write_text('{"prompt": "a", "completion": "b"}\n\n{"prompt": "a"}\n')
    with pytest.raises(DataError, match=rf"{bad}:3: format prompt_completion needs key\(s\) completion"):
        detect_format(read_records(bad))
    bad.write_text('{"question": "a"}\n')
    with pytest.raises(DataError, match="cannot tell the format from keys \\['question'\\]; prompt_completion"):
        detect_format(read_records(bad))
    bad.write_text('{"prompt": "a", "completion": 3}\n')
    with pytest.raises(DataError, match=rf"{bad}:1: 'completion' must be a string, got int"):
        build_dataset(read_records(bad), tok)
    bad.write_text('{"prompt": "a", "completion": "b", "answer": 7}\n')  # scored by exact match
    with pytest.raises(DataError, match=rf"{bad}:1: 'answer' must be a string, got int"):
        build_dataset(read_records(bad), tok)
    bad.write_text('{"messages": [{"role": "user", "content": "x"}]}\n')
    with pytest.raises(DataError, match="the last message must be the assistant's"):
        build_dataset(read_records(bad), tok)
    with pytest.raises(DataError, match="unknown data file type '.txt'"):
        (tmp_path / "x.txt").write_text("a")
        read_records(tmp_path / "x.txt")
    with pytest.raises(DataError, match="no such data file"):
        read_records(tmp_path / "missing.jsonl")


@pytest.mark.parametrize("name, content", [("d.jsonl", ""), ("d.jsonl", "\n \n"), ("d.json", ""), ("d.json", "[]"),
                                           ("d.csv", "prompt,completion\n")])
def test_a_data_file_without_records_is_an_error(tmp_path, name, content):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(DataError, match=f"^{path}: holds no records \\(the file is empty or blank\\)"):
        read_records(path)


@pytest.mark.parametrize("name", ["d.jsonl", "d.csv"])
def test_non_utf8_data_names_file_and_line(tmp_path, name):
    path = tmp_path / name
    path.write_bytes(b"prompt,completion\n" + b'{"prompt": "caf\xe9"}\n')
    with pytest.raises(DataError, match=f"^{path}:2: not UTF-8 text \\(byte 0xe9 at offset 33\\)"):
        read_records(path)


def test_supervised_tokens_count_the_predicted_labels(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "Q:ab ", "completion": "cd"}, {"text": "xy"}])
    dataset = build_dataset(read_records(path)[:1], tok)
    assert dataset.supervised_tokens == 3  # "c", "d", EOS
    assert build_dataset(read_records(path)[:1], tok, max_length=5).supervised_tokens == 0


# --- formats and files: ShareGPT, column mapping, Parquet, Hugging Face datasets ---------------------

CHAT = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "yo"}]


def test_sharegpt_renders_as_the_same_chat_with_roles_mapped():
    conversations = [{"from": "system", "value": "be brief"}, {"from": "human", "value": "hi"},
                     {"from": "gpt", "value": "yo"}]
    (e,) = build_dataset([Record({"conversations": conversations}, "s:1")], tok).examples
    (chat,) = build_dataset([Record({"messages": CHAT}, "c:1")], tok).examples
    prompt = "<|im_start|>system\nbe brief<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert e.input_ids == chat.input_ids == tok(prompt)["input_ids"] + ids("yo") + [EOS] + ids("\n")
    assert e.labels == chat.labels == [IGNORE] * len(tok(prompt)["input_ids"]) + ids("yo") + [EOS] + ids("\n")
    assert (e.prompt, e.reference) == (prompt, "yo")
    assert detect_format([Record({"conversations": conversations}, "s:1")]) == "sharegpt"
    bad = Record({"conversations": [{"from": "narrator", "value": "x"}]}, "s:2")
    with pytest.raises(DataError, match="s:2: unknown speaker\\(s\\) 'narrator' in 'from'; known: system, human"):
        build_dataset([bad], tok)
    with pytest.raises(DataError, match="s:3: 'conversations' must be a non-empty list"):
        build_dataset([Record({"conversations": [{"from": "human"}]}, "s:3")], tok)


def test_columns_rename_a_files_fields_to_the_formats_keys(tmp_path):
    path = write_jsonl(tmp_path / "qa.jsonl", [{"question": "Q:ab ", "answer": "cd", "id": 7}])
    (r,) = map_columns(read_records(path), {"prompt": "question", "completion": "answer"})
    assert r.fields == {"prompt": "Q:ab ", "completion": "cd", "id": 7} and r.source == f"{path}:1"
    (e,) = build_dataset([r], tok).examples
    assert e.input_ids == ids("Q:ab ") + ids("cd") + [EOS] and e.labels == [IGNORE] * 5 + ids("cd") + [EOS]
    assert e.reference == "cd"  # the file's "answer" is the completion now, not a separate reference
    assert map_columns(read_records(path), None)[0].fields == {"question": "Q:ab ", "answer": "cd", "id": 7}
    with pytest.raises(DataError, match=rf"{path}:1: data.columns maps to field\(s\) 'q', which this record lacks; "
                                        "its fields: answer, id, question"):
        map_columns(read_records(path), {"prompt": "q", "completion": "answer"})


def test_parquet_files_give_the_same_examples(tmp_path):
    pq = pytest.importorskip("pyarrow.parquet")
    import pyarrow as pa

    rows = [{"prompt": "Q:ab ", "completion": "cd"}, {"prompt": "x", "completion": "y"}]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "d.parquet")
    records = read_records(tmp_path / "d.parquet")
    assert [r.fields for r in records] == rows
    assert [r.source for r in records] == [f"{tmp_path / 'd.parquet'}[{i}]" for i in (0, 1)]
    first, second = build_dataset(records, tok).examples
    assert first.input_ids == ids("Q:ab ") + ids("cd") + [EOS] and first.labels == [IGNORE] * 5 + ids("cd") + [EOS]
    assert second.input_ids == ids("x") + ids("y") + [EOS]
    pq.write_table(pa.Table.from_pylist([], schema=pa.schema([("text", pa.string())])), tmp_path / "e.parquet")
    with pytest.raises(DataError, match="e.parquet: holds no records"):
        read_records(tmp_path / "e.parquet")
    (tmp_path / "bad.parquet").write_text("not parquet")
    with pytest.raises(DataError, match="bad.parquet: not a readable parquet file"):
        read_records(tmp_path / "bad.parquet")


def test_parquet_without_pyarrow_says_so(tmp_path, monkeypatch):
    (tmp_path / "d.parquet").write_bytes(b"PAR1")
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    with pytest.raises(DataError, match="reading .parquet files needs pyarrow, which is not installed"):
        read_records(tmp_path / "d.parquet")


def test_hugging_face_datasets_saved_to_disk(tmp_path):
    datasets = pytest.importorskip("datasets")
    rows = [{"prompt": "Q:ab ", "completion": "cd"}, {"prompt": "x", "completion": "y"}]
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows),
                          "test": datasets.Dataset.from_list(rows[1:])}).save_to_disk(tmp_path / "dd")
    datasets.Dataset.from_list(rows).save_to_disk(tmp_path / "one")
    spec = f"hf:{tmp_path / 'dd'}"
    train = read_data(spec)
    assert [r.fields for r in train] == rows and train[1].source == f"{spec}[train 1]"
    assert [r.fields for r in read_data(spec, "test")] == rows[1:]
    assert [r.fields for r in read_data(spec + ":test")] == rows[1:]
    assert [r.fields for r in read_data(f"hf:{tmp_path / 'one'}", "test")] == rows  # one split: that one
    (first, _) = build_dataset(train, tok).examples
    assert first.input_ids == ids("Q:ab ") + ids("cd") + [EOS] and first.labels == [IGNORE] * 5 + ids("cd") + [EOS]
    with pytest.raises(DataError, match=f"{spec}: no split 'validation'; this dataset's splits: train, test"):
        read_data(spec, "validation")


def test_hugging_face_datasets_are_read_locally_only():
    pytest.importorskip("datasets")
    with pytest.raises(DataError, match="hf:nobody/no-such-dataset: 'nobody/no-such-dataset' is neither a directory "
                                        "written by save_to_disk nor a dataset in the local Hugging Face cache"):
        read_data("hf:nobody/no-such-dataset")


# --- lengths: max_length auto, eval.max_new_tokens from the references, end-of-turn tokens --------------

def test_max_length_auto_is_the_longest_example_up_to_the_cap():
    rows = [Record({"prompt": "p" * n, "completion": "c" * n}, f"x:{n}") for n in (1, 4, 9)]  # 3, 9, 19 tokens
    ds = build_dataset(rows, tok, max_length="auto")
    assert ds.max_length == 19 and ds.truncated == 0
    assert [e.full_length for e in ds.examples] == [3, 9, 19]
    assert auto_max_length([3, 9, 19]) == 19 and auto_max_length([3, 5000]) == 2048
    cut = build_dataset(rows, tok, max_length=8)
    assert cut.max_length == 8 and cut.truncated == 2
    assert [e.dropped for e in cut.examples] == [0, 1, 10]  # supervised tokens at positions 8 and later
    assert [e.full_length for e in cut.examples] == [3, 9, 19]


def test_max_new_tokens_is_the_longest_reference_plus_two():
    rows = [Record({"prompt": "p", "completion": "c" * n + "<|im_end|>", "answer": "c" * n}, f"x:{n}")
            for n in (3, 10, 7)]
    assert derive_max_new_tokens(build_dataset(rows, tok), tok) == 12
    assert derive_max_new_tokens(build_dataset([Record({"text": "abc"}, "t:1")], tok), tok) is None


def test_end_of_turn_ids_add_the_templates_own_end_of_turn_token():
    assert end_of_turn_ids(tok) == [EOS]  # ChatML ends a turn with <|im_end|>, the EOS itself
    llama3 = char_tokenizer()
    llama3.add_special_tokens({"additional_special_tokens": ["<|eot_id|>"]})
    llama3.chat_template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|eot_id|>"
                            "{% endfor %}")
    eot = llama3.convert_tokens_to_ids("<|eot_id|>")
    assert end_of_turn_ids(llama3) == [EOS, eot] and chat_markers(llama3)["after_reply"] == [eot]
    llama3.chat_template = None
    assert end_of_turn_ids(llama3) == [EOS] and chat_markers(llama3) == {}
