"""Traces round-trip exactly, read with numpy alone; SGLang load files parse; bad files fail clearly."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from lightning_eplb.trace import FORMAT_VERSION, TraceWriter, read_loads, read_sglang, read_trace

LOADS_DIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "loads"
needs_loads = pytest.mark.skipif(not LOADS_DIR.is_dir(), reason=f"shared load files not found at {LOADS_DIR}")


def _write_example(path: Path, **kwargs: int) -> dict[str, torch.Tensor]:
    """A trace of L=2 layers, E=4 experts, P=6 slots, N=3 ranks: 3 windows, 2 rearrangements."""
    gen = torch.Generator().manual_seed(0)
    loads = [
        torch.randint(0, 1000, (2, 4), generator=gen),  # integer counts
        torch.rand(2, 4, generator=gen, dtype=torch.float64) * 1e6,  # float64 kept bit-exact
        torch.zeros(2, 4, dtype=torch.float32),  # zero load
    ]
    p0 = torch.tensor([[0, 1, 2, 3, 0, 1], [0, 1, 2, 3, 0, 1]])
    p1 = torch.tensor([[0, 0, 1, 2, 3, 3], [0, 1, 2, 3, 0, 1]])  # layer 0: slots 1-5 change (5)
    p2 = torch.tensor(
        [[3, 0, 1, 2, 0, 3], [1, 0, 2, 3, 0, 1]]
    )  # slots 0, 4 of layer 0 and 0, 1 of layer 1 (4)
    with TraceWriter(path, num_layers=2, num_logical=4, num_physical=6, num_ranks=3, **kwargs) as w:
        w.add_window(100, loads[0])
        w.add_rearrangement(100, p0, p1, 0.5, 0.75, bytes_moved=4096, seconds=0.25)
        w.add_window(200, loads[1].numpy())
        w.add_rearrangement(200, p1, p2, 0.7, 0.9, bytes_moved=0, seconds=1.5)
        w.add_window(250, loads[2])
    return {
        "loads": torch.stack([x.double() for x in loads]),
        "before": torch.stack([p0, p1]),
        "after": torch.stack([p1, p2]),
    }


def test_round_trip_exact(tmp_path: Path) -> None:
    ref = _write_example(tmp_path / "trace.npz")
    trace = read_trace(tmp_path / "trace.npz")
    assert (trace.format_version, trace.num_ranks, trace.num_physical) == (FORMAT_VERSION, 3, 6)
    assert (trace.num_layers, trace.num_logical, trace.num_rearrangements) == (2, 4, 2)
    assert torch.equal(trace.steps, torch.tensor([100, 200, 250]))
    assert trace.loads.dtype == torch.float64 and torch.equal(trace.loads, ref["loads"])
    assert torch.equal(trace.rearrangement_steps, torch.tensor([100, 200]))
    assert torch.equal(trace.placements_before, ref["before"])
    assert torch.equal(trace.placements, ref["after"])
    assert torch.equal(trace.balancedness_before, torch.tensor([0.5, 0.7], dtype=torch.float64))
    assert torch.equal(trace.balancedness_after, torch.tensor([0.75, 0.9], dtype=torch.float64))
    assert torch.equal(trace.slots_changed, torch.tensor([5, 4]))
    assert torch.equal(trace.bytes_moved, torch.tensor([4096, 0]))
    assert torch.equal(trace.seconds, torch.tensor([0.25, 1.5], dtype=torch.float64))


def test_readable_with_numpy_alone(tmp_path: Path) -> None:
    ref = _write_example(tmp_path / "trace.npz")
    with np.load(tmp_path / "trace.npz", allow_pickle=False) as npz:
        assert int(npz["format_version"]) == FORMAT_VERSION
        assert str(npz["writer"]).startswith("lightning_eplb ")
        assert [int(npz[k]) for k in ("num_layers", "num_logical", "num_physical", "num_ranks")] == [
            2,
            4,
            6,
            3,
        ]
        assert npz["loads"].shape == (3, 2, 4)
        np.testing.assert_array_equal(npz["loads"], ref["loads"].numpy())
        np.testing.assert_array_equal(npz["placements"], ref["after"].numpy())


def test_flush_is_periodic_and_atomic(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "run"  # ".npz" is appended, the folder created
    w = TraceWriter(path, num_layers=1, num_logical=2, num_physical=2, num_ranks=1, flush_every=2)
    assert w.path == tmp_path / "sub" / "run.npz"
    w.add_window(1, torch.tensor([[1, 2]]))
    assert not w.path.exists()
    w.add_window(2, torch.tensor([[3, 4]]))
    assert torch.equal(read_trace(w.path).steps, torch.tensor([1, 2]))  # flushed after 2 records
    w.add_window(3, torch.tensor([[5, 6]]))
    assert read_trace(w.path).loads.shape[0] == 2  # not yet
    w.close()
    w.close()  # harmless
    assert read_trace(w.path).loads[:, 0].tolist() == [[1, 2], [3, 4], [5, 6]]
    assert sorted(p.name for p in w.path.parent.iterdir()) == ["run.npz"]  # no temporary file left
    with pytest.raises(ValueError, match="closed"):
        w.add_window(4, torch.tensor([[1, 1]]))


def test_empty_trace_and_writer_errors(tmp_path: Path) -> None:
    with TraceWriter(tmp_path / "e.npz", num_layers=3, num_logical=4, num_physical=8, num_ranks=2):
        pass
    trace = read_trace(tmp_path / "e.npz")
    assert trace.loads.shape == (0, 3, 4) and trace.placements.shape == (0, 3, 8)
    w = TraceWriter(tmp_path / "f.npz", num_layers=3, num_logical=4, num_physical=8, num_ranks=2)
    with pytest.raises(ValueError, match=r"load_LE has shape \(4, 3\), expected \(L, E\) = \(3, 4\)"):
        w.add_window(0, torch.zeros(4, 3))
    with pytest.raises(ValueError, match=r"new_p2l_LP has shape \(3, 4\)"):
        w.add_rearrangement(0, torch.zeros(3, 8), torch.zeros(3, 4), 1.0, 1.0, 0, 0.0)
    with pytest.raises(ValueError, match=r"num_physical \(9\) must be divisible by num_ranks \(2\)"):
        TraceWriter(tmp_path / "g.npz", num_layers=3, num_logical=4, num_physical=9, num_ranks=2)
    with pytest.raises(ValueError, match=r"num_physical \(3\) must be >= num_logical \(4\)"):
        TraceWriter(tmp_path / "g.npz", num_layers=3, num_logical=4, num_physical=3, num_ranks=1)


def test_read_trace_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_trace(tmp_path / "missing.npz")
    (tmp_path / "junk.npz").write_text("not a zip")
    with pytest.raises(ValueError, match=r"not a readable \.npz trace"):
        read_trace(tmp_path / "junk.npz")
    np.savez(tmp_path / "other.npz", x=np.zeros(3))
    with pytest.raises(ValueError, match="missing arrays"):
        read_trace(tmp_path / "other.npz")
    _write_example(tmp_path / "t.npz")
    arrays = dict(np.load(tmp_path / "t.npz"))
    np.savez(tmp_path / "newer.npz", **{**arrays, "format_version": np.array(FORMAT_VERSION + 1)})
    with pytest.raises(ValueError, match=f"format_version {FORMAT_VERSION + 1}"):
        read_trace(tmp_path / "newer.npz")
    np.savez(tmp_path / "bad.npz", **{**arrays, "loads": arrays["loads"][:, :, :3]})
    with pytest.raises(ValueError, match=r"'loads' has shape \(3, 2, 3\), expected \(3, 2, 4\)"):
        read_trace(tmp_path / "bad.npz")


@needs_loads
def test_read_sglang_shared_loads() -> None:
    files = sorted(LOADS_DIR.glob("*.json"))
    assert files
    for path in files:
        rows = json.loads(path.read_text())["logical_count"]
        load = read_sglang(path)
        # DeepSeek-V3: 61 layers of which the first three are dense (all-zero rows): dropped.
        assert load.shape == (58, 256) and load.dtype == torch.float64
        assert torch.equal(load, torch.tensor(rows[3:], dtype=torch.float64))
        assert read_sglang(path, drop_dense=False).shape == (61, 256)
    assert torch.equal(read_loads(files[0]), read_sglang(files[0]).unsqueeze(0))


def test_read_sglang_errors(tmp_path: Path) -> None:
    def write(name: str, doc: object) -> Path:
        path = tmp_path / name
        path.write_text(doc if isinstance(doc, str) else json.dumps(doc))
        return path

    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_sglang(tmp_path / "missing.json")
    cases = [
        ("a.json", "{not json", "not valid JSON"),
        ("b.json", {"physical_count": [[1, 2]]}, "no 'logical_count' key"),
        ("c.json", {"logical_count": [[1, 2], [3]]}, r"ragged or empty \(row lengths \[1, 2\]\)"),
        ("d.json", {"logical_count": []}, "non-empty list of rows"),
        ("e.json", {"logical_count": [[1, -2]]}, "finite non-negative"),
        ("f.json", {"logical_count": [[0, 0], [0, 0]]}, "every row of 'logical_count' is zero"),
        ("g.json", {"logical_count": [["x", 1]]}, "non-numeric"),
        ("h.json", {"logical_count": [1, 2]}, "non-empty list of rows"),
    ]
    for name, doc, message in cases:
        with pytest.raises(ValueError, match=message):
            read_sglang(write(name, doc))
    assert read_sglang(write("ok.json", {"logical_count": [[0, 0], [1, 2]]})).tolist() == [[1.0, 2.0]]
    with pytest.raises(ValueError, match=r"unknown load file type '\.csv'"):
        read_loads(write("x.csv", "1,2"))
