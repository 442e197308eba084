"""Training data: JSONL or CSV records (optionally ``.gz`` / ``.bz2`` compressed), tokenised into batches.

A record holds a text field (``--text-field``, default ``text``) and, for classification, a label field
(``--label-field``, default ``label``). Labels are strings or numbers; their sorted distinct values become class ids
0..n-1, and that list travels in the adapter's manifest (``training.labels``) so evaluation maps them the same way.
"""

from __future__ import annotations

import bz2
import csv
import gzip
import io
import json
import os
from dataclasses import dataclass

import torch

from adapterkit.errors import FormatError
from adapterkit.io.paths import open_regular

#: decompressors by suffix, each wrapping an open binary file
DECOMPRESSORS = {".gz": lambda raw: gzip.GzipFile(fileobj=raw), ".bz2": bz2.BZ2File}


def read_records(path: str | os.PathLike) -> list[dict]:
    """The records of a ``.jsonl`` or ``.csv`` file, each optionally compressed with gzip or bzip2."""
    path = os.fspath(path)
    stem, compression = os.path.splitext(path)
    decompress = DECOMPRESSORS.get(compression.lower())
    if decompress is None:
        stem = path
    form = os.path.splitext(stem)[1].lower()
    if form not in (".jsonl", ".csv"):
        raise FormatError("training data must be .jsonl or .csv (optionally .gz or .bz2)", path)
    try:
        with open_regular(path) as raw_file:
            raw = decompress(raw_file) if decompress else raw_file
            # utf-8-sig: a byte-order mark at the start (as spreadsheet programs write) is read, not kept
            with io.TextIOWrapper(raw, encoding="utf-8-sig", newline="") as text:
                if form == ".csv":
                    return list(csv.DictReader(text))
                return [_json_line(path, number, line) for number, line in enumerate(text, 1) if line.strip()]
    except (OSError, EOFError, UnicodeDecodeError, csv.Error) as exc:
        raise FormatError(f"cannot read training data: {type(exc).__name__}: {exc}", path) from None


def _json_line(path: str, number: int, line: str) -> dict:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as exc:
        raise FormatError(f"line {number} is not JSON: {exc.msg}", path) from None
    if not isinstance(record, dict):
        raise FormatError(f"line {number} is not a JSON object", path)
    return record


@dataclass
class Examples:
    """Texts, and for classification their class ids and the label names those ids stand for."""

    texts: list[str]
    label_ids: list[int] | None = None
    labels: list[str] | None = None

    def __len__(self) -> int:
        return len(self.texts)


def load_examples(path, text_field: str = "text", label_field: str | None = None,
                  labels: list[str] | None = None) -> Examples:
    """Read ``path``; with ``label_field``, map labels to ids through ``labels`` (or the sorted distinct labels)."""
    records = read_records(path)
    if not records:
        raise FormatError("no records", path)
    fields = [text_field] + ([label_field] if label_field else [])
    for number, record in enumerate(records, 1):
        for name in fields:
            if record.get(name) in (None, ""):
                raise FormatError(f"record {number} has no field {name!r}", path)
    texts = [str(r[text_field]) for r in records]
    if not label_field:
        return Examples(texts)
    values = [str(r[label_field]) for r in records]
    labels = list(labels) if labels is not None else sorted(set(values))
    unknown = sorted(set(values) - set(labels))
    if unknown:
        raise FormatError(f"label {unknown[0]!r} is not among the trained labels {labels}", path)
    index = {label: i for i, label in enumerate(labels)}
    return Examples(texts, [index[v] for v in values], labels)


class Collator:
    """Turns a list of example indices into a padded batch: ``input_ids``, ``attention_mask`` and ``labels``
    (class ids for classification; for a causal LM the input ids with padding set to -100, which the loss ignores)."""

    def __init__(self, examples: Examples, tokenizer, max_length: int = 128):
        self.examples, self.tokenizer, self.max_length = examples, tokenizer, max_length

    def __call__(self, indices: list[int]) -> dict[str, torch.Tensor]:
        batch = self.tokenizer(
            [self.examples.texts[i] for i in indices], padding=True, truncation=True, max_length=self.max_length,
            return_tensors="pt",
        )
        batch = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
        if self.examples.label_ids is not None:
            batch["labels"] = torch.tensor([self.examples.label_ids[i] for i in indices])
        else:
            batch["labels"] = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
        return batch
