"""`data.name=files`: a user's own examples from local files, read with Hugging Face
`datasets`: JSON Lines, JSON, CSV, Parquet, or a folder written by `Dataset.save_to_disk`.
The config names the fields; labels and clients are read from the data (any values)."""
from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Literal, Optional

from fedalign_dist.config_sections import ConfigSection
from fedalign_dist.data.registry import DataSource, register_source
from fedalign_dist.data.sources import Corpus

SUFFIXES = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}


class FilesConfig(ConfigSection):
    path: str = ""
    """A .jsonl/.json/.csv/.parquet file, or a folder written by Dataset.save_to_disk."""
    format: Literal["auto", "json", "csv", "parquet", "saved"] = "auto"
    """auto: from the suffix (a folder: saved)."""
    split: str = "train"
    """For a saved DatasetDict: which split to read."""
    text_field: str = "text"
    """The input: the text to classify, or an instruction task's prompt."""
    label_field: Optional[str] = None
    """Class of each example (any values: the label names are read from the data)."""
    response_field: Optional[str] = None
    """Target text of each example (data.task=instruction)."""
    client_field: Optional[str] = None
    """Which client holds each example (any values), for data.partition=natural."""


@register_source("files")
class Files(DataSource):
    config_section = FilesConfig

    @classmethod
    def check_config(cls, config) -> None:
        options = config.data.files
        if not options.path:
            raise ValueError("data.name=files needs data.files.path (a .jsonl/.json/.csv/.parquet file, or a folder "
                             "written by Dataset.save_to_disk)")
        if not Path(options.path).exists():
            raise ValueError(f"data.files.path: {options.path} does not exist")
        if config.data.partition == "natural" and options.client_field is None:
            raise ValueError("data.partition=natural needs data.files.client_field (the field naming each "
                             "example's client)")
        if config.data.partition in ("dirichlet", "label_shards") and options.label_field is None:
            raise ValueError(f"data.partition={config.data.partition} splits by label: set data.files.label_field, "
                             f"or use data.partition=iid (or natural with data.files.client_field)")

    def load(self) -> Corpus:
        options = self.options
        table = read_table(Path(options.path), options.format, options.split)
        fields = {"text_field": options.text_field, "label_field": options.label_field,
                  "response_field": options.response_field, "client_field": options.client_field}
        for key, field in fields.items():
            if field is not None and field not in table.column_names:
                raise ValueError(f"{options.path}: data.files.{key}='{field}' is not a field of this data; its fields: "
                                 f"{', '.join(table.column_names)}")
        texts = _required(table, options.text_field, options.path, "text_field")
        responses = (_required(table, options.response_field, options.path, "response_field")
                     if options.response_field else None)
        labels, label_names = (_categories(_required(table, options.label_field, options.path, "label_field"))
                               if options.label_field else (None, None))
        groups, group_names = (_categories(_required(table, options.client_field, options.path, "client_field"))
                               if options.client_field else (None, None))
        return Corpus([str(t) for t in texts], labels, label_names, groups, group_names,
                      [str(r) for r in responses] if responses is not None else None)


def read_table(path: Path, fmt: str, split: str = "train"):
    """The file or saved folder as one in-memory datasets.Dataset."""
    from datasets import Dataset, DatasetDict, load_from_disk
    if fmt == "auto":
        fmt = "saved" if path.is_dir() else SUFFIXES.get(path.suffix.lower())
        if fmt is None:
            raise ValueError(f"data.files.path: cannot tell the format of {path} from its suffix (known: "
                             f"{', '.join(SUFFIXES)}, or a saved folder): set data.files.format")
    if fmt == "saved":
        table = load_from_disk(str(path), keep_in_memory=True)
        if isinstance(table, DatasetDict):
            if split not in table:
                raise ValueError(f"{path}: no split '{split}' (data.files.split); it has {', '.join(table)}")
            table = table[split]
        return table
    reader = {"json": Dataset.from_json, "csv": Dataset.from_csv, "parquet": Dataset.from_parquet}[fmt]
    try:
        with tempfile.TemporaryDirectory() as cache:  # nothing left in the user's datasets cache
            return reader(str(path), cache_dir=cache, keep_in_memory=True)
    except Exception as err:  # datasets' error names neither the file nor the line
        where = bad_json_line(path) if fmt == "json" else None
        if where is None:
            raise
        raise ValueError(where) from err


def bad_json_line(path: Path) -> str | None:
    """Where a JSON (one document) or JSON Lines file stops being JSON, as a one-line message;
    None if it parses (the reader failed for another reason)."""
    text = path.read_text(encoding="utf-8", errors="replace")
    try:
        json.loads(text)
        return None  # one whole JSON document
    except json.JSONDecodeError as err:
        if text.lstrip().startswith("["):
            return f"{path}, line {err.lineno}: not valid JSON ({err.msg}: column {err.colno})"
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            return (f"{path}, line {number}: not valid JSON ({err.msg}: column {err.colno}); each line of a JSON "
                    f"Lines file must be one whole JSON object: fix or remove that line")
        if not isinstance(record, dict):
            return f"{path}, line {number}: a JSON {type(record).__name__}, not an object with the data's fields"
    return None


def _required(table, field: str, path: str, key: str) -> list:
    values = table[field]
    missing = [i for i, v in enumerate(values) if v is None or (isinstance(v, str) and not v.strip())]
    if missing:
        raise ValueError(f"{path}: {len(missing)} example(s) have no value in field '{field}' (data.files.{key}), "
                         f"first at row {missing[0]}: fill or remove them")
    return values


def _categories(values: list) -> tuple[list[int], list[str]]:
    """Any values -> (index of each, names in sorted order; numbers sorted as numbers)."""
    distinct = sorted(set(values), key=lambda v: (not isinstance(v, (int, float)), v if isinstance(v, (int, float))
                                                 else str(v)))
    index = {v: i for i, v in enumerate(distinct)}
    return [index[v] for v in values], [str(v) for v in distinct]
