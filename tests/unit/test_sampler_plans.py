"""Every sampler builds a sound plan for every step count it accepts, on every schedule shape we load.

Plans only (no model): one timestep, divisor and coefficient row per step, timesteps inside the training
range and descending, everything finite. Trailing spacing over a float stride once yielded steps + 1
timesteps (dpmpp_2m at 61, 103, 121, 122 steps), and DDIM with η = 1 a NaN coefficient. Flow plans also
equal diffusers' FlowMatchEulerDiscreteScheduler, as SD3's and Flux's pipelines drive it.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from imagegen.samplers import VP_SAMPLERS, FlowEuler
from imagegen.samplers.schedules import FlowSchedule, NoiseSchedule
from tests.tiny_models import LCM_SCHEDULER, SD15_SCHEDULER, V_PRED_SCHEDULER

LINSPACE = {**SD15_SCHEDULER, "timestep_spacing": "linspace", "steps_offset": 0}
SCHEDULES = {"sd15-leading": SD15_SCHEDULER, "vpred-trailing-zsnr": V_PRED_SCHEDULER, "lcm": LCM_SCHEDULER,
             "linspace": LINSPACE}  # fmt: skip


@pytest.mark.parametrize("schedule_name", sorted(SCHEDULES))
@pytest.mark.parametrize("sampler_name", sorted(VP_SAMPLERS))
@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_every_step_count_gives_a_sound_plan(schedule_name: str, sampler_name: str, eta: float) -> None:
    schedule = NoiseSchedule.from_config(SCHEDULES[schedule_name])
    sampler = VP_SAMPLERS[sampler_name](schedule)
    for steps in range(1, sampler.max_steps() + 1):
        plan = sampler.plan(steps, eta)  # SamplerPlan checks lengths and finiteness itself
        t = plan.timesteps.numpy()
        assert plan.steps == steps and len(t) == steps and plan.coeffs.shape[0] == steps, (sampler_name, steps)
        assert bool(torch.isfinite(plan.coeffs).all()), (sampler_name, steps)
        assert np.isfinite(plan.init_noise_sigma) and plan.init_noise_sigma > 0
        assert t.min() >= 0 and t.max() <= schedule.num_train_timesteps - 1, (sampler_name, steps, t.min(), t.max())
        assert (np.diff(t) < 0).all(), (sampler_name, steps)  # strictly descending: no step repeats a timestep
        assert (plan.input_divisor > 0).all()


SD3_FLOW = {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 3.0}
FLUX_DEV_FLOW = {
    "_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 3.0,
    "use_dynamic_shifting": True, "base_shift": 0.5, "max_shift": 1.15, "base_image_seq_len": 256,
    "max_image_seq_len": 4096,
}  # fmt: skip
FLUX_SCHNELL_FLOW = {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 1.0}
FLOWS = {
    "sd3": (SD3_FLOW, "train_range", None),
    "sd3-terminal": ({**SD3_FLOW, "shift_terminal": 0.02}, "train_range", None),
    "sd3-dynamic": ({**FLUX_DEV_FLOW}, "train_range", 0.8),
    "flux-dev-256": (FLUX_DEV_FLOW, "linspace_to_1_over_n", 0.5),
    "flux-dev-4096": (FLUX_DEV_FLOW, "linspace_to_1_over_n", 1.15),
    "flux-schnell": (FLUX_SCHNELL_FLOW, "linspace_to_1_over_n", None),
}


@pytest.mark.parametrize("name", sorted(FLOWS))
def test_every_step_count_gives_a_sound_flow_plan(name: str) -> None:
    config, grid, mu = FLOWS[name]
    sampler = FlowEuler(FlowSchedule.from_config(config, sigma_grid=grid))  # type: ignore[arg-type]
    most = sampler.max_steps()
    for steps in sorted({*range(1, 65), *range(65, most, 29), most}):
        plan = sampler.plan(steps, 0.0, mu)
        t = plan.timesteps.numpy()
        assert plan.steps == steps and t.max() <= 1000 and t.min() > 0, (name, steps)
        assert (np.diff(t) < 0).all(), (name, steps)
        sigma, delta = plan.coeffs[:, 0], plan.coeffs[:, 1]
        assert float((sigma + delta)[-1]) == 0.0  # the last step lands on σ = 0: the clean image
        assert bool((delta < 0).all())


@pytest.mark.parametrize("name", sorted(FLOWS))
@pytest.mark.parametrize("steps", [1, 4, 28, 50])
def test_flow_plans_equal_diffusers(name: str, steps: int) -> None:
    from diffusers import FlowMatchEulerDiscreteScheduler

    config, grid, mu = FLOWS[name]
    theirs = FlowMatchEulerDiscreteScheduler.from_config(config)
    sigmas = np.linspace(1.0, 1 / steps, steps) if grid == "linspace_to_1_over_n" else None
    theirs.set_timesteps(steps, sigmas=sigmas, mu=mu)  # as FluxPipeline / StableDiffusion3Pipeline call it
    plan = FlowEuler(FlowSchedule.from_config(config, sigma_grid=grid)).plan(steps, 0.0, mu)  # type: ignore[arg-type]
    if not bool(torch.isfinite(theirs.sigmas).all()):  # one step with shift_terminal: 0/0 in diffusers
        assert steps == 1 and config.get("shift_terminal") and plan.timesteps.tolist() == [1000.0]
        return
    assert torch.allclose(plan.timesteps, theirs.timesteps, atol=1e-3, rtol=0)
    assert torch.allclose(plan.coeffs[:, 0], theirs.sigmas[:-1], atol=1e-6, rtol=0)
