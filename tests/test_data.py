"""hift_ext.data: loading tsv/csv/jsonl, label maps, clear errors with line numbers, batching."""
import json
import os

import pytest

from hift_ext.data import (
    DataError,
    TokenizedDataset,
    build_label_map,
    encode_labels,
    epoch_permutation,
    load_examples,
    shipped_sst2,
)


def write(tmp_path, name, text):
    p = tmp_path / name
    p.write_text(text, encoding="utf-8")
    return str(p)


def test_tsv(tmp_path):
    p = write(tmp_path, "a.tsv", "a fine film\t1\n\nawful , just awful\t0\n")
    ex = load_examples(p)
    assert ex.texts == ["a fine film", "awful , just awful"]
    assert ex.labels == ["1", "0"]
    assert ex.lines == [1, 3]


def test_tsv_header_and_max_examples(tmp_path):
    p = write(tmp_path, "a.tsv", "sentence\tlabel\nx\t1\ny\t0\nz\t1\n")
    ex = load_examples(p, max_examples=2)
    assert ex.texts == ["x", "y"] and ex.lines == [2, 3]


def test_tsv_text_may_contain_tabs_label_is_last_column(tmp_path):
    ex = load_examples(write(tmp_path, "a.tsv", "left\tright\t1\n"))
    assert ex.texts == ["left\tright"] and ex.labels == ["1"]


@pytest.mark.parametrize(
    "content,line,words",
    [
        ("good\t1\nno tab here\n", 2, "no tab"),
        ("good\t1\nbad\t\n", 2, "empty label"),
        ("good\t1\n\t0\n", 2, "empty sentence"),
    ],
)
def test_tsv_malformed_names_the_line(tmp_path, content, line, words):
    p = write(tmp_path, "bad.tsv", content)
    with pytest.raises(DataError) as e:
        load_examples(p)
    msg = str(e.value)
    assert f"line {line}" in msg and words in msg and "bad.tsv" in msg


def test_csv(tmp_path):
    p = write(tmp_path, "a.csv", 'label,text\n1,"hello, world"\n0,bye\n')
    ex = load_examples(p)
    assert ex.texts == ["hello, world", "bye"] and ex.labels == ["1", "0"] and ex.lines == [2, 3]


def test_csv_sentence_column_and_errors(tmp_path):
    ex = load_examples(write(tmp_path, "a.csv", "sentence,label\nok,1\n"))
    assert ex.texts == ["ok"]
    with pytest.raises(DataError, match="line 1.*'text'"):
        load_examples(write(tmp_path, "b.csv", "foo,bar\n1,2\n"))
    with pytest.raises(DataError, match="line 3: expected 2 columns"):
        load_examples(write(tmp_path, "c.csv", "text,label\nok,1\nextra,1,2\n"))


def test_jsonl(tmp_path):
    rows = [{"text": "good", "label": 1}, {"sentence": "bad", "label": "0"}, {"text": "meh", "label": 1.0}]
    p = write(tmp_path, "a.jsonl", "\n".join(json.dumps(r) for r in rows) + "\n")
    ex = load_examples(p)
    assert ex.texts == ["good", "bad", "meh"] and ex.labels == ["1", "0", "1"]


@pytest.mark.parametrize(
    "line2,words",
    [
        ("{not json", "invalid JSON"),
        ('["text", 1]', "JSON object"),
        ('{"text": "x"}', "'label'"),
        ('{"text": "", "label": 1}', "non-empty"),
        ('{"text": "x", "label": [1]}', "integer or a string"),
        ('{"text": "x", "label": 0.5}', "integer or a string"),
    ],
)
def test_jsonl_malformed_names_the_line(tmp_path, line2, words):
    p = write(tmp_path, "bad.jsonl", '{"text": "ok", "label": 0}\n' + line2 + "\n")
    with pytest.raises(DataError) as e:
        load_examples(p)
    assert "line 2" in str(e.value) and words in str(e.value)


def test_missing_empty_unknown_format(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        load_examples(str(tmp_path / "nope.tsv"))
    with pytest.raises(DataError, match="no examples"):
        load_examples(write(tmp_path, "empty.tsv", "\n\n"))
    with pytest.raises(DataError, match="unknown data format"):
        load_examples(write(tmp_path, "a.parquet", "x"))
    with pytest.raises(DataError, match="directory"):
        load_examples(str(tmp_path))
    p = tmp_path / "latin1.tsv"
    p.write_bytes("caf\xe9\t1\n".encode("latin-1"))
    with pytest.raises(DataError, match="UTF-8"):
        load_examples(str(p))


def test_label_maps(tmp_path):
    assert build_label_map(["0", "1", "1"]) == {"0": 0, "1": 1}
    assert build_label_map(["2", "0"]) == {"0": 0, "1": 1, "2": 2}
    assert build_label_map(["1"], num_labels=2) == {"0": 0, "1": 1}
    assert build_label_map(["pos", "neg", "pos"]) == {"neg": 0, "pos": 1}
    assert build_label_map(["pos"], label2id={"negative": 0, "pos": 1}) == {"negative": 0, "pos": 1}


def test_unknown_label_names_the_line_and_the_known_labels(tmp_path):
    p = write(tmp_path, "dev.tsv", "a\t1\nb\t0\nc\t7\n")
    ex = load_examples(p)
    with pytest.raises(DataError) as e:
        encode_labels(ex, build_label_map(["0", "1"]))
    msg = str(e.value)
    assert "line 3" in msg and "'7'" in msg and "0, 1" in msg
    p = write(tmp_path, "s.tsv", "a\tpos\nb\tneutral\n")
    with pytest.raises(DataError, match="line 2: unknown label 'neutral'"):
        encode_labels(load_examples(p), {"neg": 0, "pos": 1})


def test_shipped_sst2():
    tr, dev = shipped_sst2("train"), shipped_sst2("dev")
    assert os.path.isfile(tr) and os.path.isfile(dev)
    ex = load_examples(dev)
    assert len(ex) == 872 and set(ex.labels) == {"0", "1"}
    with pytest.raises(ValueError):
        shipped_sst2("test")


def test_epoch_permutation_is_a_pure_function():
    a = epoch_permutation(50, seed=3, epoch=1)
    assert a == epoch_permutation(50, seed=3, epoch=1)
    assert sorted(a) == list(range(50))
    assert a != epoch_permutation(50, seed=3, epoch=2)
    assert a != epoch_permutation(50, seed=4, epoch=1)


class _ToyTokenizer:
    pad_token_id = 0
    eos_token_id = None

    def __call__(self, texts, truncation, max_length, padding):
        ids = [[5 + len(w) for w in t.split()][:max_length] for t in texts]
        return {"input_ids": ids}


def test_tokenized_dataset_pads_per_batch():
    ds = TokenizedDataset(_ToyTokenizer(), ["a bb", "ccc", "d e f g h"], [1, 0, 1], max_length=4)
    b = ds.collate([0, 1])
    assert b["input_ids"].tolist() == [[6, 7], [8, 0]]
    assert b["attention_mask"].tolist() == [[1, 1], [1, 0]]
    assert b["labels"].tolist() == [1, 0]
    assert ds.collate([2])["input_ids"].shape == (1, 4)  # truncated to max_length
    assert ds.batches([2, 0, 1], 2) == [[2, 0], [1]]


@pytest.mark.parametrize("name,content", [
    ("bom.tsv", "a fine film\t1\nawful\t0\n"),
    ("bom.csv", "text,label\na fine film,1\nawful,0\n"),
    ("bom.jsonl", '{"text": "a fine film", "label": 1}\n{"text": "awful", "label": 0}\n'),
])
def test_utf8_byte_order_mark_is_not_data(tmp_path, name, content):
    """Excel and Notepad start UTF-8 files with a BOM: it must not become part of the first field."""
    p = tmp_path / name
    p.write_bytes(b"\xef\xbb\xbf" + content.encode("utf-8"))
    ex = load_examples(str(p))
    assert ex.texts == ["a fine film", "awful"] and ex.labels == ["1", "0"]


def test_unknown_label_message_says_where_the_labels_come_from(tmp_path):
    p = write(tmp_path, "dev.tsv", "a\t1\nb\tmaybe\n")
    with pytest.raises(DataError, match=r"line 2: unknown label 'maybe' \(the training labels: 0, 1\)"):
        encode_labels(load_examples(p), build_label_map(["0", "1"]), known="the training labels")
