"""Checksums of revision files that survive a checkout on another operating system."""

from __future__ import annotations

import hashlib
from pathlib import Path

CHECKSUM_PREFIX = "sha256:"


def normalized_text(data: bytes) -> str:
    """Return the file's text without a byte-order mark, line-end style or trailing whitespace."""
    # utf-8-sig drops a leading BOM; surrogateescape keeps undecodable bytes distinct.
    text = data.decode("utf-8-sig", errors="surrogateescape")
    lines = [line.rstrip() for line in text.splitlines()]
    while lines and not lines[-1]:
        lines.pop()
    return "\n".join(lines)


def revision_checksum(path: str | Path) -> str:
    """Return ``sha256:<hex>`` of the normalized content of the revision file at ``path``."""
    text = normalized_text(Path(path).read_bytes())
    digest = hashlib.sha256(text.encode("utf-8", errors="surrogateescape")).hexdigest()
    return CHECKSUM_PREFIX + digest
