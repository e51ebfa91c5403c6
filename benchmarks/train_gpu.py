"""What EPLB buys and what it costs, measured in Lightning training on GPUs (issue 7).

Launch on a multi-GPU machine from the repository root::

    PYTHONPATH=. torchrun --nproc-per-node 4 benchmarks/train_gpu.py

(``--small`` runs a tiny version on CPU/gloo, e.g. ``torchrun --nproc-per-node 2
benchmarks/train_gpu.py --small``, to check the script without GPUs.)

The model is a stack of expert-parallel MoE layers with residual connections, trained with
AdamW in bf16. Routing is emulated so that its skew is exactly the production skew: each
layer's expert popularity is a slice of DeepSeek-V3's recorded prefill load
(``benchmarks/data``): the ``N`` expert-parallel ranks of that deployment that include the
hottest one, ``--experts-per-rank`` experts each. Every token's ``top_k`` experts are drawn
once from that popularity (without replacement) and the router returns logits that select
them, so every configuration runs the same token-to-expert assignment:

(a) static placement without EPLB (``E`` slots, contiguous);
(b) EPLB with ``R`` redundant experts (one rearrangement after a short warm-up window);
(c) the ceiling: routing forced to perfect balance, with (a)'s and (b)'s slot counts.

Then: overhead of the callback on steps without a rearrangement (step time and host
synchronisations counted with ``torch.cuda.set_sync_debug_mode``), one rearrangement
(seconds, bytes, GB/s against NCCL point-to-point measured in the same run, amortised
share at the default ``step_interval``) and placement time at DeepSeek-V3 scale on the CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
import warnings
from pathlib import Path

import lightning as L
import torch
import torch.distributed as dist
from torch import Tensor, nn

from lightning_eplb import EplbCallback, ExpertParallelMoE, rebalance
from lightning_eplb.dense import init_logical_experts

LOADS = Path(__file__).resolve().parent / "data" / "prefill_in1024_moe_layers.json"


# ----------------------------------------------------------------------------- routing
def popularity_slices(num_layers: int, num_ranks: int, experts_per_rank: int, seed: int = 0) -> Tensor:
    """``(num_layers, num_ranks * experts_per_rank)`` expert popularity from the real loads.

    Layer ``l`` uses DeepSeek-V3 MoE layer ``l``: of its 32-rank contiguous placement
    (8 experts per rank) it takes the hottest rank and ``num_ranks - 1`` others at random,
    ``experts_per_rank`` experts of each: the skew a production EP group sees. With more
    than 8 experts per rank the layer's 256 experts are cut into groups of
    ``experts_per_rank`` instead (8 ranks x 32 experts: the whole layer, DeepSeek-V3's own
    layout at EP8, issue 10).
    """
    group = max(8, experts_per_rank)
    if 256 % group or num_ranks > 256 // group:
        raise ValueError(
            f"{num_ranks} ranks x {experts_per_rank} experts do not fit DeepSeek-V3's 256 experts in groups of {group}"
        )
    counts = torch.tensor(json.loads(LOADS.read_text())["logical_count"], dtype=torch.float64)
    g = torch.Generator().manual_seed(seed)
    rows = []
    for layer in range(num_layers):
        ranks = counts[layer % counts.shape[0]].view(256 // group, group)
        hot = int(ranks.sum(1).argmax())
        others = [r for r in torch.randperm(256 // group, generator=g).tolist() if r != hot][: num_ranks - 1]
        rows.append(ranks[[hot, *others], :experts_per_rank].reshape(-1))
    pop = torch.stack(rows)
    return pop / pop.sum(1, keepdim=True)


def draw_assignment(popularity_E: Tensor, num_tokens: int, top_k: int, seed: int) -> Tensor:
    """``(T, k)`` experts per token, drawn from ``popularity_E`` without replacement."""
    g = torch.Generator().manual_seed(seed)
    return torch.multinomial(popularity_E.float().expand(num_tokens, -1), top_k, replacement=False, generator=g)


def balanced_assignment(num_experts: int, num_tokens: int, top_k: int) -> Tensor:
    """``(T, k)``: token t takes experts ``(t*k + j) % E``: every expert gets exactly T*k/E."""
    return (torch.arange(num_tokens).unsqueeze(1) * top_k + torch.arange(top_k)) % num_experts


class FixedRouter(nn.Module):
    """Stands in for the layer's gate: logits that select a fixed assignment per token position."""

    def __init__(self, assignment_Tk: Tensor, num_experts: int) -> None:
        super().__init__()
        logits = torch.zeros(assignment_Tk.shape[0], num_experts)
        k = assignment_Tk.shape[1]
        # decreasing scores so the order within the top-k is fixed; weights stay comparable
        logits.scatter_(1, assignment_Tk, torch.linspace(8.0, 7.0, k).expand(assignment_Tk.shape[0], -1))
        self.register_buffer("logits", logits, persistent=False)
        self.weight = nn.Parameter(torch.zeros(num_experts, 1))  # keeps optimizers happy

    def forward(self, x: Tensor) -> Tensor:
        flat = x.reshape(-1, x.shape[-1])
        if flat.shape[0] != self.logits.shape[0]:
            raise ValueError(f"FixedRouter built for {self.logits.shape[0]} tokens, got {flat.shape[0]}")
        return (self.logits.to(x.dtype) + self.weight.sum() * 0).view(*x.shape[:-1], -1)


# ----------------------------------------------------------------------------- model
class MoEStack(L.LightningModule):
    def __init__(
        self,
        args: argparse.Namespace,
        num_redundant: int,
        assignments: list[Tensor],
        balanced_slots: bool = False,
    ) -> None:
        super().__init__()
        self.args = args
        self.layers = nn.ModuleList()
        self.norms = nn.ModuleList()
        for assignment in assignments:
            layer = ExpertParallelMoE(
                args.hidden, args.ffn, args.experts, args.top_k, num_redundant_experts=num_redundant, init_seed=1
            )
            if balanced_slots and num_redundant:
                place_for_uniform_load(layer, args)
            layer.gate = FixedRouter(assignment, args.experts)
            self.layers.append(layer)
            self.norms.append(nn.LayerNorm(args.hidden))
        self.register_buffer("inputs", torch.zeros(0), persistent=False)

    def on_fit_start(self) -> None:
        g = torch.Generator(device="cpu").manual_seed(1234 + self.global_rank)
        self.inputs = torch.randn(self.args.tokens, self.args.hidden, generator=g).to(self.device, self.dtype)

    def training_step(self, batch: Tensor, batch_idx: int) -> Tensor:
        h = self.inputs
        for norm, layer in zip(self.norms, self.layers, strict=True):
            h = h + layer(norm(h))
        return h.float().pow(2).mean()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=1e-5)


def place_for_uniform_load(layer: ExpertParallelMoE, args: argparse.Namespace) -> None:
    """Give the layer a placement whose ranks get equal tokens under uniform routing (the
    contiguous start does not: its replicas add tokens to some ranks), so that (c2) is a
    ceiling: perfect balance with EPLB's slot count, replicas and their gradient exchange."""
    world = dist.get_world_size() if dist.is_initialized() else 1
    placement = rebalance(torch.ones(1, args.experts), layer.num_physical_experts, world)
    layer.set_placement(
        placement.physical_to_logical[0], placement.logical_to_physical[0], placement.logical_replica_count[0]
    )
    layer.load_logical_experts(init_logical_experts(args.experts, args.hidden, args.ffn, layer.init_seed))


class StepTimer(L.Callback):
    """Wall time of every optimizer step (device synchronised at both ends)."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self._t0 = 0.0

    def _sync(self, trainer: L.Trainer) -> None:
        if trainer.strategy.root_device.type == "cuda":
            torch.cuda.synchronize()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:  # type: ignore[no-untyped-def]
        self._sync(trainer)
        self._t0 = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:  # type: ignore[no-untyped-def]
        self._sync(trainer)
        self.times.append(time.perf_counter() - self._t0)


class SyncCounter(L.Callback):
    """Counts host-device synchronisations in training steps ``[start, stop)``."""

    def __init__(self, start: int, stop: int) -> None:
        self.start, self.stop = start, stop
        self.count = 0
        self._catcher: warnings.catch_warnings | None = None
        self._caught: list = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:  # type: ignore[no-untyped-def]
        if self.start <= batch_idx < self.stop and torch.cuda.is_available():
            self._catcher = warnings.catch_warnings(record=True)
            self._caught = self._catcher.__enter__()
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:  # type: ignore[no-untyped-def]
        if self._catcher is not None:
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode(0)
            self.count += sum("synchroniz" in str(w.message) for w in self._caught)
            self._catcher.__exit__(None, None, None)
            self._catcher = None


def run(
    args: argparse.Namespace,
    label: str,
    num_redundant: int,
    assignments: list[Tensor],
    eplb: EplbCallback | None,
    count_syncs: bool = False,
    balanced_slots: bool = False,
) -> dict:
    torch.manual_seed(0)
    t0 = time.perf_counter()
    model = MoEStack(args, num_redundant, assignments, balanced_slots)
    t_build = time.perf_counter() - t0
    timer = StepTimer()
    callbacks: list[L.Callback] = [timer]
    syncs = SyncCounter(args.warmup_steps + 2, args.warmup_steps + 4) if count_syncs else None
    if syncs is not None:
        callbacks.append(syncs)
    if eplb is not None:
        callbacks.append(eplb)
    data = torch.utils.data.DataLoader(torch.zeros(args.steps, 1), batch_size=1)
    trainer = L.Trainer(
        accelerator="gpu" if torch.cuda.is_available() else "cpu",
        devices=int(os.environ.get("WORLD_SIZE", "1")),
        strategy="ddp",
        precision="bf16-true" if torch.cuda.is_available() else "32-true",
        max_steps=args.steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=callbacks,
        use_distributed_sampler=False,
    )
    t0 = time.perf_counter()
    trainer.fit(model, data)
    if dist.get_rank() == 0:
        print(f"  [{label}: model built in {t_build:.1f} s, fit took {time.perf_counter() - t0:.1f} s]", flush=True)
    measured = timer.times[args.warmup_steps :]
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    step_s = torch.tensor(statistics.median(measured), device=device)
    dist.all_reduce(step_s, op=dist.ReduceOp.MAX)
    tokens = args.tokens * dist.get_world_size()
    out = {"label": label, "step_ms": float(step_s) * 1e3, "tokens_per_s": tokens / float(step_s)}
    if syncs is not None:
        out["syncs_per_step"] = syncs.count / 2
    if eplb is not None:
        out["eplb"] = eplb
    return out


# ----------------------------------------------------------------------------- p2p
def p2p_bandwidth(num_bytes: int, iters: int = 5) -> float:
    """GB/s per direction of a ring exchange (each rank sends to rank+1, receives from rank-1)."""
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    send = torch.empty(num_bytes, dtype=torch.uint8, device=device)
    recv = torch.empty_like(send)
    ops = lambda: [  # noqa: E731
        dist.P2POp(dist.isend, send, (rank + 1) % world),
        dist.P2POp(dist.irecv, recv, (rank - 1) % world),
    ]
    for w in dist.batch_isend_irecv(ops()):
        w.wait()
    if device.type == "cuda":
        torch.cuda.synchronize()
    dist.barrier()
    t0 = time.perf_counter()
    for _ in range(iters):
        for w in dist.batch_isend_irecv(ops()):
            w.wait()
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = torch.tensor((time.perf_counter() - t0) / iters, device=device)
    dist.all_reduce(seconds, op=dist.ReduceOp.MAX)
    return num_bytes / float(seconds) / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", help="tiny sizes for a CPU/gloo check")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--ffn", type=int, default=2048)
    parser.add_argument("--experts-per-rank", type=int, default=6)
    parser.add_argument("--redundant-per-rank", type=int, default=2)
    parser.add_argument("--top-k", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=8192, help="tokens per rank per step")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--warmup-steps", type=int, default=15)
    parser.add_argument("--step-interval", type=int, default=200, help="default interval for amortisation")
    parser.add_argument("--runs", default="a,a',b,c1,c2", help="which runs (a, b and c1 are required)")
    args = parser.parse_args()
    if args.small:
        args.hidden, args.ffn, args.tokens, args.layers, args.steps, args.warmup_steps = 64, 32, 256, 2, 12, 6

    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl")
    else:
        dist.init_process_group("gloo")
    world, rank = dist.get_world_size(), dist.get_rank()
    args.experts = world * args.experts_per_rank
    num_redundant = world * args.redundant_per_rank
    pop = popularity_slices(args.layers, world, args.experts_per_rank)
    # Every rank draws its own tokens' choices: the same popularity, different tokens.
    skewed = [draw_assignment(pop[i], args.tokens, args.top_k, seed=100 * i + rank) for i in range(args.layers)]
    uniform = [balanced_assignment(args.experts, args.tokens, args.top_k) for _ in range(args.layers)]
    static_bal = []
    for i in range(args.layers):
        rank_load = pop[i].view(world, -1).sum(1)
        static_bal.append(float(rank_load.mean() / rank_load.max()))

    def eplb(first: int, **kw) -> EplbCallback:  # type: ignore[no-untyped-def]
        return EplbCallback(
            step_interval=10_000, first_rearrangement_step=first, window_size=first, min_improvement=0.0,
            log_every_n_steps=0, **kw,
        )

    cb = eplb(max(2, args.warmup_steps - 5))  # (b): one rearrangement from the window so far
    plans = {
        "a": ("(a) static, no EPLB", 0, skewed, None, True),
        "a'": ("(a') static + callback, no rearrangement", 0, skewed, eplb(10_000), True),
        "b": ("(b) EPLB, redundant experts", num_redundant, skewed, cb, False),
        "b'": (
            "(b') EPLB, replica sync after the backward (overlap_grad_sync=False)",
            num_redundant,
            skewed,
            eplb(max(2, args.warmup_steps - 5), overlap_grad_sync=False),
            False,
        ),
        "c1": ("(c1) balanced routing, static slots", 0, uniform, None, False),
        "c2": ("(c2) balanced routing, EPLB slots placed for it", num_redundant, uniform, None, False),
    }
    wanted = args.runs.split(",")
    for key in ("a", "b", "c1"):
        if key not in wanted:
            raise SystemExit(f"--runs must include a, b and c1, got {args.runs!r}")
    by_key = {}
    for key in wanted:
        label, redundant, assignment, callback, syncs = plans[key]
        t0 = time.perf_counter()
        by_key[key] = run(args, label, redundant, assignment, callback, count_syncs=syncs, balanced_slots=key == "c2")
        if rank == 0:  # progress, so that a run cut short still reports what it measured
            r = by_key[key]
            print(
                f"[done in {time.perf_counter() - t0:.0f} s] {label}: {r['step_ms']:.2f} ms/step,"
                f" {r['tokens_per_s']:.4g} tokens/s",
                flush=True,
            )
    results = list(by_key.values())

    moved = [r for r in cb.rearrangements if not r["skipped"]]
    stats = moved[-1] if moved else None
    p2p = p2p_bandwidth(256 << 20 if not args.small else 1 << 20)
    p2p_big = p2p_bandwidth(1 << 30) if torch.cuda.is_available() else p2p

    # (4) placement time at DeepSeek-V3 scale on this machine's CPU
    counts = torch.tensor(json.loads(LOADS.read_text())["logical_count"], dtype=torch.float64)
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        rebalance(counts, 288, 32, num_nodes=4, num_groups=8)
        times.append(time.perf_counter() - t0)

    if rank == 0:
        dev = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
        print(f"\n## train_gpu: {world} x {dev}, torch {torch.__version__}, lightning {L.__version__}")
        print(
            f"layers={args.layers} H={args.hidden} F={args.ffn} E={args.experts} R={num_redundant} "
            f"top_k={args.top_k} tokens/rank/step={args.tokens}; static rank balancedness of the "
            f"popularity: mean {statistics.mean(static_bal):.3f} (per layer {', '.join(f'{b:.2f}' for b in static_bal)})"
        )
        print("| run | step ms | tokens/s | host syncs/step |")
        print("| --- | ---: | ---: | ---: |")
        for r in results:
            print(f"| {r['label']} | {r['step_ms']:.2f} | {r['tokens_per_s']:.4g} | {r.get('syncs_per_step', '')} |")
        a, b = by_key["a"], by_key["b"]
        c = max((by_key[k] for k in ("c1", "c2") if k in by_key), key=lambda r: r["tokens_per_s"])
        print(f"\n(b)/(c) = {b['tokens_per_s'] / c['tokens_per_s']:.3f}   (b)/(a) = {b['tokens_per_s'] / a['tokens_per_s']:.3f}")
        if "a'" in by_key:
            overhead = (by_key["a'"]["step_ms"] / a["step_ms"] - 1) * 100
            print(f"callback overhead on non-rearranging steps: {overhead:+.2f}% step time")
        if stats is not None:
            total_s = stats["seconds"]
            move_s = stats.get("migration_seconds", total_s)
            gbps = stats["bytes_received_max"] / max(move_s, 1e-9) / 1e9
            print(
                f"rearrangement: {total_s * 1e3:.1f} ms in all (slowest rank; migration {move_s * 1e3:.1f} ms), "
                f"predicted balancedness {stats['balancedness_before']:.3f} -> {stats['balancedness_after']:.3f} "
                f"(window measured {stats['balancedness_measured']:.3f}), "
                f"{stats['slots_changed']:.0f} slots changed, {stats['bytes_sent'] / 1e9:.3f} GB sent over all ranks, "
                f"busiest rank received {stats['bytes_received_max'] / 1e9:.3f} GB at {gbps:.1f} GB/s; "
                f"NCCL p2p {p2p:.1f} GB/s at 256 MB, {p2p_big:.1f} GB/s at 1 GiB; amortised over "
                f"step_interval={args.step_interval}: "
                f"{total_s / (total_s + args.step_interval * b['step_ms'] / 1e3) * 100:.2f}% of training time"
            )
        print(
            f"placement time, DeepSeek-V3 scale (58x256, 288 slots, 32 ranks, 4 nodes, 8 groups) on this CPU: "
            f"median {statistics.median(times) * 1e3:.1f} ms"
        )
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
