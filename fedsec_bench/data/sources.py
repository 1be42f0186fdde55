"""Read records from local files or through the `datasets` library, and turn them into examples.

Errors name the scenario field to fix (``data.path``, ``data.output_field``...), never
just the reader's own message.
"""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd

from ..bounded_yaml import value_excerpt
from ..errors import excerpt
from ..hub import describe_error, local_first, offline
from ..scenario import DataConfig
from .examples import Example, instruction_example, text_example

READERS = {
    ".jsonl": lambda p: pd.read_json(p, lines=True),
    ".json": pd.read_json,
    ".csv": pd.read_csv,
    ".parquet": pd.read_parquet,
    ".txt": lambda p: pd.DataFrame({"text": [ln for ln in Path(p).read_text().splitlines() if ln.strip()]}),
}
ROLES = ("system", "user", "assistant")


def read_records(config: DataConfig) -> pd.DataFrame:
    """Every row of the configured files or dataset, in order."""
    frame = _read_files(config) if config.source == "files" else _read_datasets(config)
    return frame.reset_index(drop=True)


def to_examples(frame: pd.DataFrame, config: DataConfig) -> list[Example | None]:
    """One example per row in ``data.format``; None for a row with an empty response (it is dropped and counted)."""
    needed = {"text": [config.text_field], "instruction": [config.instruction_field, config.output_field],
              "chat": [config.messages_field]}[config.format]
    field = {config.text_field: "text_field", config.instruction_field: "instruction_field",
             config.output_field: "output_field", config.messages_field: "messages_field"}
    for column in needed:
        if column not in frame.columns:
            raise ValueError(
                f"data.{field[column]}: no column {value_excerpt(column)} in the data (columns: "
                f"{excerpt(', '.join(map(str, frame.columns)), 200)})"
            )
    if config.format == "text":
        return [text_example(t) if t.strip() else None for t in frame[config.text_field].map(_text)]
    if config.format == "instruction":
        inputs = frame[config.input_field].map(_text) if config.input_field in frame.columns else [""] * len(frame)
        return [
            instruction_example(ins, out, input=inp) if out.strip() else None
            for ins, inp, out in zip(frame[config.instruction_field].map(_text), inputs, frame[config.output_field].map(_text))
        ]
    return [_chat_example(row, messages, config) for row, messages in enumerate(frame[config.messages_field])]


def _text(value) -> str:
    return "" if value is None or (isinstance(value, float) and math.isnan(value)) else str(value)


def _chat_example(row: int, messages, config: DataConfig) -> Example | None:
    """A conversation whose last message is the assistant's response; the turns before it are the prompt."""
    where = f"data.messages_field: row {row}"
    if not hasattr(messages, "__len__") or isinstance(messages, (str, dict)) or len(messages) == 0:
        raise ValueError(f"{where}: expected a non-empty list of {{role, content}} messages, got {value_excerpt(messages)}")
    turns = []
    for message in messages:
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise ValueError(f"{where}: each message needs a role and a content, got {value_excerpt(message)}")
        if message["role"] not in ROLES:
            raise ValueError(f"{where}: role {value_excerpt(message['role'])} is not one of {', '.join(ROLES)}")
        turns.append((message["role"], _text(message["content"])))
    if turns[-1][0] != "assistant":
        raise ValueError(f"{where}: the last message must be the assistant's response (got role {value_excerpt(turns[-1][0])})")
    if not turns[-1][1].strip():
        return None
    return Example(response=turns[-1][1], prompt=tuple(turns[:-1]))


def _read_files(config: DataConfig) -> pd.DataFrame:
    paths = [config.path] if isinstance(config.path, str) else list(config.path)
    frames = []
    for path in map(Path, paths):
        shown = excerpt(str(path), 200)
        reader = READERS.get(path.suffix.lower())
        if reader is None:
            raise ValueError(f"data.path: {shown} has an unsupported extension; use one of {', '.join(READERS)}")
        try:
            is_file, exists = path.is_file(), path.exists()
        except (OSError, ValueError) as exc:  # a NUL byte, a name too long for the file system
            raise ValueError(f"data.path: {shown} is not a usable path ({excerpt(str(exc))}); fix it") from None
        if not is_file:
            raise ValueError(f"data.path: {shown} {'is not a file' if exists else 'does not exist'}; name a "
                             f"{'/'.join(READERS)} file")
        try:
            frame = reader(path)
        except Exception as exc:  # noqa: BLE001 - pandas, pyarrow, json and csv each raise their own; all mean this
            raise ValueError(f"data.path: {shown} could not be read as {path.suffix.lower()[1:]} "
                             f"({describe_error(exc)}); "
                             "fix the file or its extension") from None
        if not isinstance(frame, pd.DataFrame):  # pd.read_json of a bare list or value gives a Series
            frame = frame.to_frame() if isinstance(frame, pd.Series) else pd.DataFrame()
        frames.append(frame)
    return pd.concat(frames, ignore_index=True)


def _read_datasets(config: DataConfig) -> pd.DataFrame:
    """The `datasets` path: a builder such as json/csv with data_files (local, read offline), or a dataset name:
    a local folder, the cache, or the Hub when it can be reached (:func:`~fedsec_bench.hub.local_first`)."""
    import datasets
    from datasets.packaged_modules import _PACKAGED_DATASETS_MODULES

    if not isinstance(config.path, str):
        raise ValueError("data.path: with data.source datasets it is one dataset name or builder, not a list; "
                         "list the files in data.data_files")

    def load() -> pd.DataFrame:
        return datasets.load_dataset(config.path, data_files=config.data_files, split=config.split).to_pandas()

    if config.path not in _PACKAGED_DATASETS_MODULES:
        return local_first(load, config.path, "data.path", "a dataset")
    try:
        with offline():  # a builder reads the data files; nothing to fetch
            return load()
    except Exception as exc:  # noqa: BLE001 - a missing or malformed data file, an unknown split...
        raise ValueError(
            f"data.data_files: datasets.load_dataset({value_excerpt(config.path)}, split={value_excerpt(config.split)}) failed "
            f"({describe_error(exc)}); check data.data_files "
            "and data.split"
        ) from None
