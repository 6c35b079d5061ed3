"""Record files (paper §3, §5): the JSON and JSON-lines files that every stage reads and writes.

LLaVA-Med keeps everything as records: figure captions, alignment and instruction conversations, VQA
questions, answers and reviews, in JSON arrays or in JSON lines. They are all read here, by one reader whose
errors name the file and the line. The files a long run appends to (generate_data.py's conversations and
failures, sample.py's answers) are read back by `read_jsonl_resume`, so that a run killed mid-write resumes
where it stopped. What a record holds is the business of the files that use it (data.py, evaluation.py,
judge.py, generate_data.py, sample.py).
"""

from __future__ import annotations

import json
import os
import time
from typing import Callable


def _parse(path: str, line: int, text: str | bytes):
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{line}: not valid JSON ({e.msg})") from None


def located_records(path: str | os.PathLike,
                    grouped: Callable[[dict], list] | None = None) -> list[tuple[str, dict]]:
    """(where, record) pairs from a JSON array (`file[index]`) or a JSON-lines file (`file:line`), read
    unmodified; a record that is not a JSON object, or a line that is not JSON, is an error naming it.
    `grouped` also reads a file holding one JSON object of lists ({key: [records]}, LLaVA-Med's caption files
    by domain): it turns that object into the list of records, which are then named `file[index]`."""
    path = os.fspath(path)
    with open(path, encoding="utf-8") as f:
        text = f.read()
    start = text.lstrip()[:1]
    whole = None
    if start == "[":
        try:
            whole = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None
    elif start == "{" and grouped is not None:
        try:
            document = json.loads(text)
        except json.JSONDecodeError:
            document = None  # JSON lines
        if isinstance(document, dict) and document and all(isinstance(v, list) for v in document.values()):
            whole = grouped(document)
    if whole is not None:
        numbered = [(f"{path}[{k}]", r) for k, r in enumerate(whole)]
    else:
        numbered = [(f"{path}:{n}", _parse(path, n, line)) for n, line in enumerate(text.splitlines(), 1)
                    if line.strip()]
    for k, (where, r) in enumerate(numbered):
        if not isinstance(r, dict):
            raise ValueError(f"{where}: record {k} is not a JSON object")
    return numbered


def load_records(path: str | os.PathLike) -> list[dict]:
    """The records of a JSON array or a JSON-lines file (see `located_records`)."""
    return [r for _, r in located_records(path)]


# ----------------------------------------------------------------------------- resumable JSON lines

def read_jsonl_resume(path: str) -> list[dict]:
    """Rows of a JSONL file this project appends to. A torn last line (process killed mid-write) is cut away
    so its record is redone; a bad line elsewhere is corruption we did not cause and raises, naming the line."""
    if not os.path.exists(path):
        return []
    with open(path, "rb") as f:
        data = f.read()
    rows, good_end, pos = [], 0, 0
    lines = data.split(b"\n")
    for i, line in enumerate(lines):
        end = pos + len(line) + (1 if i < len(lines) - 1 else 0)
        if line.strip():
            try:
                rows.append(_parse(path, i + 1, line))
            except ValueError as e:
                if any(rest.strip() for rest in lines[i + 1:]):
                    raise ValueError(f"{e}; fix or remove this line") from None
                with open(path, "r+b") as f:
                    f.truncate(good_end)
                return rows
            if i == len(lines) - 1:  # complete JSON but no newline: finish the line so appends stay separate
                with open(path, "ab") as f:
                    f.write(b"\n")
        good_end, pos = end, end
    return rows


class JsonlAppender:
    """Append-only JSONL writer: one line per record, flushed at once, fsynced every few lines or seconds so a
    crash loses at most the unsynced tail, which the next run redoes."""

    def __init__(self, path: str, fsync_every: int = 50, fsync_seconds: float = 5.0):
        self.f = open(path, "a", encoding="utf-8")
        self.fsync_every, self.fsync_seconds = fsync_every, fsync_seconds
        self.unsynced, self.last_sync = 0, time.monotonic()

    def write(self, row: dict) -> None:
        self.f.write(json.dumps(row, ensure_ascii=False) + "\n")  # one write call per line
        self.f.flush()
        self.unsynced += 1
        if self.unsynced >= self.fsync_every or time.monotonic() - self.last_sync > self.fsync_seconds:
            self.sync()

    def sync(self) -> None:
        os.fsync(self.f.fileno())
        self.unsynced, self.last_sync = 0, time.monotonic()

    def close(self) -> None:
        self.f.flush()
        self.sync()
        self.f.close()
