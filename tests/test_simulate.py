"""The what-if replay agrees with calling the placement policy by hand; the CLI fails clearly."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from lightning_eplb._replica_sync import ReplicaIndex
from lightning_eplb.placement import Placement, rebalance
from lightning_eplb.simulate import (
    _TextProgress,
    balancedness_per_step,
    drifting_loads,
    main,
    replica_sync_rows,
    simulate,
    slots_received,
)
from lightning_eplb.trace import TraceWriter, read_sglang

LOADS_DIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "loads"
needs_loads = pytest.mark.skipif(not LOADS_DIR.is_dir(), reason=f"shared load files not found at {LOADS_DIR}")


def _random_placement(gen: torch.Generator, L: int, E: int, P: int, N: int) -> Placement:
    rows = [torch.cat([torch.arange(E), torch.randint(0, E, (P - E,), generator=gen)]) for _ in range(L)]
    rows = [r[torch.randperm(P, generator=gen)] for r in rows]
    return Placement.from_physical_to_logical(torch.stack(rows), E, N)


def test_balancedness_per_step_matches_placement() -> None:
    gen = torch.Generator().manual_seed(1)
    p = _random_placement(gen, L=3, E=8, P=12, N=4)
    loads = torch.rand(6, 3, 8, generator=gen, dtype=torch.float64) * 100
    loads[2] = 0.0  # no load: balancedness 1.0 by definition
    loads[3, :, 1:] = 0.0  # all load on one expert
    got = balancedness_per_step(p, loads)
    want = torch.tensor([p.balancedness(x) for x in loads], dtype=torch.float64)
    torch.testing.assert_close(got, want, rtol=1e-14, atol=0)
    assert got[2] == 1.0


def test_slots_received_brute_force() -> None:
    gen = torch.Generator().manual_seed(2)
    for _ in range(5):
        old, new = (_random_placement(gen, L=2, E=6, P=9, N=3) for _ in range(2))
        S = 3
        want = 0
        for layer in range(2):
            for slot in range(9):
                rank = slot // S
                held = old.physical_to_logical[layer, rank * S : (rank + 1) * S].tolist()
                want += int(new.physical_to_logical[layer, slot]) not in held
        assert slots_received(old, new) == want
        assert slots_received(old, old) == 0


def test_drifting_loads() -> None:
    a = torch.tensor([[1.0, 2.0, 4.0]])
    b = torch.tensor([[3.0, 2.0, 0.0]])
    assert torch.equal(drifting_loads([a], 4, 0.0), a.expand(4, 1, 3))
    # Interpolated over 5 steps: a, 3/4 a + 1/4 b, 1/2 a + 1/2 b, 1/4 a + 3/4 b, b.
    seq = drifting_loads([a, b], 5, 0.0)
    assert torch.equal(seq[0], a) and torch.equal(seq[4], b) and torch.equal(seq[2], (a + b) / 2)
    noisy = drifting_loads([a], 400, 0.1, seed=3)
    assert torch.equal(noisy[0], a)  # step 0 is the file itself
    assert torch.equal(noisy, drifting_loads([a], 400, 0.1, seed=3))  # seeded
    assert not torch.equal(noisy, drifting_loads([a], 400, 0.1, seed=4))
    log_steps = (noisy[1:] / noisy[:-1]).log()  # each step: exp(sigma * N(0, 1))
    assert abs(float(log_steps.std()) - 0.1) < 0.01 and abs(float(log_steps.mean())) < 0.01
    with pytest.raises(ValueError, match="one shape"):
        drifting_loads([a, torch.ones(2, 3)], 3, 0.0)


def test_simulate_matches_manual_replay() -> None:
    """Drifting loads, a window shorter than the interval: the replay equals a hand-written loop."""
    L, E, R, N, T, interval, window = 3, 16, 4, 4, 23, 5, 3
    base = torch.rand(L, E, generator=torch.Generator().manual_seed(5), dtype=torch.float64) ** 3 * 1000
    loads = drifting_loads([base], T, 0.05, seed=6)
    result = simulate(
        loads, num_ranks=N, num_redundant=R, step_interval=interval, window=window, expert_bytes=10, grad_bytes=3
    )
    current = Placement.contiguous(L, E, E + R, N)
    want, events, priced = [], [], []
    for t in range(T):
        want.append(current.balancedness(loads[t]))
        if (t + 1) % interval == 0 and t + 1 < T:
            win = loads[t + 1 - window : t + 1].sum(0)
            new = rebalance(win, E + R, N, previous=current.physical_to_logical)
            events.append(
                (t + 1, current.balancedness(win), new.balancedness(win), new.num_changed_slots(current))
            )
            priced.append(3 * replica_sync_rows(new))
            current = new
    torch.testing.assert_close(
        result.balancedness, torch.tensor(want, dtype=torch.float64), rtol=1e-14, atol=0
    )
    static = Placement.contiguous(L, E, E + R, N)
    torch.testing.assert_close(
        result.static_balancedness,
        torch.tensor([static.balancedness(x) for x in loads], dtype=torch.float64),
        rtol=1e-14,
        atol=0,
    )
    got = [
        (r.step, r.balancedness_before, r.balancedness_after, r.slots_changed) for r in result.rearrangements
    ]
    assert got == events and [r.step for r in result.rearrangements] == [5, 10, 15, 20]
    assert all(r.bytes_moved == 10 * r.slots_received <= 10 * r.slots_changed for r in result.rearrangements)
    assert [r.replica_grad_bytes for r in result.rearrangements] == priced and min(priced) > 0
    assert torch.equal(result.placement.physical_to_logical, current.physical_to_logical)
    table = result.table()
    assert "0-4" in table and "20-22" in table and "4 rearrangements" in table and "grads/step" in table


def test_replica_sync_rows_is_what_the_layers_sync_sends() -> None:
    """The price the replay puts on a placement: the busiest rank's rows summed over layers,
    from the very plan each layer's replica-gradient sync runs."""
    gen = torch.Generator().manual_seed(11)
    for N, E, P in ((2, 6, 10), (3, 5, 12), (4, 8, 16), (4, 4, 16)):
        for _ in range(5):
            pl = _random_placement(gen, 3, E, P, N)
            per_rank = [
                sum(
                    ReplicaIndex.build(p2l, counts, r, P // N).sent_rows
                    for p2l, counts in zip(pl.physical_to_logical, pl.logical_replica_count, strict=True)
                )
                for r in range(N)
            ]
            assert replica_sync_rows(pl) == max(per_rank)
    assert replica_sync_rows(Placement.contiguous(3, 8, 8, 4)) == 0.0  # no replicas: nothing to send


def test_simulate_errors() -> None:
    with pytest.raises(ValueError, match=r"shape \(T, L, E\)"):
        simulate(torch.ones(3, 4), num_ranks=2)
    with pytest.raises(ValueError, match="non-negative"):
        simulate(-torch.ones(3, 2, 4), num_ranks=2)
    with pytest.raises(ValueError, match=r"\(4 \+ 1 = 5\) must be divisible by num_ranks \(2\)"):
        simulate(torch.ones(3, 2, 4), num_ranks=2, num_redundant=1)
    with pytest.raises(ValueError, match=r"step_interval \(0\) must be >= 1"):
        simulate(torch.ones(3, 2, 4), num_ranks=2, step_interval=0)
    with pytest.raises(ValueError, match=r"grad_bytes \(-1\) must be >= 0"):
        simulate(torch.ones(3, 2, 4), num_ranks=2, grad_bytes=-1)


@needs_loads
@pytest.mark.parametrize(
    ("policy", "nodes", "groups"),
    [("balanced", 1, 1), ("deepseek", 4, 8)],
)
def test_static_replay_reports_the_placement_benchmark_figure(
    policy: str, nodes: int, groups: int, capsys: pytest.CaptureFixture[str]
) -> None:
    """DeepSeek-V3's deployment shape: 256 experts + 32 redundant on 32 ranks (4 nodes, 8 groups)."""
    path = LOADS_DIR / "prefill_in1024.json"
    load = read_sglang(path)
    args = [str(path), "--ranks", "32", "--redundant", "32", "--nodes", str(nodes), "--groups", str(groups)]
    args += ["--policy", policy, "--steps", "4", "--step-interval", "2", "--window", "1", "--no-progress"]
    assert main(args) == 0
    out = capsys.readouterr().out
    # What the placement benchmark measures: one call, the new placement on the same load.
    direct = rebalance(load, 288, 32, num_nodes=nodes, num_groups=groups, policy=policy)
    contiguous = Placement.contiguous(58, 256, 288, 32)
    in_force = rebalance(
        load,
        288,
        32,
        num_nodes=nodes,
        num_groups=groups,
        previous=contiguous.physical_to_logical,
        policy=policy,
    )
    result = simulate(
        load.expand(4, -1, -1),
        num_ranks=32,
        num_redundant=32,
        num_nodes=nodes,
        num_groups=groups,
        policy=policy,
        step_interval=2,
        window=1,
    )
    after = in_force.balancedness(load)
    assert result.balancedness.tolist() == pytest.approx(
        [contiguous.balancedness(load)] * 2 + [after] * 2, rel=1e-12
    )
    assert result.static_balancedness.tolist() == pytest.approx(
        [contiguous.balancedness(load)] * 4, rel=1e-12
    )
    assert result.rearrangements[0].balancedness_after == after
    if policy == "deepseek":  # the reference policy ignores the previous placement
        assert after == direct.balancedness(load)
    else:  # movement-aware: may keep a slot in place, never at a visible cost in balance
        assert after == pytest.approx(direct.balancedness(load), abs=2e-3)
    row = next(line for line in out.splitlines() if line.strip().startswith("2-3"))
    assert re.search(rf"^\s*2-3\s+{after:.3f}\s+{contiguous.balancedness(load):.3f}\s+\|\s+-$", row)
    assert f"{contiguous.balancedness(load):.3f} -> {after:.3f}" in out


def test_cli_replays_a_trace_and_plots(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    gen = torch.Generator().manual_seed(7)
    with TraceWriter(tmp_path / "t.npz", num_layers=2, num_logical=8, num_physical=8, num_ranks=2) as w:
        for step in range(12):
            w.add_window(step, torch.randint(0, 50, (2, 8), generator=gen) ** 2)
    args = [str(tmp_path / "t.npz"), "--ranks", "4", "--redundant", "4", "--step-interval", "3"]
    args += ["--expert-bytes", "1500000", "--grad-bytes", "2000000", "--no-progress"]
    pytest.importorskip("matplotlib")
    assert main([*args, "--plot", str(tmp_path / "plot.png")]) == 0
    out = capsys.readouterr().out
    assert "replayed 12 steps of 2 layers x 8 experts on 4 ranks" in out and "3 rearrangements" in out
    assert " MB" in out  # slots received x 1.5 MB
    assert "grads/step" in out  # the replica-gradient bytes of each new placement
    assert (tmp_path / "plot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "nocount.json").write_text('{"physical_count": [[1, 2]]}')
    (tmp_path / "ragged.json").write_text('{"logical_count": [[1, 2], [3]]}')
    (tmp_path / "ok.json").write_text('{"logical_count": [[1, 2, 3, 4]]}')
    (tmp_path / "x.txt").write_text("")
    np_trace = tmp_path / "t.npz"
    with TraceWriter(np_trace, num_layers=1, num_logical=4, num_physical=4, num_ranks=1) as w:
        w.add_window(0, torch.ones(1, 4))
    cases = [
        ([str(tmp_path / "missing.json"), "--ranks", "2"], "does not exist"),
        ([str(tmp_path / "nocount.json"), "--ranks", "2"], "no 'logical_count' key"),
        ([str(tmp_path / "ragged.json"), "--ranks", "2"], "ragged"),
        ([str(tmp_path / "ok.json"), "--ranks", "3"], r"\(4 \+ 0 = 4\) must be divisible by num_ranks \(3\)"),
        ([str(tmp_path / "ok.json"), "--ranks", "2", "--steps", "0"], r"--steps \(0\) must be >= 1"),
        ([str(tmp_path / "ok.json"), "--ranks", "2", "--drift", "-1"], r"--drift \(-1.0\) must be >= 0"),
        ([str(tmp_path / "ok.json"), str(np_trace), "--ranks", "2"], "not both"),
        ([str(tmp_path / "x.txt"), "--ranks", "2"], "unknown load file types"),
        ([str(tmp_path / "ok.json"), "--ranks", "2", "--policy", "magic"], "invalid choice: 'magic'"),
        ([str(tmp_path / "ok.json")], "required: --ranks"),
    ]
    for argv, message in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert re.search(message, err), (argv, err)
        assert "Traceback" not in err and err.startswith("usage: lightning-eplb simulate")
    assert main(["--help"]) == 0
    assert "--step-interval" in capsys.readouterr().out


def test_text_progress(capsys: pytest.CaptureFixture[str]) -> None:
    bar = _TextProgress(10)
    bar.update(4)
    bar.update(6)
    bar.close()
    err = capsys.readouterr().err
    assert "simulate:  40% (4/10 steps)" in err and "100% (10/10 steps)" in err
