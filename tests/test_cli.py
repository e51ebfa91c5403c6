"""The lightning-eplb command: YAML parsing of EplbCallback, fits on 1 and 2 processes, simulate dispatch."""

from __future__ import annotations

import csv
import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from lightning_eplb import EplbCallback
from lightning_eplb.cli import DemoCLI, eplb_summary, main
from lightning_eplb.demo import MoELanguageModel, StdlibTextDataModule

REPO = Path(__file__).resolve().parents[1]
CONFIG = str(REPO / "configs" / "demo_cpu.yaml")

# A tiny run of the demo config: small model, short windows, EPLB every 2 steps.
_TINY = [
    "--model.hidden_size=16", "--model.ffn_hidden_size=16", "--model.num_layers=1", "--model.num_heads=2",
    "--model.num_experts=4", "--model.num_redundant_experts=2", "--model.router_skew=2.0",
    "--data.batch_size=4", "--data.seq_len=16", "--data.max_bytes=20000", "--data.val_windows=8",
    "--trainer.max_steps=4", "--trainer.log_every_n_steps=1", "--trainer.val_check_interval=4",
    "--trainer.limit_val_batches=1", "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false",
    "--trainer.callbacks.init_args.step_interval=2", "--trainer.callbacks.init_args.window_size=2",
    "--trainer.callbacks.init_args.first_rearrangement_step=2", "--trainer.callbacks.init_args.log_every_n_steps=1",
]


@pytest.fixture(autouse=True)
def _plain_argv(monkeypatch: pytest.MonkeyPatch) -> None:
    """LightningCLI warns when given args while sys.argv (pytest's) holds others."""
    monkeypatch.setattr(sys, "argv", ["lightning-eplb"])


def _rows(save_dir: Path) -> list[dict[str, str]]:
    (path,) = save_dir.glob("demo_cpu/version_*/metrics.csv")
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_yaml_configures_callback_model_and_data(tmp_path: Path) -> None:
    cli = DemoCLI(
        MoELanguageModel, StdlibTextDataModule, run=False,
        args=["--config", CONFIG, "--trainer.devices=1", "--trainer.strategy=auto",
              f"--trainer.logger.init_args.save_dir={tmp_path}", "--data.seq_len=64"],
    )
    (cb,) = [c for c in cli.trainer.callbacks if isinstance(c, EplbCallback)]
    assert (cb.step_interval, cb.window_size, cb.first_rearrangement_step, cb.log_every_n_steps) == (25, 25, 25, 5)
    assert cb.min_improvement == pytest.approx(0.01)
    assert cli.trainer.max_steps == 300
    hp = cli.model.hparams
    assert (hp["num_experts"], hp["num_redundant_experts"], hp["router_skew"]) == (8, 2, 1.0)
    assert hp["seq_len"] == 64 == cli.datamodule.seq_len  # linked from data.seq_len


def test_gpu_config_parses_and_shards_on_2_4_8_gpus(tmp_path: Path) -> None:
    gpu = REPO / "configs" / "demo_gpu.yaml"
    hp = yaml.safe_load(gpu.read_text())["model"]
    slots = hp["num_experts"] + hp["num_redundant_experts"]
    assert all(slots % n == 0 for n in (2, 4, 8)), slots
    # Parses with the demo's classes (a small model here: the real one takes seconds to build on CPU).
    cli = DemoCLI(
        MoELanguageModel, StdlibTextDataModule, run=False,
        args=["--config", str(gpu), "--trainer.accelerator=cpu", "--trainer.devices=1", "--trainer.strategy=auto",
              "--trainer.precision=32-true", f"--trainer.logger.init_args.save_dir={tmp_path}",
              "--model.hidden_size=16", "--model.ffn_hidden_size=16", "--model.num_heads=2"],
    )
    assert any(isinstance(c, EplbCallback) for c in cli.trainer.callbacks)
    assert cli.model.hparams["seq_len"] == cli.datamodule.seq_len == 512


def test_bad_callback_values_give_clear_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.yaml"
    base = ["--config", CONFIG, "--trainer.devices=1", "--trainer.strategy=auto", "--config", str(bad)]
    cb = "trainer:\n  callbacks:\n    - class_path: lightning_eplb.EplbCallback\n      init_args:\n"
    bad.write_text(cb + "        step_interval: 0\n")
    with pytest.raises(ValueError, match=r"step_interval \(0\) must be"):
        DemoCLI(MoELanguageModel, StdlibTextDataModule, run=False, args=base)
    bad.write_text(cb + "        step_interval: every-so-often\n")
    with pytest.raises(SystemExit) as exit_:
        DemoCLI(MoELanguageModel, StdlibTextDataModule, run=False, args=base)
    assert exit_.value.code != 0
    assert "step_interval" in capsys.readouterr().err
    bad.write_text(cb + "        no_such_option: 3\n")
    with pytest.raises(SystemExit):
        DemoCLI(MoELanguageModel, StdlibTextDataModule, run=False, args=base)
    assert "no_such_option" in capsys.readouterr().err


def test_fit_one_process_in_process(tmp_path: Path) -> None:
    args = ["fit", "--config", CONFIG, "--trainer.devices=1", "--trainer.strategy=auto",
            f"--trainer.logger.init_args.save_dir={tmp_path}", *_TINY]
    assert main(args) == 0
    rows = _rows(tmp_path)
    assert [int(r["step"]) for r in rows if r.get("train/loss")] == [0, 1, 2, 3]
    assert {float(r["eplb/balancedness"]) for r in rows if r.get("eplb/balancedness")} == {1.0}  # one rank
    assert any(r.get("val/loss") for r in rows)


def test_fit_two_ddp_processes_through_console_script(tmp_path: Path) -> None:
    # What pip writes for `lightning-eplb = "lightning_eplb.cli:main"`: Lightning's DDP launcher
    # starts rank 1 by running `python <this file> <same args>`.
    script = tmp_path / "lightning-eplb"
    script.write_text(textwrap.dedent("""\
        import sys
        from lightning_eplb.cli import main
        if __name__ == "__main__":
            sys.exit(main())
    """))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    for key in ("MASTER_ADDR", "MASTER_PORT", "RANK", "LOCAL_RANK", "WORLD_SIZE", "NODE_RANK"):
        env.pop(key, None)
    proc = subprocess.run(
        [sys.executable, str(script), "fit", "--config", CONFIG, "--trainer.logger.init_args.save_dir=logs", *_TINY],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "Starting with 2 processes" in proc.stdout + proc.stderr
    assert "EPLB summary" in proc.stdout + proc.stderr
    rows = _rows(tmp_path / "logs")
    moved = [float(r["eplb/rearrangement/slots_changed"]) for r in rows if r.get("eplb/rearrangement/slots_changed")]
    assert moved and max(moved) > 0  # the skewed router made EPLB move experts between the 2 ranks
    # what the placements cost per step, logged and said: replicas on both ranks exchange gradients
    grads = [float(r["eplb/rearrangement/replica_grad_bytes_max"]) for r in rows if r.get("eplb/rearrangement/replica_grad_bytes_max")]
    assert grads and max(grads) > 0 and "MB per step (busiest rank)" in proc.stdout + proc.stderr
    bal = [float(r["eplb/balancedness"]) for r in rows if r.get("eplb/balancedness")]
    assert all(0.0 < b <= 1.0 for b in bal) and min(bal) < 1.0


def test_simulate_is_dispatched(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    import lightning_eplb.simulate as simulate

    seen: list[list[str]] = []
    monkeypatch.setattr(simulate, "main", lambda argv: seen.append(argv) or 7)
    assert main(["simulate", "trace.npz", "--ranks", "4"]) == 7
    assert seen == [["trace.npz", "--ranks", "4"]]
    monkeypatch.setitem(sys.modules, "lightning_eplb.simulate", None)
    with caplog.at_level(logging.ERROR, logger="lightning_eplb.cli"):
        assert main(["simulate", "trace.npz"]) == 2
    assert "no lightning_eplb.simulate module" in caplog.text


def test_eplb_summary_counts_each_rearrangement_once(tmp_path: Path) -> None:
    head = ["step", "eplb/balancedness", "eplb/rearrangement/slots_changed", "eplb/rearrangement/balancedness_before",
            "eplb/rearrangement/balancedness_after", "eplb/rearrangement/seconds", "eplb/rearrangement/skipped"]
    rows = [
        [4, 0.5, "", "", "", "", ""],
        [9, 0.6, 6, 0.6, 0.9, 0.25, 0],  # rearrangement at step 9 ...
        [14, 0.8, 6, 0.6, 0.9, 0.25, 0],  # ... re-logged by Lightning until the next one
        [19, 0.9, 0, 0.9, 0.9, 0.01, 1],  # kept the placement
        [24, 0.9, 0, 0.9, 0.9, 0.01, 1],
    ]
    path = tmp_path / "metrics.csv"
    path.write_text("\n".join(",".join(map(str, r)) for r in [head, *rows]) + "\n")
    text = eplb_summary(path)
    assert "step 4: 0.500 -> step 24: 0.900" in text
    assert "mean before the first rearrangement (step 9): 0.550" in text  # (0.5 + 0.6) / 2
    assert "over the last quarter of the run: 0.900" in text  # steps >= 24 - 20 // 4 = 19
    assert "1 rearrangements moved experts, 1 kept the placement" in text
    assert "step 9: predicted 0.600 -> 0.900, 6 slots moved in 0.25 s" in text
    (tmp_path / "empty.csv").write_text("step,train/loss\n0,1.0\n")
    assert eplb_summary(tmp_path / "empty.csv").startswith("no eplb/balancedness")
