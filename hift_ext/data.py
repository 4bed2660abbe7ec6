"""Text-classification data for ``hift-ext finetune``: loading, label maps, batching.

Formats (chosen by the file's extension):

* ``.tsv`` / ``.txt``: ``sentence<TAB>label``, one example a line (the shipped SST-2 format). A
  first line whose label column reads ``label`` is a header and is skipped.
* ``.csv``: a header row with ``text`` (or ``sentence``) and ``label`` columns.
* ``.jsonl`` / ``.json``: one JSON object a line with ``text`` (or ``sentence``) and ``label``.

Every problem is a :class:`DataError` naming the file and the line, so the CLI can print it and exit
with code 2 instead of a traceback. Labels are integers ``0..N-1`` or strings (mapped in sorted
order: see :func:`build_label_map`).

The SST-2 split shipped inside the package is found with :func:`shipped_sst2`.
"""
from __future__ import annotations

import contextlib
import csv
import json
import os
from dataclasses import dataclass
from importlib import resources
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import torch

__all__ = [
    "DataError",
    "Examples",
    "load_examples",
    "build_label_map",
    "encode_labels",
    "shipped_sst2",
    "TokenizedDataset",
    "epoch_permutation",
]

TEXT_KEYS = ("text", "sentence")
LABEL_KEYS = ("label",)


class DataError(ValueError):
    """A data file is missing, malformed or has labels the model cannot take."""


@dataclass
class Examples:
    path: str
    texts: List[str]
    labels: List[str]  # raw label strings; see encode_labels
    lines: List[int]  # 1-based line number of each example, for error messages

    def __len__(self) -> int:
        return len(self.texts)

    def head(self, n: Optional[int]) -> "Examples":
        if n is None or n >= len(self):
            return self
        return Examples(self.path, self.texts[:n], self.labels[:n], self.lines[:n])


def shipped_sst2(split: str) -> str:
    """Path of the SST-2 ``train`` or ``dev`` split shipped in ``hift_ext/data/sst2``."""
    if split not in ("train", "dev"):
        raise ValueError(f"SST-2 split must be 'train' or 'dev', got {split!r}")
    ref = resources.files("hift_ext").joinpath("data", "sst2", f"{split}.tsv")
    path = str(ref)
    if not os.path.isfile(path):  # e.g. a zipped install: copy out once
        raise DataError(f"the shipped SST-2 {split} split is missing from the package ({path})")
    return path


def _fmt(path: str) -> str:
    ext = os.path.splitext(path)[1].lower()
    if ext in (".tsv", ".txt"):
        return "tsv"
    if ext == ".csv":
        return "csv"
    if ext in (".jsonl", ".json", ".ndjson"):
        return "jsonl"
    raise DataError(
        f"{path}: unknown data format {ext or '(no extension)'!r}; use .tsv (sentence<TAB>label), "
        ".csv (text,label columns) or .jsonl ({\"text\": ..., \"label\": ...} a line)"
    )


def _label_str(value, path: str, lineno: int) -> str:
    if isinstance(value, bool) or value is None or isinstance(value, (list, dict)):
        raise DataError(f"{path}, line {lineno}: label must be an integer or a string, got {value!r}")
    if isinstance(value, float):
        if not value.is_integer():
            raise DataError(f"{path}, line {lineno}: label must be an integer or a string, got {value!r}")
        value = int(value)
    s = str(value).strip()
    if not s:
        raise DataError(f"{path}, line {lineno}: empty label")
    return s


def _read_tsv(path: str, fh) -> Iterator[Tuple[int, str, str]]:
    for lineno, raw in enumerate(fh, 1):
        line = raw.rstrip("\r\n")
        if not line.strip():
            continue
        if "\t" not in line:
            raise DataError(
                f"{path}, line {lineno}: expected 'sentence<TAB>label', found no tab: {line[:80]!r}"
            )
        text, label = line.rsplit("\t", 1)
        if lineno == 1 and label.strip().lower() in LABEL_KEYS:
            continue  # header
        if not text.strip():
            raise DataError(f"{path}, line {lineno}: empty sentence")
        yield lineno, text, _label_str(label, path, lineno)


def _pick(keys: Sequence[str], names: Sequence[str]) -> Optional[str]:
    lower = {n.lower().strip(): n for n in names}
    for k in keys:
        if k in lower:
            return lower[k]
    return None


def _read_csv(path: str, fh) -> Iterator[Tuple[int, str, str]]:
    reader = csv.reader(fh)
    try:
        header = next(reader)
    except StopIteration:
        return
    except csv.Error as exc:
        raise DataError(f"{path}, line 1: malformed CSV header ({exc})") from None
    tcol, lcol = _pick(TEXT_KEYS, header), _pick(LABEL_KEYS, header)
    if tcol is None or lcol is None:
        raise DataError(
            f"{path}, line 1: the CSV header must name a 'text' (or 'sentence') and a 'label' column, "
            f"found {header}"
        )
    ti, li = header.index(tcol), header.index(lcol)
    try:
        for row in reader:
            lineno = reader.line_num
            if not row or all(not c.strip() for c in row):
                continue
            if len(row) != len(header):
                raise DataError(
                    f"{path}, line {lineno}: expected {len(header)} columns like the header, got {len(row)}"
                )
            if not row[ti].strip():
                raise DataError(f"{path}, line {lineno}: empty text")
            yield lineno, row[ti], _label_str(row[li], path, lineno)
    except csv.Error as exc:
        raise DataError(f"{path}, line {reader.line_num}: malformed CSV ({exc})") from None


def _read_jsonl(path: str, fh) -> Iterator[Tuple[int, str, str]]:
    for lineno, raw in enumerate(fh, 1):
        if not raw.strip():
            continue
        try:
            obj = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}, line {lineno}: invalid JSON ({exc.msg})") from None
        if not isinstance(obj, dict):
            raise DataError(f"{path}, line {lineno}: expected a JSON object with 'text' and 'label'")
        tkey, lkey = _pick(TEXT_KEYS, list(obj)), _pick(LABEL_KEYS, list(obj))
        if tkey is None or lkey is None:
            raise DataError(
                f"{path}, line {lineno}: the object needs 'text' (or 'sentence') and 'label' keys, "
                f"found {sorted(obj)}"
            )
        text = obj[tkey]
        if not isinstance(text, str) or not text.strip():
            raise DataError(f"{path}, line {lineno}: 'text' must be a non-empty string")
        yield lineno, text, _label_str(obj[lkey], path, lineno)


@contextlib.contextmanager
def reading(path: str):
    """Turns a file that cannot be read or decoded into a DataError naming it."""
    try:
        yield
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except OSError as exc:
        raise DataError(f"{path}: cannot read ({exc.strerror or exc})") from None


def load_examples(path: str, max_examples: Optional[int] = None) -> Examples:
    """Read a tsv/csv/jsonl file of (text, label) examples; raises DataError on any problem."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise DataError(f"{path}: no such file")
    if os.path.isdir(path):
        raise DataError(f"{path}: is a directory, expected a data file")
    fmt = _fmt(path)
    reader = {"tsv": _read_tsv, "csv": _read_csv, "jsonl": _read_jsonl}[fmt]
    texts, labels, lines = [], [], []
    # utf-8-sig: a byte-order mark (Excel and Notepad write one) is not part of the first field
    with reading(path), open(path, "r", encoding="utf-8-sig", newline="" if fmt == "csv" else None) as fh:
        for lineno, text, label in reader(path, fh):
            texts.append(text)
            labels.append(label)
            lines.append(lineno)
            if max_examples is not None and len(texts) >= max_examples:
                break
    if not texts:
        raise DataError(f"{path}: no examples found")
    return Examples(path, texts, labels, lines)


def _is_int(s: str) -> bool:
    try:
        int(s)
        return True
    except ValueError:
        return False


def build_label_map(labels: Sequence[str], num_labels: Optional[int] = None,
                    label2id: Optional[Dict[str, int]] = None) -> Dict[str, int]:
    """Map raw label strings to class ids.

    * integer labels map to themselves (``"0" -> 0``); with ``num_labels`` they must be below it;
    * string labels use ``label2id`` when given (a model config's), else sorted order.
    """
    uniq = sorted(set(labels))
    if all(_is_int(s) for s in uniq):
        ids = {s: int(s) for s in uniq}
        n = num_labels if num_labels is not None else max(2, max(ids.values()) + 1)
        full = {str(i): i for i in range(n)}
        return full
    if label2id:
        return dict(label2id)
    return {s: i for i, s in enumerate(uniq)}


def encode_labels(ex: Examples, label_map: Dict[str, int], known: str = "the model's labels are") -> List[int]:
    """Class ids of ``ex``'s labels; a DataError naming the file and line for a label outside
    ``label_map``. ``known`` says where the map's labels come from, for that message (e.g. the
    training data's labels, which an eval file must not add to)."""
    out = []
    for text_label, lineno in zip(ex.labels, ex.lines):
        key = text_label
        if key not in label_map and _is_int(key) and str(int(key)) in label_map:
            key = str(int(key))
        if key not in label_map:
            names = ", ".join(sorted(label_map, key=lambda k: (label_map[k], k)))
            raise DataError(
                f"{ex.path}, line {lineno}: unknown label {text_label!r} ({known}: {names})"
            )
        out.append(label_map[key])
    return out


def epoch_permutation(n: int, seed: int, epoch: int) -> List[int]:
    """The shuffling order of epoch ``epoch``: a pure function of (n, seed, epoch), so a resumed
    run continues with exactly the batches it would have seen."""
    g = torch.Generator()
    g.manual_seed((int(seed) * 1_000_003 + int(epoch) * 7919 + 17) & ((1 << 63) - 1))
    return torch.randperm(n, generator=g).tolist()


class TokenizedDataset:
    """Pre-tokenized examples with per-batch dynamic padding."""

    def __init__(self, tokenizer, texts: Sequence[str], labels: Sequence[int], max_length: int):
        enc = tokenizer(list(texts), truncation=True, max_length=max_length, padding=False)
        self.input_ids: List[List[int]] = enc["input_ids"]
        self.token_type_ids = enc.get("token_type_ids")
        self.labels = list(labels)
        pad = tokenizer.pad_token_id
        if pad is None:
            pad = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
        self.pad_id = int(pad)

    def __len__(self) -> int:
        return len(self.labels)

    def collate(self, idx: Sequence[int]) -> Dict[str, torch.Tensor]:
        L = max(len(self.input_ids[i]) for i in idx)
        ids = torch.full((len(idx), L), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(idx), L), dtype=torch.long)
        tt = torch.zeros((len(idx), L), dtype=torch.long) if self.token_type_ids is not None else None
        for r, i in enumerate(idx):
            seq = self.input_ids[i]
            ids[r, : len(seq)] = torch.tensor(seq, dtype=torch.long)
            mask[r, : len(seq)] = 1
            if tt is not None:
                tt[r, : len(seq)] = torch.tensor(self.token_type_ids[i], dtype=torch.long)
        batch = {"input_ids": ids, "attention_mask": mask,
                 "labels": torch.tensor([self.labels[i] for i in idx], dtype=torch.long)}
        if tt is not None:
            batch["token_type_ids"] = tt
        return batch

    def batches(self, order: Sequence[int], batch_size: int) -> List[List[int]]:
        return [list(order[i: i + batch_size]) for i in range(0, len(order), batch_size)]
