"""A small byte-level MoE language model trained on the Python standard library's own source.

Every machine with Python carries a few megabytes of real text: the ``.py`` files of the
standard library. :class:`StdlibTextDataModule` reads them as bytes (no download, no
tokenizer) and :class:`MoELanguageModel` is a causal transformer whose MLPs are
:class:`~lightning_eplb.ExpertParallelMoE` layers. Together with
:class:`~lightning_eplb.EplbCallback` they make the ``lightning-eplb fit`` demo.

Shapes: ``B`` batch, ``T`` sequence length, ``H`` hidden size, ``V = 256`` byte vocabulary,
``E`` logical experts.
"""

from __future__ import annotations

import math
import os
import sysconfig
import zlib
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from lightning_eplb.moe import ExpertParallelMoE

__all__ = ["MoELanguageModel", "StdlibTextDataModule", "stdlib_source_files"]

VOCAB_SIZE = 256


class _RouterBias(nn.Module):
    """A fixed (non-learned) bias added to a router's logits through a forward hook.

    ``bias[perm[j]] = -skew * ln(1 + j)``: with near-uniform logits the router then prefers
    expert ``perm[j]`` with odds about ``(1 + j) ** -skew``, a Zipf-like skew. ``perm`` is a
    seeded permutation, different per layer, so that the hot experts are not all on rank 0.
    """

    def __init__(self, num_experts: int, skew: float, seed: int) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        perm = torch.randperm(num_experts, generator=gen)
        bias = torch.empty(num_experts)
        bias[perm] = -skew * torch.log1p(torch.arange(num_experts, dtype=torch.float32))
        self.bias: Tensor
        self.register_buffer("bias", bias)  # (E,)

    def hook(self, module: nn.Module, inputs: tuple[Any, ...], logits: Tensor) -> Tensor:
        """Forward hook of the router: ``(T, E)`` logits -> ``(T, E)`` biased logits."""
        return logits + self.bias.to(logits.dtype)


class _Block(nn.Module):
    """Pre-norm transformer block: causal self-attention, then a MoE in place of the MLP."""

    def __init__(
        self,
        hidden_size: int,
        ffn_hidden_size: int,
        num_heads: int,
        num_experts: int,
        top_k: int,
        num_redundant_experts: int,
        num_expert_groups: int,
        init_seed: int,
    ) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.norm1 = nn.RMSNorm(hidden_size)
        self.qkv = nn.Linear(hidden_size, 3 * hidden_size, bias=False)
        self.proj = nn.Linear(hidden_size, hidden_size, bias=False)
        self.norm2 = nn.RMSNorm(hidden_size)
        self.moe = ExpertParallelMoE(
            hidden_size,
            ffn_hidden_size,
            num_experts,
            top_k,
            num_redundant_experts=num_redundant_experts,
            num_expert_groups=num_expert_groups,
            init_seed=init_seed,
        )

    def forward(self, x: Tensor) -> Tensor:
        """``(B, T, H)`` -> ``(B, T, H)``."""
        b, t, h = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, t, 3, self.num_heads, h // self.num_heads).unbind(2)
        att = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True)
        x = x + self.proj(att.transpose(1, 2).reshape(b, t, h))
        return x + self.moe(self.norm2(x))


class MoELanguageModel(pl.LightningModule):
    """Byte-level causal transformer with :class:`~lightning_eplb.ExpertParallelMoE` MLPs.

    All layers are built here, before any process group exists; the expert layers hold all
    ``E + R`` slots until :class:`~lightning_eplb.EplbCallback` shards them in its ``setup``.
    Expert weights are drawn from ``seed`` (layer ``i`` uses ``seed + i``), so a logical
    expert starts from the same weights whatever the number of ranks.

    Args:
        hidden_size: ``H``.
        ffn_hidden_size: hidden size of each expert's SwiGLU MLP.
        num_layers: transformer blocks.
        num_heads: attention heads (must divide ``hidden_size``).
        num_experts: ``E`` logical experts per MoE layer.
        top_k: experts per token.
        num_redundant_experts: ``R`` extra replica slots per layer (``E + R`` must be a
            multiple of the number of ranks).
        num_expert_groups: expert groups for group-limited routing.
        seq_len: longest sequence (size of the learned position table).
        lr: AdamW learning rate.
        weight_decay: AdamW weight decay.
        router_skew: strength of a fixed, non-learned bias on every router's logits that
            makes expert loads Zipf-like from the first step (``0`` disables it): expert
            ``perm[j]`` gets logit bias ``-router_skew * ln(1 + j)`` for a seeded
            per-layer permutation ``perm``. Real MoE routers drift into such imbalance over
            long runs; the bias makes it visible in a demo of a few hundred steps.
        seed: seed of the expert weights and of the router-bias permutations.

    Example:
        >>> model = MoELanguageModel(hidden_size=16, ffn_hidden_size=32, num_layers=1, num_heads=2,
        ...                          num_experts=4, top_k=2, seq_len=8)
        >>> model(torch.zeros(2, 8, dtype=torch.long)).shape
        torch.Size([2, 8, 256])
    """

    def __init__(
        self,
        hidden_size: int = 64,
        ffn_hidden_size: int = 128,
        num_layers: int = 2,
        num_heads: int = 4,
        num_experts: int = 8,
        top_k: int = 2,
        num_redundant_experts: int = 0,
        num_expert_groups: int = 1,
        seq_len: int = 128,
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        router_skew: float = 0.0,
        seed: int = 0,
    ) -> None:
        super().__init__()
        for name, value in (("hidden_size", hidden_size), ("num_layers", num_layers), ("num_heads", num_heads),
                            ("seq_len", seq_len)):
            if value < 1:
                raise ValueError(f"{name} ({value}) must be >= 1")
        if hidden_size % num_heads:
            raise ValueError(f"hidden_size ({hidden_size}) must be divisible by num_heads ({num_heads})")
        if lr <= 0:
            raise ValueError(f"lr ({lr}) must be > 0")
        if router_skew < 0:
            raise ValueError(f"router_skew ({router_skew}) must be >= 0")
        self.save_hyperparameters()
        self.embed = nn.Embedding(VOCAB_SIZE, hidden_size)
        self.pos = nn.Embedding(seq_len, hidden_size)
        blocks = [
            _Block(hidden_size, ffn_hidden_size, num_heads, num_experts, top_k, num_redundant_experts,
                   num_expert_groups, init_seed=seed + i)
            for i in range(num_layers)
        ]
        self.blocks = nn.ModuleList(blocks)
        self.norm = nn.RMSNorm(hidden_size)
        self.head = nn.Linear(hidden_size, VOCAB_SIZE, bias=False)
        self.router_biases = nn.ModuleList()
        if router_skew > 0:
            for i, block in enumerate(blocks):
                rb = _RouterBias(num_experts, router_skew, seed=seed + 1000 + i)
                block.moe.gate.register_forward_hook(rb.hook)
                self.router_biases.append(rb)

    def forward(self, tokens: Tensor) -> Tensor:
        """``(B, T)`` int64 bytes -> ``(B, T, V)`` next-byte logits."""
        t = tokens.shape[-1]
        if t > self.hparams["seq_len"]:
            raise ValueError(f"sequence length ({t}) must be <= seq_len ({self.hparams['seq_len']})")
        x = self.embed(tokens) + self.pos(torch.arange(t, device=tokens.device))
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))

    def _loss(self, batch: tuple[Tensor, Tensor]) -> Tensor:
        inputs, targets = batch  # (B, T) each
        logits = self(inputs)
        return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        """Next-byte cross-entropy; logs ``train/loss`` (nats per byte) on the progress bar."""
        loss = self._loss(batch)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        """Logs ``val/loss`` and ``val/bits_per_byte`` averaged over ranks."""
        loss = self._loss(batch)
        self.log("val/loss", loss, prog_bar=True, sync_dist=True)
        self.log("val/bits_per_byte", loss / math.log(2), sync_dist=True)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        """AdamW over all parameters (expert slots included: the callback migrates their state)."""
        return torch.optim.AdamW(self.parameters(), lr=self.hparams["lr"], weight_decay=self.hparams["weight_decay"])


def stdlib_source_files(root: str | Path | None = None) -> list[Path]:
    """The ``.py`` files of the Python standard library, sorted by relative path.

    ``site-packages`` (installed third-party code, different on every machine) is left out.

    Args:
        root: directory to scan; default ``sysconfig.get_paths()["stdlib"]``.
    """
    base = Path(root if root is not None else sysconfig.get_paths()["stdlib"])
    files: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(base):
        dirnames[:] = [d for d in dirnames if d != "site-packages" and d != "__pycache__"]
        files.extend(Path(dirpath, f) for f in filenames if f.endswith(".py"))
    return sorted(files, key=lambda p: p.relative_to(base).as_posix())


class _Windows(Dataset):
    """Fixed-length windows of a byte corpus: item ``i`` is ``(bytes[s:s+T], bytes[s+1:s+T+1])``."""

    def __init__(self, data: Tensor, starts: Tensor, seq_len: int) -> None:
        self.data = data  # (n,) uint8
        self.starts = starts  # (num_windows,) int64
        self.seq_len = seq_len

    def __len__(self) -> int:
        return len(self.starts)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        s = int(self.starts[index])
        chunk = self.data[s : s + self.seq_len + 1].long()
        return chunk[:-1], chunk[1:]


class StdlibTextDataModule(pl.LightningDataModule):
    """Next-byte prediction on the Python standard library's own ``.py`` files.

    Files are split into train and validation *by file* (a file goes to validation when the
    CRC32 of its relative path mod 100 is below ``val_percent``), visited in an order drawn
    from ``seed``, and concatenated (a newline between files) until ``max_bytes``. Training
    items are windows at random offsets drawn once from ``seed``; validation windows tile
    the validation corpus. Everything is deterministic for a given Python installation
    and seed.

    Args:
        batch_size: windows per batch and per rank.
        seq_len: ``T`` bytes per window (the targets are the next ``T`` bytes).
        num_workers: DataLoader workers.
        max_bytes: cap on the training corpus (memory is one byte per byte); the validation
            corpus is read up to ``val_windows * seq_len + 1`` bytes (and ``max_bytes``).
        val_percent: percentage of files held out for validation.
        train_windows: training windows per epoch (their offsets are drawn once).
        val_windows: cap on the validation windows.
        seed: seed of the file order and of the window offsets.
        root: directory to read instead of the standard library (for tests).

    Example:
        >>> dm = StdlibTextDataModule(batch_size=2, seq_len=16, max_bytes=50_000)
        >>> dm.setup("fit")
        >>> inputs, targets = next(iter(dm.train_dataloader()))
        >>> inputs.shape, bool((inputs[:, 1:] == targets[:, :-1]).all())
        (torch.Size([2, 16]), True)
    """

    def __init__(
        self,
        batch_size: int = 16,
        seq_len: int = 128,
        num_workers: int = 0,
        max_bytes: int = 8_000_000,
        val_percent: int = 5,
        train_windows: int = 100_000,
        val_windows: int = 256,
        seed: int = 0,
        root: str | None = None,
    ) -> None:
        super().__init__()
        for name, value in (("batch_size", batch_size), ("seq_len", seq_len), ("train_windows", train_windows),
                            ("val_windows", val_windows)):
            if value < 1:
                raise ValueError(f"{name} ({value}) must be >= 1")
        if num_workers < 0:
            raise ValueError(f"num_workers ({num_workers}) must be >= 0")
        if max_bytes < 2 * (seq_len + 1):
            raise ValueError(f"max_bytes ({max_bytes}) must be >= 2 * (seq_len + 1) = {2 * (seq_len + 1)}")
        if not 0 < val_percent < 100:
            raise ValueError(f"val_percent ({val_percent}) must lie in (0, 100)")
        self.save_hyperparameters()
        self.batch_size = batch_size
        self.seq_len = seq_len
        self.num_workers = num_workers
        self.max_bytes = max_bytes
        self.val_percent = val_percent
        self.train_windows = train_windows
        self.val_windows = val_windows
        self.seed = seed
        self.root = root
        self.train_files: list[Path] = []
        self.val_files: list[Path] = []
        self.train_data: Tensor | None = None  # (n_train,) uint8
        self.val_data: Tensor | None = None  # (n_val,) uint8

    def _read(self, files: list[Path], max_bytes: int) -> tuple[Tensor, list[Path]]:
        """Concatenate ``files`` (in a seeded order) up to ``max_bytes``; return ``(n,)`` uint8 and files used."""
        gen = torch.Generator().manual_seed(self.seed)
        order = torch.randperm(len(files), generator=gen).tolist()
        parts: list[bytes] = []
        used: list[Path] = []
        total = 0
        for i in order:
            if total >= max_bytes:
                break
            blob = files[i].read_bytes() + b"\n"
            parts.append(blob[: max_bytes - total])
            used.append(files[i])
            total += len(parts[-1])
        data = b"".join(parts)
        if len(data) < self.seq_len + 1:
            raise ValueError(f"corpus ({len(data)} bytes from {len(files)} files) is shorter than seq_len + 1 ({self.seq_len + 1})")
        return torch.frombuffer(bytearray(data), dtype=torch.uint8), used

    def setup(self, stage: str | None = None) -> None:
        """Read both splits (every rank reads the same bytes; nothing is downloaded)."""
        if self.train_data is not None:
            return
        base = Path(self.root if self.root is not None else sysconfig.get_paths()["stdlib"])
        files = stdlib_source_files(base)
        if not files:
            raise ValueError(f"no .py files found under {base}")
        is_val = [zlib.crc32(p.relative_to(base).as_posix().encode()) % 100 < self.val_percent for p in files]
        train = [p for p, v in zip(files, is_val, strict=True) if not v]
        val = [p for p, v in zip(files, is_val, strict=True) if v]
        if not train or not val:
            raise ValueError(f"val_percent ({self.val_percent}) leaves an empty split of {len(files)} files under {base}")
        self.train_data, self.train_files = self._read(train, self.max_bytes)
        self.val_data, self.val_files = self._read(val, min(self.max_bytes, self.val_windows * self.seq_len + 1))

    def _check_setup(self) -> tuple[Tensor, Tensor]:
        if self.train_data is None or self.val_data is None:
            raise RuntimeError("call setup() before asking for a dataloader")
        return self.train_data, self.val_data

    def train_dataloader(self) -> DataLoader:
        """Random windows, offsets drawn once from ``seed`` (a distributed sampler may reorder them)."""
        train, _ = self._check_setup()
        gen = torch.Generator().manual_seed(self.seed + 1)
        starts = torch.randint(0, len(train) - self.seq_len, (self.train_windows,), generator=gen)
        return DataLoader(_Windows(train, starts, self.seq_len), batch_size=self.batch_size, shuffle=False,
                          num_workers=self.num_workers, drop_last=True)

    def val_dataloader(self) -> DataLoader:
        """Non-overlapping windows from the start of the validation corpus."""
        _, val = self._check_setup()
        count = min(self.val_windows, (len(val) - 1) // self.seq_len)
        starts = torch.arange(count) * self.seq_len
        return DataLoader(_Windows(val, starts, self.seq_len), batch_size=self.batch_size, shuffle=False,
                          num_workers=self.num_workers)
