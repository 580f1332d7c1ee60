"""Streaming text documents from local corpora: directories, JSON lines and Parquet files.

Nothing is held in memory beyond one file (a text document) or one record batch (Parquet); the only
list kept is the list of file paths. The embedded default corpus is the running Python's standard
library (`stdlib_corpus_dir`), so examples and tests need no download.
"""

from __future__ import annotations

import json
import os
import random
import sysconfig
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

STDLIB = "stdlib"
"""Source name for the standard-library corpus (same as passing `stdlib_corpus_dir()`)."""

RECORD_EXTENSIONS = (".jsonl", ".parquet")
"""Files holding one document per record (field ``text_field``); all other files are one document each."""

SKIPPED_DIRS = frozenset({"__pycache__", "site-packages", "dist-packages", "node_modules"})
"""Directory names never entered (besides hidden ones)."""

STDLIB_SKIPPED_DIRS = frozenset({"test", "tests", "idle_test", "config-3", "lib-dynload", "ensurepip"})
"""Extra directory names skipped inside the standard library: its large test suites and binaries."""


def stdlib_corpus_dir() -> Path:
    """The directory of the running Python's standard-library sources (the embedded default corpus).

    `iter_documents` skips its ``site-packages`` and test directories.
    """
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_corpus(**kwargs) -> Iterator[str]:
    """Documents of the standard-library corpus: ``iter_documents(stdlib_corpus_dir(), **kwargs)``."""
    return iter_documents(stdlib_corpus_dir(), **kwargs)


def _walk(directory: Path, extensions: tuple[str, ...], skipped: frozenset[str]) -> Iterator[Path]:
    """Files under ``directory`` with one of ``extensions``, in sorted (deterministic) order."""
    for root, dirs, files in os.walk(directory):
        dirs[:] = sorted(d for d in dirs if d not in skipped and not d.startswith("."))
        for name in sorted(files):
            if name.endswith(extensions) and not name.startswith("."):
                yield Path(root) / name


def _files(source: str | os.PathLike, extensions: tuple[str, ...]) -> list[Path]:
    path = stdlib_corpus_dir() if str(source) == STDLIB else Path(source)
    if path.is_dir():
        skipped = SKIPPED_DIRS
        if path.resolve() == stdlib_corpus_dir().resolve():
            skipped = skipped | STDLIB_SKIPPED_DIRS
        return list(_walk(path, extensions + RECORD_EXTENSIONS, skipped))
    if path.is_file():
        return [path]
    raise FileNotFoundError(f"corpus source {str(source)!r} is neither a directory nor a file")


def _read_file(path: Path, extensions: tuple[str, ...], text_field: str) -> Iterator[str]:
    if path.suffix == ".jsonl":
        with path.open(encoding="utf-8") as file:
            for line_number, line in enumerate(file, 1):
                if not line.strip():
                    continue
                record = json.loads(line)
                if text_field not in record:
                    raise KeyError(f"{path}:{line_number}: record has no field {text_field!r}")
                yield record[text_field]
    elif path.suffix == ".parquet":
        import pyarrow.parquet as pq

        parquet = pq.ParquetFile(path)
        if text_field not in parquet.schema_arrow.names:
            raise KeyError(f"{path}: no column {text_field!r} (columns: {parquet.schema_arrow.names})")
        for batch in parquet.iter_batches(batch_size=256, columns=[text_field]):
            yield from batch.column(0).to_pylist()
    elif path.name.endswith(extensions):
        yield path.read_text(encoding="utf-8", errors="replace")
    else:
        raise ValueError(f"{path}: unsupported file type (expected .jsonl, .parquet or one of {extensions})")


def _shuffled(documents: Iterable[str], rng: random.Random, buffer_size: int) -> Iterator[str]:
    """Approximate shuffle with a bounded buffer (memory: ``buffer_size`` documents)."""
    buffer: list[str] = []
    for document in documents:
        if len(buffer) < buffer_size:
            buffer.append(document)
            continue
        index = rng.randrange(buffer_size)
        yield buffer[index]
        buffer[index] = document
    rng.shuffle(buffer)
    yield from buffer


def iter_documents(
    source: str | os.PathLike | Sequence[str | os.PathLike],
    *,
    extensions: tuple[str, ...] = (".txt", ".py", ".md"),
    text_field: str = "text",
    shuffle_seed: int | None = None,
    shuffle_buffer: int = 1024,
) -> Iterator[str]:
    """Stream the non-empty text documents of one or more corpus sources.

    Args:
        source: a directory (searched recursively; files ending with ``extensions`` are one document
            each, ``.jsonl``/``.parquet`` files inside are read as records), a ``.jsonl`` file (one JSON
            object per line), a ``.parquet`` file, the name ``"stdlib"``, or a list of these (read in order).
        extensions: suffixes of plain-text files to read from directories.
        text_field: the record field holding the text in ``.jsonl``/``.parquet`` files.
        shuffle_seed: None reads in the sorted, deterministic order. An int shuffles the file order and
            then the documents through a ``shuffle_buffer``-sized buffer (deterministic for a seed).
        shuffle_buffer: documents held for shuffling.

    Yields:
        document texts.
    """
    sources = [source] if isinstance(source, (str, os.PathLike)) else list(source)
    if not sources:
        raise ValueError("iter_documents needs at least one source")
    if shuffle_buffer < 1:
        raise ValueError(f"shuffle_buffer must be positive, got {shuffle_buffer}")
    extensions = tuple(extensions)
    files = [file for item in sources for file in _files(item, extensions)]

    def documents(order: list[Path]) -> Iterator[str]:
        for path in order:
            for text in _read_file(path, extensions, text_field):
                if text and not text.isspace():
                    yield text

    if shuffle_seed is None:
        yield from documents(files)
        return
    rng = random.Random(shuffle_seed)
    rng.shuffle(files)
    yield from _shuffled(documents(files), rng, shuffle_buffer)


class DocumentStream:
    """A re-iterable `iter_documents`: every ``iter()`` starts over with the same arguments (what
    `l2a.data.PackedDataset` needs to resume)."""

    def __init__(self, source: str | os.PathLike | Sequence[str | os.PathLike], **kwargs) -> None:
        self.source = source
        self.kwargs = kwargs
        for item in [source] if isinstance(source, (str, os.PathLike)) else source:
            if str(item) != STDLIB and not Path(item).exists():
                raise FileNotFoundError(f"corpus source {str(item)!r} does not exist")

    def __iter__(self) -> Iterator[str]:
        return iter_documents(self.source, **self.kwargs)

    def __repr__(self) -> str:
        return f"DocumentStream({self.source!r}, {self.kwargs})"
