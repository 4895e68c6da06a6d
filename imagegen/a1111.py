"""AUTOMATIC1111's names for our samplers, both ways: the ``/sdapi/v1`` routes read them, the PNG ``parameters`` text
(gate/labels.py) writes them. No imports: the gate and the API both use it.

A1111 shows "Euler a", "DPM++ 2M", …; its older API names are k-diffusion's (``k_euler_a``). flow_euler has no A1111
name: it keeps ours.
"""

from __future__ import annotations

# ours → A1111's display name, in the order A1111 lists its samplers
DISPLAY_NAMES: dict[str, str] = {
    "dpmpp_2m": "DPM++ 2M",
    "euler_a": "Euler a",
    "euler": "Euler",
    "ddim": "DDIM",
    "lcm": "LCM",
    "flow_euler": "flow_euler",
}
# ours → the other names A1111 accepts for it (its ``/sdapi/v1/samplers`` aliases)
ALIASES: dict[str, tuple[str, ...]] = {
    "dpmpp_2m": ("k_dpmpp_2m",),
    "euler_a": ("k_euler_a", "k_euler_ancestral"),
    "euler": ("k_euler",),
    "ddim": (),
    "lcm": ("k_lcm",),
    "flow_euler": (),
}
# ours → A1111's ``options`` for it (its API sends them as strings)
OPTIONS: dict[str, dict[str, str]] = {"euler_a": {"uses_ensd": "True"}}
# Scheduler-suffixed names of A1111 before 1.9 (now ``sampler_name`` + ``scheduler``): run with our own schedule.
SUFFIXED: dict[str, str] = {"dpm++ 2m karras": "dpmpp_2m"}

# A1111's name (any case), an alias, or ours → ours
SAMPLER_NAMES: dict[str, str] = {
    **{ours: ours for ours in DISPLAY_NAMES},
    **{name.lower(): ours for ours, name in DISPLAY_NAMES.items()},
    **{alias: ours for ours, aliases in ALIASES.items() for alias in aliases},
    **SUFFIXED,
}


def display_name(sampler: str) -> str:
    """A1111's name for one of our samplers (an unknown one keeps its own)."""
    return DISPLAY_NAMES.get(sampler, sampler)


def our_sampler(name: str) -> str:
    """Ours for an A1111 name; an unknown name is passed on as sent (validation answers it with a 400)."""
    return SAMPLER_NAMES.get(name.lower(), name)
