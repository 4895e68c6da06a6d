"""One shape group's rows, stacked on the device: what a step reads and writes, addressed by slot index.

Every tensor a row needs between steps lives in its group's banks, written once when the row is admitted:
its latent and last x0 estimate, its plan's timesteps, input divisors and coefficients, its guidance, its
prompt's and negative prompt's conditioning, every noise draw its steps will make (drawn at admission from the
row's own CPU generator, in the order the steps would draw them, so seeds still match diffusers), and for an
inpainting row the known latent, the kept region and the noise that re-noises it. A step uploads one small index
tensor and runs a handful of gathers, the forward, the sampler updates and two scatters — no per-row tensor work.
Rows join and leave by slot; a bank grows by doubling and is never copied on a step.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from imagegen.pipeline.families import Conditioning
from imagegen.samplers import Sampler, SamplerPlan


@dataclass(frozen=True, eq=False)
class RowInit:
    """A row as admission made it, on the host: written into a slot once."""

    x: torch.Tensor  # (1, C, h, w) float32, in the sampler's space
    sampler: Sampler
    plan: SamplerPlan
    start: int  # the first step it runs (an edit row starts late)
    cond: Conditioning  # one row
    uncond: Conditioning | None  # the negative prompt's, when the row runs CFG
    guidance_scale: float
    guidance_rescale: float
    noise: torch.Tensor | None  # (steps, C, h, w) every step's draw, zeros where a step draws none
    inpaint: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None  # known (1,C,h,w), keep (1,1,h,w), noise


def _grown(bank: torch.Tensor, rows: int, *trailing: int) -> torch.Tensor:
    """``bank`` zero-padded to ``rows`` along dim 0 and to ``trailing`` along the next dims."""
    widened = [max(a, b) for a, b in zip(bank.shape[1:], trailing, strict=False)]
    out = bank.new_zeros(rows, *widened, *bank.shape[1 + len(trailing) :])
    out[tuple(slice(0, s) for s in bank.shape)] = bank
    return out


class SlotGroup:
    """The device banks of one latent shape: row r of the group lives at index ``slot`` of each bank."""

    def __init__(self, shape: tuple[int, ...], device: torch.device) -> None:
        self.shape = shape  # (C, h, w)
        self.device = device
        self.capacity = 0
        self._free: list[int] = []
        self.x = torch.zeros(0, *shape, device=device)
        self.previous = torch.zeros(0, *shape, device=device)  # last step's x0 estimate (multistep samplers)
        self.timesteps = torch.zeros(0, 1, device=device)  # (S, T)
        self.divisor = torch.ones(0, 1, device=device)  # (S, T)
        self.coeffs = torch.zeros(0, 1, 1, device=device)  # (S, T, K), K the widest sampler's
        self.guidance = torch.zeros(0, device=device)  # (S,)
        self.rescale = torch.zeros(0, device=device)  # (S,)
        self.cond: dict[str, torch.Tensor] = {}  # (2S, ...): a row's prompt at ``slot``, its negative at S + slot
        self.noise: torch.Tensor | None = None  # (S, T, C, h, w), made when the first row that draws joins
        self.known: torch.Tensor | None = None  # (S, C, h, w) the inpainting rows' input latents
        self.keep: torch.Tensor | None = None  # (S, 1, h, w) 1 where kept: 0 for rows that are not inpainting
        self.renoise: torch.Tensor | None = None  # (S, C, h, w) the noise that re-noises the known latent

    @property
    def empty(self) -> bool:
        return len(self._free) == self.capacity

    # ---- rows join and leave -------------------------------------------------------------------
    def add(self, row: RowInit) -> int:
        """Write a row into a free slot (growing the banks if none is free); returns the slot."""
        steps, k = row.plan.coeffs.shape
        if steps > self.timesteps.shape[1] or k > self.coeffs.shape[2]:
            self._widen(steps, k)
        self._check_conditioning(row)
        if not self._free:
            self._grow(max(8, 2 * self.capacity))
        s = self._free.pop()
        to = self.device
        self.x[s] = row.x[0].to(to)
        self.previous[s] = 0.0
        self.timesteps[s, :steps] = row.plan.timesteps.to(to)
        self.divisor[s, :steps] = row.plan.input_divisor.to(to)
        coeffs = row.plan.coeffs.clone()
        if row.sampler.uses_history:  # its first step has no previous estimate
            coeffs[row.start] = row.sampler.without_history(coeffs[row.start])
        self.coeffs[s] = 0.0
        self.coeffs[s, :steps, :k] = coeffs.to(to)
        self.guidance[s] = row.guidance_scale
        self.rescale[s] = row.guidance_rescale
        for name, bank in self.cond.items():
            bank[s] = row.cond[name][0]
            if row.uncond is not None:
                bank[self.capacity + s] = row.uncond[name][0]
        if row.noise is not None and self.noise is None:
            self.noise = torch.zeros(self.capacity, self.timesteps.shape[1], *self.shape, device=to)
        if self.noise is not None:
            self.noise[s] = 0.0  # a slot's last occupant's draws must not reach a row that draws none
            if row.noise is not None:
                self.noise[s, :steps] = row.noise.to(to)
        if row.inpaint is not None and self.known is None:
            self.known = torch.zeros(self.capacity, *self.shape, device=to)
            self.keep = torch.zeros(self.capacity, 1, *self.shape[1:], device=to)
            self.renoise = torch.zeros(self.capacity, *self.shape, device=to)
        if self.known is not None:
            assert self.keep is not None and self.renoise is not None
            if row.inpaint is None:  # keep 0 blends nothing in; zeros, so that 0 · known stays 0
                self.known[s], self.keep[s], self.renoise[s] = 0.0, 0.0, 0.0
            else:
                known, keep, renoise = row.inpaint
                self.known[s], self.keep[s], self.renoise[s] = known[0].to(to), keep[0].to(to), renoise[0].to(to)
        return s

    def remove(self, slot: int) -> None:
        self._free.append(slot)

    def latent(self, slot: int) -> torch.Tensor:
        """(1, C, h, w) a copy of the row's latent."""
        return self.x[slot : slot + 1].clone()

    def _check_conditioning(self, row: RowInit) -> None:
        names = set(row.cond.tensors)
        if row.uncond is not None and set(row.uncond.tensors) != names:
            raise ValueError("a row's prompt and negative prompt name different conditioning tensors")
        if not self.cond:  # the first row fixes the group's conditioning tensors
            self.cond = {k: v.new_zeros(2 * self.capacity, *v.shape[1:]) for k, v in row.cond.tensors.items()}
        elif names != set(self.cond) or any(row.cond[k].shape[1:] != v.shape[1:] for k, v in self.cond.items()):
            raise ValueError("a row's conditioning differs from its group's: they cannot share a forward")

    def _grow(self, capacity: int) -> None:
        old = self.capacity
        self.x, self.previous = _grown(self.x, capacity), _grown(self.previous, capacity)
        self.timesteps, self.coeffs = _grown(self.timesteps, capacity), _grown(self.coeffs, capacity)
        divisor = _grown(self.divisor, capacity)
        divisor[old:] = 1.0  # never 0: padding positions divide by it
        self.divisor = divisor
        self.guidance, self.rescale = _grown(self.guidance, capacity), _grown(self.rescale, capacity)
        for name, bank in self.cond.items():  # cond rows stay at [0, S), uncond rows move to [S', S' + S)
            grown = bank.new_zeros(2 * capacity, *bank.shape[1:])
            grown[:old], grown[capacity : capacity + old] = bank[:old], bank[old:]
            self.cond[name] = grown
        for attr in ("noise", "known", "keep", "renoise"):
            bank = getattr(self, attr)
            if bank is not None:
                setattr(self, attr, _grown(bank, capacity))
        self._free += range(capacity - 1, old - 1, -1)  # lowest slot first
        self.capacity = capacity

    def _widen(self, steps: int, k: int) -> None:
        """Room for a plan of ``steps`` steps and ``k`` coefficients."""
        self.timesteps = _grown(self.timesteps, self.capacity, steps)
        divisor = _grown(self.divisor, self.capacity, steps)
        divisor[:, self.divisor.shape[1] :] = 1.0
        self.divisor = divisor
        self.coeffs = _grown(self.coeffs, self.capacity, steps, k)
        if self.noise is not None:
            self.noise = _grown(self.noise, self.capacity, steps)
