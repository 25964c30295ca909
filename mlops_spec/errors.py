"""The errors users see: which file, which field, which line, what is allowed; always one line."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional


def one_line(text: str) -> str:
    """`text` with every character that could break the line or hide part of it (newlines, other control
    characters, undecodable bytes of a file name) written as an escape, since messages quote hostile input."""
    return "".join(char if char.isprintable() else char.encode("unicode_escape", "backslashreplace").decode("ascii")
                   for char in text)


def excerpt(text: str, limit: int = 200) -> str:
    """`text`, cut in the middle beyond `limit` characters: messages quote input that may be megabytes long."""
    return text if len(text) <= limit else f"{text[:limit // 2]}…{text[-(limit // 2):]}"


@dataclass
class SpecError(Exception):
    file: Path | str
    field: str
    message: str
    line: Optional[int] = None

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}" if self.line else f"{self.file}"
        field = f" {self.field}:" if self.field else ""
        return one_line(f"{where}:{field} {self.message}")


class NotInProject(Exception):
    """The current directory is in no MLOps stack project, so there are no specs to work on."""

    def __init__(self, start: Path) -> None:
        super().__init__(start)
        self.start = start

    def __str__(self) -> str:
        return one_line(f"not inside an MLOps stack project (no folder with Pulumi.yaml and environments/ from "
                        f"{self.start} upwards); cd into a clone")
