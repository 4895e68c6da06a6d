"""Our samplers: pure, one timestep per row. ``SAMPLERS`` maps API names to classes."""

from app.samplers.base import Sampler, SamplerPlan, StepOutput
from app.samplers.ddim import DDIM
from app.samplers.dpmpp import DPMSolverPP2M
from app.samplers.euler import Euler, EulerAncestral
from app.samplers.lcm import LCM

SAMPLERS: dict[str, type[Sampler]] = {cls.name: cls for cls in (DDIM, Euler, EulerAncestral, DPMSolverPP2M, LCM)}

__all__ = ["SAMPLERS", "Sampler", "SamplerPlan", "StepOutput"]
