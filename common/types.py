"""Data that flows from the preference memory to the trainer and the simulator."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class PreferencePair:
    """One DPO example: for ``prompt`` the user prefers ``chosen`` over ``rejected``."""

    prompt: str
    chosen: str
    rejected: str
    source_id: str | None = None
    system: str | None = None
    """System message shown with the prompt (e.g. the user's stated preferences), as at generation."""


@dataclass(frozen=True)
class SFTExample:
    """One supervised example: for ``prompt`` the user wants ``response``."""

    prompt: str
    response: str
    source_id: str | None = None
    system: str | None = None
    """System message shown with the prompt, as for :class:`PreferencePair`."""
