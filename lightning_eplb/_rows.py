"""Row sets of a ``(rows, D)`` tensor handled as slices where they run, for the replica sync.

A set of row indices with at most ``MAX_RUNS`` runs of consecutive rows is handled slice by
slice (views, in-place adds, no gathered copy); others through one gathered copy, with the
rows moved as wide integers (``_dispatch.wide_rows``) and adds done without atomics.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from lightning_eplb._dispatch import wide_rows

MAX_RUNS = 8  # row sets of at most this many runs are handled as slices (no copies)


def _runs(*columns: list[int]) -> list[tuple[tuple[int, ...], int]]:
    """The maximal runs over which every column advances by one together: ``(first value
    of each column, length)``."""
    runs: list[tuple[tuple[int, ...], int]] = []
    for values in zip(*columns, strict=True):
        if runs and all(v == f + runs[-1][1] for v, f in zip(values, runs[-1][0], strict=True)):
            runs[-1] = (runs[-1][0], runs[-1][1] + 1)
        else:
            runs.append((values, 1))
    return runs


def message_sizes(rows: list[int]) -> list[int]:
    """How the rows sent to one peer are split into messages: one per run (sent straight
    from the gradient, no copy) when there are at most ``MAX_RUNS``, else one packed copy.
    Sender and receiver compute it from the same rows."""
    runs = _runs(rows)
    return [n for _, n in runs] if len(runs) <= MAX_RUNS else [len(rows)]


@dataclass(frozen=True)
class Rows:
    """Row indices on a device, plus their runs when there are at most ``MAX_RUNS``: the
    rows are then handled as slices (views for sends, in-place adds, no gathered copies)."""

    index: Tensor
    runs: tuple[tuple[int, int, int], ...] | None  # (position in the rows, first row, length)

    @classmethod
    def of(cls, rows: Tensor, device: torch.device) -> Rows:
        runs, pos = [], 0
        for (start,), n in _runs(rows.tolist()):
            runs.append((pos, start, n))
            pos += n
        return cls(rows.to(device, non_blocking=True), tuple(runs) if len(runs) <= MAX_RUNS else None)

    def __len__(self) -> int:
        return int(self.index.numel())

    def parts(self, src: Tensor) -> list[Tensor]:
        """``src[rows]`` as the messages of :func:`message_sizes`: views, or one copy."""
        if self.runs is not None:
            return [src[start : start + n] for _, start, n in self.runs]
        return [self.take(src)]

    def take(self, src: Tensor) -> Tensor:
        """``src[rows]``: a view for one run, else a gathered copy."""
        if self.runs is not None and len(self.runs) == 1:
            _, start, n = self.runs[0]
            return src[start : start + n]
        return wide_rows(src).index_select(0, self.index).view(src.dtype)

    def put(self, dst: Tensor, values: Tensor) -> None:
        """``dst[rows] = values``."""
        if self.runs is not None:
            for pos, start, n in self.runs:
                dst[start : start + n].copy_(values[pos : pos + n])
        else:
            wide_rows(dst).index_copy_(0, self.index, wide_rows(values.contiguous()))

    def add(self, dst: Tensor, values: Tensor) -> None:
        """``dst[rows] += values`` (rows are unique: one rounding per element, as ``a + b``)."""
        if self.runs is not None:
            for pos, start, n in self.runs:
                dst[start : start + n].add_(values[pos : pos + n])
        else:  # gather, add, write back: no atomic adds
            self.put(dst, self.take(dst) + values)


@dataclass(frozen=True)
class Pair:
    """``dst[dst_rows] op= src[src_rows]`` row for row; by slices where both sides run
    together in at most ``MAX_RUNS`` pieces, else through a gathered copy of the source."""

    dst: Rows
    src: Rows
    segments: tuple[tuple[int, int, int], ...] | None  # (dst start, src start, length)

    @classmethod
    def of(cls, dst: Tensor, src: Tensor, device: torch.device) -> Pair:
        segments = [(d, s, n) for (d, s), n in _runs(dst.tolist(), src.tolist())]
        fits = len(segments) <= MAX_RUNS
        return cls(Rows.of(dst, device), Rows.of(src, device), tuple(segments) if fits else None)

    def flipped(self) -> Pair:
        """The same rows the other way: ``src[src_rows] op= dst[dst_rows]``."""
        segments = None if self.segments is None else tuple((s, d, n) for d, s, n in self.segments)
        return Pair(self.src, self.dst, segments)

    def add(self, dst: Tensor, src: Tensor) -> None:
        """``dst[dst_rows] += src[src_rows]``."""
        self._apply(dst, src, add=True)

    def copy(self, dst: Tensor, src: Tensor) -> None:
        """``dst[dst_rows] = src[src_rows]``."""
        self._apply(dst, src, add=False)

    def _apply(self, dst: Tensor, src: Tensor, add: bool) -> None:
        if self.segments is None:
            (self.dst.add if add else self.dst.put)(dst, self.src.take(src))
            return
        for d, s, n in self.segments:
            part = dst[d : d + n]
            part.add_(src[s : s + n]) if add else part.copy_(src[s : s + n])
