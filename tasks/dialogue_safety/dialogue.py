"""What both dialogue tasks share (this module is imported by ``tasks.knowledge_dialogue`` too): reading dialogue
fields of dataset rows and formatting a history into prompt text."""

from __future__ import annotations

import string
from dataclasses import dataclass
from typing import Any, Optional


def placeholders(template: str) -> set[str]:
    """The ``{name}`` fields of a ``str.format`` template (``{{``/``}}`` are literal braces)."""
    return {name for _, name, _, _ in string.Formatter().parse(template) if name is not None}


def check_template(template: str, name: str, allowed: set[str], required: set[str]) -> None:
    """Fail at start-up when a template names a field it cannot have, or lacks one it needs."""
    try:
        fields = placeholders(template)
    except ValueError as error:
        raise ValueError(f"{name} {template!r} is not a valid format string ({error}); write literal braces as {{{{ and }}}}") from None
    if unknown := fields - allowed:
        raise ValueError(f"{name} {template!r} has unknown placeholders {sorted(unknown)}; it may use {sorted(allowed)}")
    if missing := required - fields:
        raise ValueError(f"{name} {template!r} lacks the placeholders {sorted(missing)}")


@dataclass(frozen=True)
class DialogueFormat:
    """How a dialogue history (a list of turns, oldest first) becomes text.

    Args:
        turn_template: One turn; placeholders ``{speaker}`` and ``{text}`` (e.g. '{speaker}: {text}', or '{text}').
        separator: Between turns.
        speakers: (the user, the model). The last turn of a history is the user's (the one to answer); the
            turns before it alternate backwards.
        max_turns: Keep only the last this many turns (None: all).
    """

    turn_template: str = "{speaker}: {text}"
    separator: str = "\n"
    speakers: tuple[str, str] = ("User", "Assistant")
    max_turns: Optional[int] = None

    def __post_init__(self):
        check_template(self.turn_template, "turn_template", {"speaker", "text"}, {"text"})
        if self.max_turns is not None and self.max_turns < 1:
            raise ValueError(f"max_turns must be ≥ 1 or None (all turns), got {self.max_turns}")

    @property
    def assistant(self) -> str:
        """The model's speaker name (what answers the last turn)."""
        return self.speakers[1]

    def kept(self, turns: list[str]) -> list[str]:
        """The turns the prompt shows: the last ``max_turns``."""
        return turns[-self.max_turns :] if self.max_turns is not None else turns

    def format(self, turns: list[str]) -> str:
        """The kept turns, each with its speaker, joined by ``separator``."""
        kept = self.kept(turns)
        return self.separator.join(
            self.turn_template.format(speaker=self.speakers[(len(kept) - 1 - i) % 2], text=text) for i, text in enumerate(kept)
        )


def turns_field(row: dict[str, Any], field: str, where: str, expected: str, allow_empty: bool = False) -> list[str]:
    """``row[field]`` as a list of turns: a string is one turn, a list of strings is the turns oldest first."""
    value = row.get(field)
    turns = [value] if isinstance(value, str) else value
    if not isinstance(turns, list) or not all(isinstance(turn, str) and turn.strip() for turn in turns) or not (turns or allow_empty):
        what = "a string or a list of non-empty strings" if allow_empty else "a non-empty string or a non-empty list of non-empty strings"
        raise ValueError(f"{where}: {field!r} must be {what}, got {value!r}; expected {expected}")
    return [turn.strip() for turn in turns]


def reference_field(row: dict[str, Any], field: Optional[str], where: str, expected: str) -> list[str]:
    """The gold response(s) in ``row[field]`` (a string or a list of strings) as a list; none when the field is unset or null."""
    if field is None or row.get(field) is None:
        return []
    value = row[field]
    references = [value] if isinstance(value, str) else value
    if not isinstance(references, list) or not all(isinstance(r, str) for r in references):
        raise ValueError(f"{where}: {field!r} must be a string, a list of strings or null, got {value!r}; expected {expected}")
    return [r.strip() for r in references if r.strip()]

