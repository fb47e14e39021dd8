"""The plainest attack: look for a user's memory, verbatim, in what leaves the node and on disk.

A memory's texts must never appear outside the encrypted store: not in a message to the
server, not in a file of the home. The scan reads every captured message and every file
of the homes as raw bytes and looks for each stored text in UTF-8 and UTF-16 (little and
big endian), so a text that went out inside a JSON string, a protobuf field or a Windows
file is found too. A scan that finds nothing proves little unless it would have found a
leak: :func:`scan_with_control` first plants one and fails loudly if it is missed.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from fedpal.common.errors import FedpalError

ENCODINGS = ("utf-8", "utf-16-le", "utf-16-be")
MIN_NEEDLE = 12
"""Shorter texts could match by chance inside tensor bytes; every memory text here is longer."""
CONTROL_FILE = ".fedpal-leak-control"


@dataclass(frozen=True)
class Leak:
    """One stored text found in one file or message."""

    path: str
    text: str
    encoding: str

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class LeakScan:
    """What a scan looked at and found; ``control_found`` says the planted text was detected."""

    files: int
    bytes: int
    needles: int
    leaks: tuple[Leak, ...]
    control_found: bool

    def to_dict(self) -> dict:
        return {
            "files": self.files,
            "bytes": self.bytes,
            "needles": self.needles,
            "control_found": self.control_found,
            "leaks": [leak.to_dict() for leak in self.leaks],
        }


def _files(roots: Iterable[Path]) -> list[Path]:
    found = []
    for root in roots:
        if root.is_file():
            found.append(root)
        elif root.is_dir():
            found.extend(path for path in sorted(root.rglob("*")) if path.is_file())
    return found


def scan(roots: Iterable[Path], needles: Sequence[str]) -> LeakScan:
    """Every file under ``roots`` searched for every needle in every encoding of :data:`ENCODINGS`."""
    texts = sorted({text for text in needles if len(text) >= MIN_NEEDLE})
    leaks, total, files = [], 0, _files(roots)
    for path in files:
        data = path.read_bytes()
        total += len(data)
        for text in texts:
            # one finding per text and file (ASCII in UTF-16-BE also reads as UTF-16-LE one byte on)
            encoding = next((e for e in ENCODINGS if text.encode(e) in data), None)
            if encoding is not None:
                leaks.append(Leak(str(path), text, encoding))
    return LeakScan(len(files), total, len(texts), tuple(leaks), control_found=False)


def scan_with_control(roots: Sequence[Path], needles: Sequence[str]) -> LeakScan:
    """:func:`scan`, after proving on a planted copy of one needle (UTF-16) that it finds leaks.

    The control file is written into the first root, scanned with the rest, reported
    as ``control_found`` and removed; it never counts as a leak.
    """
    texts = [text for text in needles if len(text) >= MIN_NEEDLE]
    if not texts or not roots:
        raise FedpalError("a leak scan needs texts to look for and somewhere to look")
    control = Path(roots[0]) / CONTROL_FILE
    control.write_bytes(b"\x00header\x00" + texts[0].encode("utf-16-le") + b"\x00")
    try:
        result = scan(roots, texts)
    finally:
        control.unlink()
    found = any(leak.path == str(control) for leak in result.leaks)
    if not found:
        raise RuntimeError("the leak scan missed its planted control: its findings cannot be trusted")
    leaks = tuple(leak for leak in result.leaks if leak.path != str(control))
    return LeakScan(result.files - 1, result.bytes, result.needles, leaks, control_found=True)
