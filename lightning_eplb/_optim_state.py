"""Find the optimizer-state tensors that must travel with expert parameters."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor

__all__ = ["optimizer_state_tensors"]


def optimizer_state_tensors(optimizer: torch.optim.Optimizer, params: Iterable[Tensor]) -> list[Tensor]:
    """The per-parameter optimizer-state tensors shaped like the given parameters.

    Elementwise optimizers keep, for each parameter, state tensors of exactly the
    parameter's shape: ``exp_avg``, ``exp_avg_sq`` and ``max_exp_avg_sq`` of Adam/AdamW,
    ``momentum_buffer`` of SGD, ``square_avg`` of RMSprop, and so on. Those tensors are
    stacked by local slot like the parameter (dim 0 of size ``S``) and move with it, so
    pass them to :func:`~lightning_eplb.migrate_experts` next to the weights.

    Scalar state (``step``, a 0-d tensor or a Python number) stays where it is: it is one
    number per stacked parameter, shared by all its slots, and every rank steps together,
    so it is already the same for the expert in its old and new slot.

    Not supported: optimizers whose per-parameter state is neither parameter-shaped nor
    scalar, such as factored second moments (``torch.optim.Adafactor``'s ``row_var`` and
    ``col_var``, Shampoo-style preconditioners): they cannot be split by slot, and this
    function raises instead of silently leaving the state behind.

    A parameter without state yet (before the first optimizer step) contributes nothing.
    State keys are visited in sorted order, so every rank returns the tensors in the same
    order when all ranks hold the same kinds of state.

    Args:
        optimizer: any ``torch.optim.Optimizer``.
        params: expert parameters, each ``(S, ...)``, all managed by ``optimizer``.

    Returns:
        The state tensors, parameter by parameter, each of its parameter's shape ``(S, ...)``
        (the optimizer's own tensors, so moving them in place updates the optimizer).

    Raises:
        ValueError: if a parameter is not in ``optimizer.param_groups``, or holds a state
            tensor that is neither parameter-shaped nor scalar (names the optimizer class
            and the state key).

    Example:
        >>> w = torch.nn.Parameter(torch.ones(2, 3))
        >>> opt = torch.optim.Adam([w])
        >>> optimizer_state_tensors(opt, [w])  # no step yet: no state
        []
        >>> w.grad = torch.ones(2, 3)
        >>> opt.step()
        >>> [tuple(t.shape) for t in optimizer_state_tensors(opt, [w])]
        [(2, 3), (2, 3)]
    """
    managed = {id(p) for group in optimizer.param_groups for p in group["params"]}
    name = type(optimizer).__name__
    out: list[Tensor] = []
    for index, param in enumerate(params):
        if id(param) not in managed:
            raise ValueError(
                f"parameter {index} of shape {tuple(param.shape)} is not in the param_groups of {name}; "
                "pass only parameters the optimizer updates"
            )
        state = optimizer.state.get(param)
        if not state:
            continue
        for key in sorted(state, key=str):
            value = state[key]
            if not isinstance(value, Tensor):
                continue  # Python scalars and None (e.g. SGD momentum_buffer before momentum exists)
            if value.shape == param.shape:
                out.append(value)
            elif value.numel() == 1:  # 0-d or one-element scalar such as `step`
                continue
            else:
                raise ValueError(
                    f"{name} state {key!r} of parameter {index} has shape {tuple(value.shape)}, neither the "
                    f"parameter's shape {tuple(param.shape)} nor a scalar: it cannot be moved slot by slot "
                    "(factored optimizer state such as Adafactor's is not supported)"
                )
    return out
