"""What a storage never indexes or syncs: its `.ignore` patterns and ironsync's own files.

`.ignore` at a storage root holds gitignore-style patterns (pathspec's GitIgnoreSpec, which
follows git's rules, including "a file under an excluded folder cannot be re-included").
The `.ignore` file itself, ironsync's temporary files (`.ironsync-*.tmp`) and the per-storage
`.ironsync/` folder are always excluded, whatever `.ignore` says.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pathspec

IGNORE_FILE = ".ignore"
STATE_DIR = ".ironsync"  # per-storage folder of ironsync's own (marker, versions)
TEMP_PREFIX = ".ironsync-"
TEMP_SUFFIX = ".tmp"


def is_temp_name(name: str) -> bool:
    """True for the name of an ironsync temporary file (`.ironsync-*.tmp`)."""
    return name.startswith(TEMP_PREFIX) and name.endswith(TEMP_SUFFIX)


def is_internal(rel_path: str) -> bool:
    """Paths ironsync owns: never scanned, never synced, never accepted from a peer."""
    if rel_path in (IGNORE_FILE, STATE_DIR) or rel_path.startswith(STATE_DIR + "/"):
        return True
    return is_temp_name(rel_path.rpartition("/")[2])


@dataclass(frozen=True)
class IgnoreRules:
    """The ignore rules of one storage. `patterns` is the text of its `.ignore` (or empty)."""

    patterns: tuple[str, ...] = ()
    _spec: pathspec.GitIgnoreSpec | None = field(default=None, compare=False, repr=False)

    @classmethod
    def from_lines(cls, lines: list[str] | tuple[str, ...]) -> IgnoreRules:
        kept = tuple(line.rstrip("\r\n") for line in lines)
        active = [line for line in kept if line.strip() and not line.lstrip().startswith("#")]
        spec = pathspec.GitIgnoreSpec.from_lines(active) if active else None
        return cls(kept, spec)

    @classmethod
    def load(cls, root: Path) -> IgnoreRules:
        """Read `root/.ignore`; a missing file means no patterns."""
        try:
            text = (root / IGNORE_FILE).read_text(encoding="utf-8", errors="replace")
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            return cls()
        return cls.from_lines(text.splitlines())

    def ignores_file(self, rel_path: str) -> bool:
        """Is the file at `rel_path` ('/'-separated, relative to the root) excluded?"""
        if is_internal(rel_path):
            return True
        return self._spec is not None and self._spec.match_file(rel_path)

    def ignores_dir(self, rel_path: str) -> bool:
        """Is the folder at `rel_path` excluded as a whole (so the walk can skip it)?"""
        if rel_path == STATE_DIR:
            return True
        return self._spec is not None and self._spec.match_file(rel_path + "/")
