"""The ``lightning-eplb`` command.

``lightning-eplb simulate TRACE ...`` replays a recorded load trace through the placement
policies (:mod:`lightning_eplb.simulate`). Every other sub-command (``fit``, ``validate``,
``test``, ``predict``) is :class:`~lightning.pytorch.cli.LightningCLI` on the demo's
:class:`~lightning_eplb.demo.MoELanguageModel` and
:class:`~lightning_eplb.demo.StdlibTextDataModule`::

    lightning-eplb fit --config configs/demo_cpu.yaml
    lightning-eplb fit --config configs/demo_cpu.yaml --trainer.max_steps=100 --model.router_skew=0
    lightning-eplb fit --print_config          # every option, with its default

The model and data classes are fixed (no ``class_path`` under ``model:``/``data:``); to
train your own module, write a three-line script ``LightningCLI(MyModel, MyData)`` and reuse
the ``trainer:`` section of ``configs/demo_*.yaml``, which lists
:class:`~lightning_eplb.EplbCallback` under ``trainer.callbacks``.

With ``strategy: ddp`` on CPU, Lightning starts the other ranks by running the same
command line again (``sys.argv``); that works for the console script and for
``python -m lightning_eplb.cli``. After ``fit``, rank zero logs a short summary of the
``eplb/*`` metrics found in the CSV logger's file.
"""

from __future__ import annotations

import csv
import importlib
import logging
import sys
from pathlib import Path

from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.utilities import rank_zero_info

__all__ = ["DemoCLI", "eplb_summary", "main"]

log = logging.getLogger(__name__)

_DESCRIPTION = (
    "Train the lightning_eplb demo (a byte-level MoE language model on the Python standard library's "
    "source) with expert-parallel load balancing: 'lightning-eplb fit --config configs/demo_cpu.yaml'. "
    "'lightning-eplb simulate TRACE ...' replays a recorded load trace through the placement policies."
)


def _series(rows: list[dict[str, str]], key: str) -> list[tuple[int, float]]:
    out = []
    for row in rows:
        value = row.get(key, "")
        if value not in ("", None):
            out.append((int(float(row.get("step") or 0)), float(value)))
    return out


def eplb_summary(metrics_csv: str | Path, max_lines: int = 12) -> str:
    """Summarise the ``eplb/*`` columns of a CSV logger's ``metrics.csv`` as a few text lines.

    Args:
        metrics_csv: path of the file :class:`~lightning.pytorch.loggers.CSVLogger` wrote.
        max_lines: at most this many rearrangements are listed one per line.

    Returns:
        The measured balancedness at the first and last logged steps and its mean before
        the first rearrangement and over the last quarter of the run, then one line per
        rearrangement (predicted balancedness before and after, slots moved); or a line
        saying that the file holds no ``eplb/balancedness`` value.
    """
    with open(metrics_csv, newline="") as f:
        rows = list(csv.DictReader(f))
    bal = _series(rows, "eplb/balancedness")
    if not bal:
        return f"no eplb/balancedness values in {metrics_csv}"
    # Lightning re-logs a value until it is logged again, so one rearrangement can fill several
    # rows: a rearrangement is a row whose record differs from the row before.
    keys = ("slots_changed", "balancedness_before", "balancedness_after", "seconds", "skipped")
    records: list[tuple[int, dict[str, float]]] = []
    previous: tuple[str, ...] | None = None
    for row in rows:
        raw = tuple(row.get(f"eplb/rearrangement/{k}", "") or "" for k in keys)
        if raw[0] and raw != previous:
            records.append((int(float(row.get("step") or 0)), {k: float(v) for k, v in zip(keys, raw, strict=True)}))
        previous = raw if raw[0] else previous
    done = [(s, r) for s, r in records if r["slots_changed"] > 0]
    lines = [f"EPLB summary ({metrics_csv}):"]
    lines.append(
        f"  measured balancedness (mean/max rank load over the window): step {bal[0][0]}: {bal[0][1]:.3f}"
        f" -> step {bal[-1][0]}: {bal[-1][1]:.3f}"
    )
    if done:
        first = done[0][0]
        early = [v for s, v in bal if s <= first]
        last_quarter = [v for s, v in bal if s >= bal[-1][0] - (bal[-1][0] - bal[0][0]) // 4]
        lines.append(
            f"  mean before the first rearrangement (step {first}): {sum(early) / len(early):.3f}; "
            f"over the last quarter of the run: {sum(last_quarter) / len(last_quarter):.3f}"
        )
    lines.append(f"  {len(done)} rearrangements moved experts, {len(records) - len(done)} kept the placement")
    for s, r in done[:max_lines]:
        lines.append(
            f"  step {s}: predicted {r['balancedness_before']:.3f} -> {r['balancedness_after']:.3f}, "
            f"{int(r['slots_changed'])} slots moved in {r['seconds']:.2f} s"
        )
    if len(done) > max_lines:
        lines.append(f"  ... {len(done) - max_lines} more")
    return "\n".join(lines)


class DemoCLI(LightningCLI):
    """:class:`~lightning.pytorch.cli.LightningCLI` that links ``data.seq_len`` to ``model.seq_len``
    and logs an EPLB summary after ``fit``.

    Example:
        >>> from lightning_eplb.demo import MoELanguageModel, StdlibTextDataModule
        >>> cli = DemoCLI(MoELanguageModel, StdlibTextDataModule, run=False, args=[
        ...     "--trainer.logger=false", "--model.hidden_size=16", "--model.num_heads=2", "--data.seq_len=32"])
        >>> cli.model.hparams["seq_len"], cli.datamodule.seq_len
        (32, 32)
    """

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        """Set the model's position table from the data's window length (one ``seq_len`` to give)."""
        parser.link_arguments("data.seq_len", "model.seq_len")

    def after_fit(self) -> None:
        """On rank zero, log :func:`eplb_summary` of the CSV logger's metrics file, if any."""
        trainer = self.trainer
        if not trainer.is_global_zero:
            return
        for logger in trainer.loggers:
            if isinstance(logger, CSVLogger):
                path = Path(logger.experiment.metrics_file_path)
                if path.is_file():
                    rank_zero_info(eplb_summary(path))


def _simulate(argv: list[str]) -> int:
    try:
        simulate = importlib.import_module("lightning_eplb.simulate")
    except ModuleNotFoundError as err:
        if err.name != "lightning_eplb.simulate":
            raise
        log.error("lightning-eplb simulate: this installation has no lightning_eplb.simulate module")
        return 2
    return int(simulate.main(argv) or 0)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``lightning-eplb`` console script.

    Args:
        argv: arguments without the program name; ``None`` reads ``sys.argv[1:]``.

    Returns:
        The process exit status (``LightningCLI`` itself exits on bad arguments).
    """
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] == "simulate":
        return _simulate(args[1:])
    # args=None lets LightningCLI read sys.argv itself (it warns when given both).
    from lightning_eplb.demo import MoELanguageModel, StdlibTextDataModule

    DemoCLI(
        MoELanguageModel,
        StdlibTextDataModule,
        seed_everything_default=0,
        save_config_kwargs={"overwrite": True},
        parser_kwargs={"description": _DESCRIPTION},
        args=None if argv is None else args,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
