"""Bidirectional renaming between vitkit's (timm's) state-dict keys and another library's.

A rule pairs two templates, e.g. ``("blocks.{i}.norm1", "encoder.layers.encoder_layer_{i}.ln_1")``.
``{i}`` stands for a block index. A rule matches a whole key, or a module prefix whose parameter
suffix (``.weight``, ``.bias``) is carried over unchanged.
"""

from __future__ import annotations

import re
from collections.abc import Iterable


def _compile(template: str) -> re.Pattern[str]:
    pattern = re.escape(template).replace(r"\{i\}", r"(?P<i>\d+)")
    return re.compile(rf"{pattern}(?P<rest>(\..+)?)")


class KeyMap:
    """Rename keys both ways from ``(ours, theirs)`` template pairs; the first matching rule wins."""

    def __init__(self, rules: Iterable[tuple[str, str]]) -> None:
        self.rules = list(rules)
        self._ours = [(_compile(ours), theirs) for ours, theirs in self.rules]
        self._theirs = [(_compile(theirs), ours) for ours, theirs in self.rules]

    @staticmethod
    def _rename(key: str, table: list[tuple[re.Pattern[str], str]]) -> str | None:
        for pattern, target in table:
            match = pattern.fullmatch(key)
            if match:
                groups = match.groupdict()
                return target.replace("{i}", groups.get("i") or "") + groups["rest"]
        return None

    def to_ours(self, key: str) -> str | None:
        """vitkit's name for a foreign key, or None if no rule covers it."""
        return self._rename(key, self._theirs)

    def to_theirs(self, key: str) -> str | None:
        """The foreign name for one of vitkit's keys, or None if no rule covers it."""
        return self._rename(key, self._ours)
