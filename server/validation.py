"""Checks on client updates before they reach aggregation.

Flower's legacy ``Parameters`` carry an ordered list of arrays without names, so a client
also sends a fingerprint of the tensor names and shapes it trained; a client that trained
a differently named or shaped adapter is caught even where two tensors share a shape.
Under SecAgg+ the server only ever sees the sum, so per-client checks are impossible
there by design: the client checks its own update and the server checks the aggregate.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from fedpal.common.adapters import adapter_fingerprint


@dataclass(frozen=True)
class UpdateSpec:
    """What a valid update looks like: the global adapter's names and shapes, a norm limit."""

    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    fingerprint: str
    max_norm: float

    @classmethod
    def of(cls, arrays: Mapping[str, np.ndarray], max_norm: float) -> "UpdateSpec":
        return cls(
            names=tuple(arrays),
            shapes=tuple(tuple(np.shape(a)) for a in arrays.values()),
            fingerprint=adapter_fingerprint(arrays),
            max_norm=max_norm,
        )


def update_norm(new: Sequence[np.ndarray], old: Sequence[np.ndarray]) -> float:
    """L2 norm of ``new - old`` over all tensors, in float64."""
    total = 0.0
    for a, b in zip(new, old, strict=True):
        diff = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
        total += float(np.sum(diff * diff))
    return math.sqrt(total)


def check_update(
    spec: UpdateSpec,
    global_arrays: Sequence[np.ndarray],
    arrays: Sequence[np.ndarray],
    fingerprint: object,
) -> str | None:
    """Why this update must be rejected, or None when it is fine.

    Order matters for the message: a wrong layout is reported before the values in it.
    """
    if fingerprint != spec.fingerprint:
        return (
            f"tensor names/shapes fingerprint {fingerprint!r} does not match the global adapter's {spec.fingerprint!r}"
        )
    if len(arrays) != len(spec.shapes):
        return f"{len(arrays)} tensors where the global adapter has {len(spec.shapes)}"
    for name, shape, array in zip(spec.names, spec.shapes, arrays):
        if tuple(np.shape(array)) != shape:
            return f"tensor {name} has shape {tuple(np.shape(array))}, expected {shape}"
        if not np.issubdtype(np.asarray(array).dtype, np.floating):
            return f"tensor {name} has dtype {np.asarray(array).dtype}, expected floating point"
    for name, array in zip(spec.names, arrays):
        if not np.all(np.isfinite(array)):
            return f"tensor {name} has non-finite values (NaN or Inf)"
    norm = update_norm(arrays, global_arrays)
    if norm > spec.max_norm:
        return f"update norm {norm:.4g} exceeds the limit {spec.max_norm:.4g}"
    return None


def check_aggregate(spec: UpdateSpec, arrays: Sequence[np.ndarray]) -> str | None:
    """Why an aggregate (e.g. SecAgg+'s sum) must not become the global adapter, or None."""
    if len(arrays) != len(spec.shapes):
        return f"aggregate has {len(arrays)} tensors where the global adapter has {len(spec.shapes)}"
    for name, shape, array in zip(spec.names, spec.shapes, arrays):
        if tuple(np.shape(array)) != shape:
            return f"aggregate tensor {name} has shape {tuple(np.shape(array))}, expected {shape}"
        if not np.all(np.isfinite(array)):
            return f"aggregate tensor {name} has non-finite values"
    return None
