"""Read text examples (and optional labels) from local files or through the `datasets` library."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from ..scenario import DataConfig

READERS = {
    ".jsonl": lambda p: pd.read_json(p, lines=True),
    ".csv": pd.read_csv,
    ".parquet": pd.read_parquet,
    ".txt": lambda p: pd.DataFrame({"text": [ln for ln in Path(p).read_text().splitlines() if ln.strip()]}),
}


def read_records(config: DataConfig) -> pd.DataFrame:
    """A frame with the text column (and the label column when present), in file order."""
    frame = _read_files(config) if config.source == "files" else _read_datasets(config)
    if config.text_field not in frame.columns:
        raise ValueError(
            f"data.text_field: no column {config.text_field!r} in the data (columns: {', '.join(map(str, frame.columns))})"
        )
    frame = frame[frame[config.text_field].astype(str).str.strip() != ""]
    return frame.reset_index(drop=True)


def _read_files(config: DataConfig) -> pd.DataFrame:
    paths = [config.path] if isinstance(config.path, str) else list(config.path)
    frames = []
    for path in map(Path, paths):
        reader = READERS.get(path.suffix.lower())
        if reader is None:
            raise ValueError(f"data.path: {path} has an unsupported extension; use one of {', '.join(READERS)}")
        if not path.is_file():
            raise ValueError(f"data.path: {path} does not exist")
        frames.append(reader(path))
    return pd.concat(frames, ignore_index=True)


def _read_datasets(config: DataConfig) -> pd.DataFrame:
    """The `datasets` path: a hub name when online, or a builder such as json/csv with data_files."""
    import datasets

    dataset = datasets.load_dataset(config.path, data_files=config.data_files, split=config.split)
    return dataset.to_pandas()
