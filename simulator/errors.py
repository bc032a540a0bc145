"""User-facing errors: printed as one screen, exit code 2, never a traceback."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Problem:
    """One thing wrong with the user's input: where (dotted field path) and what."""

    field: str
    message: str


@dataclass
class UserError(Exception):
    """Bad input from the user (scenario file, CLI flag, data on disk).

    ``source`` names the file (or flag) the problem came from; each problem names the
    dotted field path inside it.
    """

    source: str
    problems: list[Problem] = field(default_factory=list)

    def __post_init__(self) -> None:
        super().__init__(self.render())

    @classmethod
    def single(cls, source: str, field_path: str, message: str) -> "UserError":
        return cls(source, [Problem(field_path, message)])

    def render(self) -> str:
        lines = [f"error: {self.source}"]
        for p in self.problems[:20]:
            where = p.field or "(top level)"
            lines.append(f"  {where}: {p.message}")
        if len(self.problems) > 20:
            lines.append(f"  ... and {len(self.problems) - 20} more problems")
        return "\n".join(lines)

    def __str__(self) -> str:  # pragma: no cover - trivial
        return self.render()


class RunFailure(Exception):
    """A run stopped for a reason that is not bad input (reported without traceback)."""


class FieldError(Exception):
    """A problem with one scenario field found after schema validation (data on disk,
    impossible partitions, ...). The caller adds the scenario file name and reports it
    as a :class:`UserError`."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message
