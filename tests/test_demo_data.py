"""StdlibTextDataModule reads real standard-library bytes, deterministically, split by file."""

from __future__ import annotations

import sysconfig
import zlib
from pathlib import Path

import pytest
import torch

from lightning_eplb.demo import StdlibTextDataModule, stdlib_source_files


def _dm(**kw: object) -> StdlibTextDataModule:
    args: dict = dict(batch_size=4, seq_len=32, max_bytes=60_000, val_windows=8, train_windows=64)
    args.update(kw)
    dm = StdlibTextDataModule(**args)
    dm.setup("fit")
    return dm


def test_stdlib_files_sorted_and_without_site_packages() -> None:
    root = Path(sysconfig.get_paths()["stdlib"])
    files = stdlib_source_files()
    rel = [p.relative_to(root).as_posix() for p in files]
    assert rel == sorted(rel) and len(rel) > 100
    assert not any("site-packages" in r.split("/") for r in rel)
    assert "os.py" in rel


def test_corpus_is_the_files_bytes_in_order() -> None:
    dm = _dm()
    assert dm.train_data is not None and dm.val_data is not None
    # The corpus is the used files' bytes, each followed by a newline, cut at max_bytes.
    expected = b"".join(p.read_bytes() + b"\n" for p in dm.train_files)[:60_000]
    assert bytes(dm.train_data.tolist()) == expected
    assert len(dm.train_data) == 60_000
    # Split by file: no file in both splits; the rule is the CRC32 of the relative path.
    root = Path(sysconfig.get_paths()["stdlib"])
    assert not set(dm.train_files) & set(dm.val_files)
    for p in dm.val_files:
        assert zlib.crc32(p.relative_to(root).as_posix().encode()) % 100 < 5
    for p in dm.train_files:
        assert zlib.crc32(p.relative_to(root).as_posix().encode()) % 100 >= 5
    # The validation corpus is capped at val_windows * seq_len + 1 bytes.
    assert len(dm.val_data) == 8 * 32 + 1


def test_batches_deterministic_and_shifted_by_one() -> None:
    a, b, c = _dm(), _dm(), _dm(seed=1)
    batches_a = [torch.cat(x) for x in a.train_dataloader()]
    batches_b = [torch.cat(x) for x in b.train_dataloader()]
    batches_c = [torch.cat(x) for x in c.train_dataloader()]
    assert len(batches_a) == 64 // 4
    assert all(torch.equal(x, y) for x, y in zip(batches_a, batches_b, strict=True))
    assert not all(torch.equal(x, y) for x, y in zip(batches_a, batches_c, strict=True))
    inputs, targets = next(iter(a.train_dataloader()))
    assert inputs.shape == targets.shape == (4, 32) and inputs.dtype == torch.long
    assert torch.equal(inputs[:, 1:], targets[:, :-1])
    # Every window is a real slice of the corpus (find it).
    corpus = bytes(a.train_data.tolist())  # type: ignore[union-attr]
    for row_in, row_t in zip(inputs, targets, strict=True):
        window = bytes(row_in.tolist()) + bytes(row_t[-1:].tolist())
        assert window in corpus
    val = list(a.val_dataloader())
    assert sum(len(x) for x, _ in val) == 8
    assert bytes(val[0][0][0].tolist()) == bytes(a.val_data[:32].tolist())  # type: ignore[index]


def test_bad_arguments_raise() -> None:
    with pytest.raises(ValueError, match=r"seq_len \(0\) must be >= 1"):
        StdlibTextDataModule(seq_len=0)
    with pytest.raises(ValueError, match=r"val_percent \(100\)"):
        StdlibTextDataModule(val_percent=100)
    with pytest.raises(ValueError, match=r"max_bytes \(10\)"):
        StdlibTextDataModule(seq_len=8, max_bytes=10)
    with pytest.raises(RuntimeError, match="setup"):
        StdlibTextDataModule().train_dataloader()


def test_other_root(tmp_path: Path) -> None:
    for i in range(40):
        (tmp_path / f"m{i:02d}.py").write_bytes(f"x = {i}\n".encode() * 10)
    (tmp_path / "site-packages").mkdir()
    (tmp_path / "site-packages" / "skip.py").write_bytes(b"nope" * 100)
    dm = StdlibTextDataModule(batch_size=2, seq_len=8, max_bytes=10_000, val_percent=30, root=str(tmp_path))
    dm.setup()
    assert b"nope" not in bytes(dm.train_data.tolist()) + bytes(dm.val_data.tolist())  # type: ignore[union-attr]
    assert len(dm.train_files) + len(dm.val_files) == 40
