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


def _runs(values: list[int]) -> list[tuple[int, int]]:
    """``(start, length)`` of the maximal runs ``v, v + 1, ...`` of ``values``."""
    runs: list[tuple[int, int]] = []
    for v in values:
        if runs and runs[-1][0] + runs[-1][1] == v:
            runs[-1] = (runs[-1][0], runs[-1][1] + 1)
        else:
            runs.append((v, 1))
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
    runs: tuple[tuple[int, int], ...] | None

    @classmethod
    def of(cls, rows: Tensor, device: torch.device) -> Rows:
        runs = _runs(rows.tolist())
        return cls(rows.to(device, non_blocking=True), tuple(runs) if len(runs) <= MAX_RUNS else None)

    def __len__(self) -> int:
        return int(self.index.numel())

    def _slices(self) -> list[tuple[int, slice]]:
        """(position in the rows, slice of the indexed tensor) per run."""
        assert self.runs is not None
        out, pos = [], 0
        for start, n in self.runs:
            out.append((pos, slice(start, start + n)))
            pos += n
        return out

    def parts(self, src: Tensor) -> list[Tensor]:
        """``src[rows]`` as the messages of :func:`message_sizes`: views, or one copy."""
        if self.runs is not None:
            return [src[rows] for _, rows in self._slices()]
        return [self.take(src)]

    def take(self, src: Tensor) -> Tensor:
        """``src[rows]``: a view for one run, else a gathered copy."""
        if self.runs is not None and len(self.runs) == 1:
            return src[self._slices()[0][1]]
        return wide_rows(src).index_select(0, self.index).view(src.dtype)

    def put(self, dst: Tensor, values: Tensor) -> None:
        """``dst[rows] = values``."""
        if self.runs is not None:
            for pos, rows in self._slices():
                dst[rows].copy_(values[pos : pos + rows.stop - rows.start])
        else:
            wide_rows(dst).index_copy_(0, self.index, wide_rows(values.contiguous()))

    def add(self, dst: Tensor, values: Tensor) -> None:
        """``dst[rows] += values`` (rows are unique: one rounding per element, as ``a + b``)."""
        if self.runs is not None:
            for pos, rows in self._slices():
                dst[rows].add_(values[pos : pos + rows.stop - rows.start])
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
        pairs = list(zip(dst.tolist(), src.tolist(), strict=True))
        segments: list[tuple[int, int, int]] = []
        for d, s in pairs:
            if segments and segments[-1][0] + segments[-1][2] == d and segments[-1][1] + segments[-1][2] == s:
                segments[-1] = (segments[-1][0], segments[-1][1], segments[-1][2] + 1)
            else:
                segments.append((d, s, 1))
        fits = len(segments) <= MAX_RUNS
        return cls(Rows.of(dst, device), Rows.of(src, device), tuple(segments) if fits else None)

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
