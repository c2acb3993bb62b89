"""Revision checksums: what counts as an edit and what does not."""

from __future__ import annotations

from pathlib import Path

from alembic_sgp_lock._checksum import revision_checksum

ORIGINAL = 'def upgrade():\n    op.execute("SELECT 1")\n'


def checksum_of(tmp_path: Path, name: str, data: bytes) -> str:
    path = tmp_path / name
    path.write_bytes(data)
    return revision_checksum(path)


def test_line_endings_ignored(tmp_path: Path) -> None:
    unix = checksum_of(tmp_path, "lf.py", ORIGINAL.encode())
    windows = checksum_of(tmp_path, "crlf.py", ORIGINAL.replace("\n", "\r\n").encode())
    old_mac = checksum_of(tmp_path, "cr.py", ORIGINAL.replace("\n", "\r").encode())

    assert windows == unix
    assert old_mac == unix


def test_byte_order_mark_ignored(tmp_path: Path) -> None:
    plain = checksum_of(tmp_path, "plain.py", ORIGINAL.encode())
    with_bom = checksum_of(tmp_path, "bom.py", b"\xef\xbb\xbf" + ORIGINAL.encode())

    assert with_bom == plain


def test_trailing_whitespace_ignored(tmp_path: Path) -> None:
    plain = checksum_of(tmp_path, "plain.py", ORIGINAL.encode())
    padded = checksum_of(
        tmp_path, "padded.py", ORIGINAL.replace("\n", "  \t\n").encode() + b"\n\n"
    )

    assert padded == plain


def test_real_edit_detected(tmp_path: Path) -> None:
    plain = checksum_of(tmp_path, "plain.py", ORIGINAL.encode())
    edited = checksum_of(tmp_path, "edited.py", ORIGINAL.replace("SELECT 1", "SELECT 2").encode())
    reindented = checksum_of(tmp_path, "indent.py", ORIGINAL.replace("    op", "  op").encode())

    assert edited != plain
    assert reindented != plain
    assert plain.startswith("sha256:")
