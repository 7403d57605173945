"""Raw records from JSONL files or built-in tasks, each carrying where it came from (file:line)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ds_realloc.utils.errors import DataError


@dataclass(frozen=True)
class Record:
    """One input object and its origin, e.g. `data/train.jsonl:17` or `builtin:arith/train#3`."""

    source: str
    fields: dict[str, Any]

    def text(self, name: str, optional: bool = False) -> str | None:
        """A string field, or a DataError that names the file, line and field."""
        if name not in self.fields:
            if optional:
                return None
            raise DataError(f"{self.source}: field '{name}' is missing (the record has: {', '.join(self.fields) or 'nothing'})")
        value = self.fields[name]
        if not isinstance(value, str):
            raise DataError(f"{self.source}: field '{name}' must be a string, got {type(value).__name__}")
        return value

    def messages(self, name: str = "messages") -> list[dict[str, str]]:
        """A chat: a list of {"role", "content"} objects, checked field by field."""
        value = self.fields[name]
        if not isinstance(value, list) or not value:
            raise DataError(f"{self.source}: field '{name}' must be a non-empty list of messages")
        for i, message in enumerate(value):
            if not isinstance(message, dict):
                raise DataError(f"{self.source}: field '{name}[{i}]' must be an object with 'role' and 'content'")
            for key in ("role", "content"):
                if not isinstance(message.get(key), str):
                    raise DataError(f"{self.source}: field '{name}[{i}].{key}' is missing or not a string")
        return value


def read_jsonl(path: str | Path) -> list[Record]:
    """Every non-blank line of a JSONL file as a Record; a malformed line raises with its line number."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file {path} does not exist")
    records = []
    with path.open(encoding="utf-8") as handle:
        for lineno, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                fields = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno}: invalid JSON: {e.msg} (column {e.colno})") from None
            if not isinstance(fields, dict):
                raise DataError(f"{path}:{lineno}: each line must be a JSON object, got {type(fields).__name__}")
            records.append(Record(f"{path}:{lineno}", fields))
    if not records:
        raise DataError(f"data file {path} has no records")
    return records
