"""Values shared by every layer: the kinds of index entries and their content hashes.

An index row is a regular file, a folder or a symbolic link (`files.type`). Reconciliation
groups rows by their *content*, the pair (kind, hash): a file's hash is the xxh3-128 of its
bytes; a folder has no content of its own, so every folder has `DIR_HASH`; a link's content is
its target text, hashed by `link_hash`. Both constants are domain-separated from file hashes,
so a folder or a link never matches a file's content (a move or a chunk source is always a
file). Pinned by tests/test_model.py: peers compare these hashes.
"""

from __future__ import annotations

import xxhash

FILE = "file"
DIR = "dir"
SYMLINK = "symlink"
KINDS = (FILE, DIR, SYMLINK)

MAX_LINK_TARGET_BYTES = 4095  # PATH_MAX - 1 on Linux: what readlink can return

DIR_HASH = xxhash.xxh3_128(b"ironsync:dir").digest()


def link_hash(target: str) -> bytes:
    """The content hash of a symlink whose target is `target`."""
    return xxhash.xxh3_128(b"ironsync:symlink:" + target.encode("utf-8")).digest()


def kind_label(kind: str) -> str:
    """How a person reads a kind: file, folder, symlink."""
    return "folder" if kind == DIR else kind
