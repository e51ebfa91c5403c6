"""Load traces: what the experts received during a run, and what each rearrangement did.

A trace is one ``.npz`` file (``numpy.savez_compressed``) holding only plain numeric and
string arrays, so ``numpy.load(path)`` reads it without this library and without pickle.
Format version 1; ``T`` recorded windows, ``K`` rearrangements, ``L`` layers, ``E`` logical
experts, ``P`` physical slots:

=========================  ===============  ==================================================
name                       shape, dtype     meaning
=========================  ===============  ==================================================
``format_version``         ``()`` int64     1; readers reject newer versions
``writer``                 ``()`` str       ``"lightning_eplb <version>"``
``num_layers``             ``()`` int64     ``L``
``num_logical``            ``()`` int64     ``E``
``num_physical``           ``()`` int64     ``P``
``num_ranks``              ``()`` int64     ``N`` expert-parallel ranks (``P % N == 0``)
``steps``                  ``(T,)`` int64   optimizer step at which each load was recorded
``loads``                  ``(T, L, E)``    tokens per layer and logical expert of each
                           float64          recorded step or window
``rearrangement_steps``    ``(K,)`` int64   optimizer step of each rearrangement
``placements_before``      ``(K, L, P)``    ``physical_to_logical`` in force before it
                           int64
``placements``             ``(K, L, P)``    ``physical_to_logical`` it installed
                           int64
``balancedness_before``    ``(K,)`` f64     balancedness of the old placement on its window
``balancedness_after``     ``(K,)`` f64     balancedness of the new placement on its window
``slots_changed``          ``(K,)`` int64   slots whose logical expert changed
``bytes_moved``            ``(K,)`` int64   bytes the migration sent (as reported)
``seconds``                ``(K,)`` f64     wall time the rearrangement took
=========================  ===============  ==================================================

SGLang's expert-distribution files (JSON ``{"logical_count": [[int] * E] * layers}``) are read
by :func:`read_sglang`.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

import numpy as np
import torch
from torch import Tensor

__all__ = ["FORMAT_VERSION", "Trace", "TraceWriter", "read_loads", "read_sglang", "read_trace"]

FORMAT_VERSION = 1

_SCALARS = ("format_version", "num_layers", "num_logical", "num_physical", "num_ranks")
_ARRAYS = (
    "steps",
    "loads",
    "rearrangement_steps",
    "placements_before",
    "placements",
    "balancedness_before",
    "balancedness_after",
    "slots_changed",
    "bytes_moved",
    "seconds",
)


@dataclass(frozen=True)
class Trace:
    """A trace read back from disk (see the module docstring for the file format).

    Tensors are CPU tensors; their shapes use ``T`` windows, ``K`` rearrangements.

    Args:
        format_version: version of the file.
        num_ranks: ``N`` expert-parallel ranks of the recorded run.
        num_physical: ``P`` physical slots per layer.
        steps: ``(T,)`` int64 optimizer step of each load record.
        loads: ``(T, L, E)`` float64 tokens per layer and logical expert.
        rearrangement_steps: ``(K,)`` int64.
        placements_before: ``(K, L, P)`` int64 ``physical_to_logical`` before each rearrangement.
        placements: ``(K, L, P)`` int64 ``physical_to_logical`` after each rearrangement.
        balancedness_before: ``(K,)`` float64.
        balancedness_after: ``(K,)`` float64.
        slots_changed: ``(K,)`` int64.
        bytes_moved: ``(K,)`` int64.
        seconds: ``(K,)`` float64.

    Example:
        >>> import tempfile, os
        >>> path = os.path.join(tempfile.mkdtemp(), "t.npz")
        >>> with TraceWriter(path, num_layers=1, num_logical=2, num_physical=2, num_ranks=1) as w:
        ...     w.add_window(10, torch.tensor([[3, 1]]))
        >>> trace = read_trace(path)
        >>> trace.loads.shape, trace.steps.tolist()
        (torch.Size([1, 1, 2]), [10])
    """

    format_version: int
    num_ranks: int
    num_physical: int
    steps: Tensor
    loads: Tensor
    rearrangement_steps: Tensor
    placements_before: Tensor
    placements: Tensor
    balancedness_before: Tensor
    balancedness_after: Tensor
    slots_changed: Tensor
    bytes_moved: Tensor
    seconds: Tensor

    @property
    def num_layers(self) -> int:
        return int(self.loads.shape[1])

    @property
    def num_logical(self) -> int:
        return int(self.loads.shape[2])

    @property
    def num_rearrangements(self) -> int:
        return int(self.rearrangement_steps.shape[0])


class TraceWriter:
    """Collect load windows and rearrangement events, write them as one ``.npz`` trace.

    The file is rewritten whole (to a temporary file in the same directory, then renamed
    over ``path``) every ``flush_every`` records, at most every ``flush_seconds`` seconds,
    and on :meth:`close`, so a reader never sees a half-written file and a crashed run keeps
    its trace up to the last flush.

    Args:
        path: where to write (``.npz`` is appended when missing).
        num_layers: ``L`` MoE layers.
        num_logical: ``E`` logical experts per layer.
        num_physical: ``P`` physical slots per layer.
        num_ranks: ``N`` expert-parallel ranks.
        flush_every: rewrite the file after this many new records (windows or rearrangements).
        flush_seconds: ... or once this many seconds passed since the last write.

    Example:
        >>> import tempfile, os
        >>> path = os.path.join(tempfile.mkdtemp(), "trace.npz")
        >>> w = TraceWriter(path, num_layers=1, num_logical=2, num_physical=4, num_ranks=2)
        >>> w.add_window(1, torch.tensor([[5.0, 1.0]]))
        >>> w.add_rearrangement(1, torch.tensor([[0, 1, 0, 1]]), torch.tensor([[0, 0, 0, 1]]),
        ...                     0.6, 0.9, bytes_moved=128, seconds=0.01)
        >>> w.close()
        >>> import numpy as np
        >>> np.load(path)["slots_changed"].tolist()
        [1]
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        num_layers: int,
        num_logical: int,
        num_physical: int,
        num_ranks: int,
        *,
        flush_every: int = 50,
        flush_seconds: float = 300.0,
    ) -> None:
        for name, value in (
            ("num_layers", num_layers),
            ("num_logical", num_logical),
            ("num_ranks", num_ranks),
        ):
            if int(value) < 1:
                raise ValueError(f"{name} ({value}) must be >= 1")
        if num_physical < num_logical:
            raise ValueError(f"num_physical ({num_physical}) must be >= num_logical ({num_logical})")
        if num_physical % num_ranks:
            raise ValueError(f"num_physical ({num_physical}) must be divisible by num_ranks ({num_ranks})")
        if flush_every < 1:
            raise ValueError(f"flush_every ({flush_every}) must be >= 1")
        path = Path(path)
        self.path = path if path.suffix == ".npz" else path.with_name(path.name + ".npz")
        self.num_layers, self.num_logical = int(num_layers), int(num_logical)
        self.num_physical, self.num_ranks = int(num_physical), int(num_ranks)
        self.flush_every, self.flush_seconds = int(flush_every), float(flush_seconds)
        self._steps: list[int] = []
        self._loads: list[np.ndarray] = []
        self._events: list[tuple[int, np.ndarray, np.ndarray, float, float, int, float]] = []
        self._unflushed = 0
        self._last_flush = time.monotonic()
        self._closed = False

    # ------------------------------------------------------------------ recording
    def add_window(self, step: int, load_LE: Tensor | np.ndarray) -> None:
        """Record the load of one step or window.

        Args:
            step: optimizer step the load belongs to (e.g. the step of the rearrangement).
            load_LE: ``(L, E)`` tokens per layer and logical expert, any device and dtype.
        """
        self._check_open()
        load = _to_numpy(load_LE, np.float64)
        if load.shape != (self.num_layers, self.num_logical):
            raise ValueError(
                f"load_LE has shape {load.shape}, expected (L, E) = ({self.num_layers}, {self.num_logical})"
            )
        self._steps.append(int(step))
        self._loads.append(load)
        self._record()

    def add_rearrangement(
        self,
        step: int,
        old_p2l_LP: Tensor | np.ndarray,
        new_p2l_LP: Tensor | np.ndarray,
        balancedness_before: float,
        balancedness_after: float,
        bytes_moved: int,
        seconds: float,
    ) -> None:
        """Record one rearrangement.

        Args:
            step: optimizer step at which it happened.
            old_p2l_LP: ``(L, P)`` ``physical_to_logical`` before.
            new_p2l_LP: ``(L, P)`` ``physical_to_logical`` after.
            balancedness_before: of the old placement on the window it was computed from.
            balancedness_after: of the new placement on that window.
            bytes_moved: bytes the migration moved (e.g. summed over ranks).
            seconds: wall time of the rearrangement.
        """
        self._check_open()
        old, new = _to_numpy(old_p2l_LP, np.int64), _to_numpy(new_p2l_LP, np.int64)
        for name, p2l in (("old_p2l_LP", old), ("new_p2l_LP", new)):
            if p2l.shape != (self.num_layers, self.num_physical):
                raise ValueError(
                    f"{name} has shape {p2l.shape}, expected (L, P) = ({self.num_layers}, {self.num_physical})"
                )
        self._events.append(
            (
                int(step),
                old,
                new,
                float(balancedness_before),
                float(balancedness_after),
                int(bytes_moved),
                float(seconds),
            )
        )
        self._record()

    def flush(self) -> None:
        """Write everything recorded so far (atomically: temporary file, then rename)."""
        arrays = self._arrays()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=".tmp", dir=self.path.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                np.savez_compressed(f, **arrays)  # type: ignore[arg-type]
            os.replace(tmp, self.path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        self._unflushed = 0
        self._last_flush = time.monotonic()

    def close(self) -> None:
        """Flush and stop recording. Closing twice is harmless."""
        if not self._closed:
            self.flush()
            self._closed = True

    def __enter__(self) -> TraceWriter:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    # ------------------------------------------------------------------ internals
    def _check_open(self) -> None:
        if self._closed:
            raise ValueError(f"TraceWriter for {self.path} is closed")

    def _record(self) -> None:
        self._unflushed += 1
        if self._unflushed >= self.flush_every or time.monotonic() - self._last_flush >= self.flush_seconds:
            self.flush()

    def _arrays(self) -> dict[str, np.ndarray]:
        from lightning_eplb import __version__

        L, E, P = self.num_layers, self.num_logical, self.num_physical
        ev = self._events
        placements_before = np.stack([e[1] for e in ev]) if ev else np.zeros((0, L, P), np.int64)
        placements = np.stack([e[2] for e in ev]) if ev else np.zeros((0, L, P), np.int64)
        return {
            "format_version": np.array(FORMAT_VERSION, np.int64),
            "writer": np.array(f"lightning_eplb {__version__}"),
            "num_layers": np.array(L, np.int64),
            "num_logical": np.array(E, np.int64),
            "num_physical": np.array(P, np.int64),
            "num_ranks": np.array(self.num_ranks, np.int64),
            "steps": np.array(self._steps, np.int64),
            "loads": np.stack(self._loads) if self._loads else np.zeros((0, L, E), np.float64),
            "rearrangement_steps": np.array([e[0] for e in ev], np.int64),
            "placements_before": placements_before,
            "placements": placements,
            "balancedness_before": np.array([e[3] for e in ev], np.float64),
            "balancedness_after": np.array([e[4] for e in ev], np.float64),
            "slots_changed": (placements_before != placements).sum(axis=(1, 2)).astype(np.int64),
            "bytes_moved": np.array([e[5] for e in ev], np.int64),
            "seconds": np.array([e[6] for e in ev], np.float64),
        }


# ---------------------------------------------------------------------- readers
def read_trace(path: str | os.PathLike[str]) -> Trace:
    """Read a trace written by :class:`TraceWriter`.

    Raises:
        FileNotFoundError: if ``path`` does not exist.
        ValueError: if the file is not a trace, is of a newer format, or its arrays disagree.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"trace file {str(path)!r} does not exist")
    try:
        with np.load(path, allow_pickle=False) as npz:
            data = {k: npz[k] for k in npz.files}
    except (OSError, ValueError) as err:
        raise ValueError(f"{str(path)!r} is not a readable .npz trace: {err}") from err
    missing = [k for k in (*_SCALARS, *_ARRAYS) if k not in data]
    if missing:
        raise ValueError(f"{str(path)!r} is not a lightning_eplb trace: missing arrays {missing}")
    version = int(data["format_version"])
    if version > FORMAT_VERSION:
        raise ValueError(
            f"{str(path)!r} has trace format_version {version}; this lightning_eplb reads <= {FORMAT_VERSION}, upgrade it"
        )
    L, E, P, N = (int(data[k]) for k in _SCALARS[1:])
    T, K = len(data["steps"]), len(data["rearrangement_steps"])
    expected = {
        "steps": (T,),
        "loads": (T, L, E),
        "placements_before": (K, L, P),
        "placements": (K, L, P),
        **{
            k: (K,)
            for k in ("balancedness_before", "balancedness_after", "slots_changed", "bytes_moved", "seconds")
        },
    }
    for key, shape in expected.items():
        if data[key].shape != shape:
            raise ValueError(f"{str(path)!r}: array {key!r} has shape {data[key].shape}, expected {shape}")
    t = {k: torch.from_numpy(np.ascontiguousarray(data[k])) for k in _ARRAYS}
    return Trace(format_version=version, num_ranks=N, num_physical=P, **t)


def read_sglang(path: str | os.PathLike[str], *, drop_dense: bool = True) -> Tensor:
    """Read an SGLang expert-distribution file ``{"logical_count": [[int] * E] * layers}``.

    Rows that are all zero are dense (non-MoE) layers, e.g. DeepSeek-V3's first three; they
    are dropped unless ``drop_dense=False``.

    Returns:
        ``(L, E)`` float64 tokens per MoE layer and logical expert.

    Raises:
        FileNotFoundError: if ``path`` does not exist.
        ValueError: if the file is not JSON, has no ``logical_count``, has ragged or
            non-numeric rows, negative counts, or no non-zero row.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"load file {str(path)!r} does not exist")
    try:
        with open(path) as f:
            doc = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{str(path)!r} is not valid JSON: {err}") from err
    if not isinstance(doc, dict) or "logical_count" not in doc:
        raise ValueError(
            f"{str(path)!r} has no 'logical_count' key; expected SGLang's {{'logical_count': [[...]]}}"
        )
    rows = doc["logical_count"]
    if not isinstance(rows, list) or not rows or not all(isinstance(r, list) for r in rows):
        raise ValueError(
            f"{str(path)!r}: 'logical_count' must be a non-empty list of rows (layers x experts)"
        )
    lengths = sorted({len(r) for r in rows})
    if len(lengths) != 1 or lengths[0] == 0:
        raise ValueError(f"{str(path)!r}: 'logical_count' rows are ragged or empty (row lengths {lengths})")
    try:
        load = torch.tensor(rows, dtype=torch.float64)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{str(path)!r}: 'logical_count' holds non-numeric entries: {err}") from err
    if not torch.isfinite(load).all() or (load < 0).any():
        raise ValueError(f"{str(path)!r}: 'logical_count' must hold finite non-negative counts")
    if drop_dense:
        load = load[load.sum(dim=1) > 0]
        if load.shape[0] == 0:
            raise ValueError(f"{str(path)!r}: every row of 'logical_count' is zero")
    return load


def read_loads(path: str | os.PathLike[str]) -> Tensor:
    """Read loads from a trace (``.npz``) or an SGLang file (``.json``).

    Returns:
        ``(T, L, E)`` float64: a trace's recorded loads, or an SGLang file as ``T = 1``.
    """
    path = Path(path)
    if path.suffix == ".json":
        return read_sglang(path).unsqueeze(0)
    if path.suffix == ".npz":
        return read_trace(path).loads
    raise ValueError(
        f"{str(path)!r}: unknown load file type {path.suffix!r}; expected a .npz trace or SGLang .json"
    )


def _to_numpy(x: Tensor | np.ndarray, dtype: type) -> np.ndarray:
    if isinstance(x, Tensor):
        x = x.detach().to("cpu", torch.float64 if dtype is np.float64 else torch.int64).numpy()
    return np.array(x, dtype=dtype, copy=True)
