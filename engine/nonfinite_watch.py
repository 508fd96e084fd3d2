"""Where a diverging run went non-finite first: which loss term, or which parameter's gradient.

The trainer reads the loss only at its log points (the one host sync of the step loop). By then a
NaN has usually spread from where it started (one loss term, or one gradient while the loss was
still finite) through the update to every weight and every term, so the values at the log point
no longer say where it began. So every step records, on the device and without a host read, the
first step at which each loss term and each parameter's gradient norm was non-finite; the log
point reads that record when it finds a non-finite loss (or at any log point, for gradients) and
the divergence message names the earliest culprits.

Per step this costs a few small kernels: a stack of the scalar terms, a multi-tensor norm of the
gradients (torch._foreach_norm) and a where per group. The gradient record needs the gradients on
the parameters between backward and the optimizer step; under ZeRO they live in DeepSpeed's
partitions instead (p.grad is None) and only the loss terms are watched.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch

NEVER = -1


def gradient_norms(module: torch.nn.Module) -> tuple[tuple[str, ...], torch.Tensor] | None:
    """(names, norms [n] float32) of the parameters that hold a gradient, in named_parameters
    order; None when none does. One multi-tensor launch for all norms; no host read."""
    named = [(name, p.grad) for name, p in module.named_parameters() if p.grad is not None]
    if not named:
        return None
    names, grads = zip(*named, strict=True)
    norms = torch._foreach_norm([g.detach() for g in grads])
    return tuple(names), torch.stack([n.float() for n in norms])


@dataclass
class _Group:
    kind: str                   # "loss term" or "gradient"
    member: str                 # "" for a one-member model
    names: tuple[str, ...]
    first: torch.Tensor         # int64 [n]: first step at which the value was non-finite, NEVER if not


class NonFiniteWatch:
    """Device-side record of the first non-finite step of each watched value (module docstring).

    `observe_*` take a host step number (1-based within the epoch) and never read the device;
    `report` reads the record (a host sync: call it at log points only) and describes it.
    """

    def __init__(self) -> None:
        self._groups: dict[tuple, _Group] = {}

    def reset(self) -> None:
        self._groups.clear()

    def _observe(self, kind: str, member: str, names: tuple[str, ...], values: torch.Tensor, step: int) -> None:
        key = (kind, member, names)
        group = self._groups.get(key)
        if group is None:
            group = self._groups[key] = _Group(kind, member, names,
                                               torch.full((len(names),), NEVER, dtype=torch.int64,
                                                          device=values.device))
        bad = ~torch.isfinite(values)
        group.first = torch.where(bad & (group.first == NEVER), step, group.first)

    def observe_terms(self, terms: Mapping[str, torch.Tensor], step: int, member: str = "") -> None:
        """The scalar loss terms of one step (the total under "loss")."""
        if not terms:
            return
        names = tuple(terms)
        values = torch.stack([terms[n].detach().float().reshape(()) for n in names])
        self._observe("loss term", member, names, values, step)

    def observe_gradients(self, norms: tuple[tuple[str, ...], torch.Tensor] | None, step: int,
                          member: str = "") -> None:
        """gradient_norms of one member after its backward, before its optimizer step."""
        if norms is not None:
            self._observe("gradient", member, norms[0], norms[1], step)

    def first_failures(self) -> list[tuple[int, str, str, list[str]]]:
        """(step, kind, member, names) of every group with a non-finite value, earliest first;
        names in their group's order. Reads the device."""
        found = []
        for group in self._groups.values():
            first = group.first.tolist()
            steps = [s for s in first if s != NEVER]
            if steps:
                step = min(steps)
                found.append((step, group.kind, group.member,
                              [n for n, s in zip(group.names, first, strict=True) if s == step]))
        # At one step a non-finite loss comes before its gradients, which it makes non-finite.
        return sorted(found, key=lambda f: (f[0], f[1] != "loss term"))

    def report(self) -> tuple[str, str] | None:
        """(kind of the earliest failure, "step 9: the gradient of encoder.w (and 2 more ...);
        step 10: loss terms cluster, loss"), or None when every watched value stayed finite."""
        failures = self.first_failures()
        if not failures:
            return None
        return failures[0][1], "; ".join(_describe(*f) for f in failures)


def _describe(step: int, kind: str, member: str, names: list[str]) -> str:
    where = f" of member {member}" if member else ""
    if kind == "gradient":
        more = f" (and {len(names) - 1} more parameters: {_listing(names[1:])})" if len(names) > 1 else ""
        return f"step {step}: the gradient of {names[0]}{where}{more}"
    return f"step {step}: loss terms {_listing(names)}{where}"


def _listing(names: Iterable[str], limit: int = 6) -> str:
    names = list(names)
    shown = ", ".join(names[:limit])
    return shown + (f", ... ({len(names) - limit} more)" if len(names) > limit else "")
