"""Our samplers: pure, one timestep per row. ``SAMPLERS`` maps API names to classes; a model family says which
of them its schedule can run (VP samplers on diffusion schedules, flow samplers on flow-matching ones)."""

from imagegen.samplers.base import Sampler, SamplerPlan, StepOutput, VPSampler
from imagegen.samplers.ddim import DDIM
from imagegen.samplers.dpmpp import DPMSolverPP2M
from imagegen.samplers.euler import Euler, EulerAncestral
from imagegen.samplers.flow import FlowEuler
from imagegen.samplers.lcm import LCM

VP_SAMPLERS: dict[str, type[VPSampler]] = {cls.name: cls for cls in (DDIM, Euler, EulerAncestral, DPMSolverPP2M, LCM)}
FLOW_SAMPLERS: dict[str, type[FlowEuler]] = {FlowEuler.name: FlowEuler}
SAMPLERS: dict[str, type[Sampler]] = {**VP_SAMPLERS, **FLOW_SAMPLERS}

__all__ = ["FLOW_SAMPLERS", "SAMPLERS", "VP_SAMPLERS", "FlowEuler", "Sampler", "SamplerPlan", "StepOutput", "VPSampler"]
