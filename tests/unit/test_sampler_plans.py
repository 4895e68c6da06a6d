"""Every sampler builds a sound plan for every step count it accepts, on every schedule shape we load.

Plans only (no model): one timestep, divisor and coefficient row per step, timesteps inside the training
range and descending, everything finite. Trailing spacing over a float stride once yielded steps + 1
timesteps (dpmpp_2m at 61, 103, 121, 122 steps), and DDIM with η = 1 a NaN coefficient.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from imagegen.samplers import SAMPLERS
from imagegen.samplers.schedules import NoiseSchedule
from tests.tiny_models import LCM_SCHEDULER, SD15_SCHEDULER, V_PRED_SCHEDULER

LINSPACE = {**SD15_SCHEDULER, "timestep_spacing": "linspace", "steps_offset": 0}
SCHEDULES = {"sd15-leading": SD15_SCHEDULER, "vpred-trailing-zsnr": V_PRED_SCHEDULER, "lcm": LCM_SCHEDULER,
             "linspace": LINSPACE}  # fmt: skip


@pytest.mark.parametrize("schedule_name", sorted(SCHEDULES))
@pytest.mark.parametrize("sampler_name", sorted(SAMPLERS))
@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_every_step_count_gives_a_sound_plan(schedule_name: str, sampler_name: str, eta: float) -> None:
    schedule = NoiseSchedule.from_config(SCHEDULES[schedule_name])
    sampler = SAMPLERS[sampler_name](schedule)
    for steps in range(1, sampler.max_steps() + 1):
        plan = sampler.plan(steps, eta)  # SamplerPlan checks lengths and finiteness itself
        t = plan.timesteps.numpy()
        assert plan.steps == steps and len(t) == steps and plan.coeffs.shape[0] == steps, (sampler_name, steps)
        assert bool(torch.isfinite(plan.coeffs).all()), (sampler_name, steps)
        assert np.isfinite(plan.init_noise_sigma) and plan.init_noise_sigma > 0
        assert t.min() >= 0 and t.max() <= schedule.num_train_timesteps - 1, (sampler_name, steps, t.min(), t.max())
        assert (np.diff(t) < 0).all(), (sampler_name, steps)  # strictly descending: no step repeats a timestep
        assert (plan.input_divisor > 0).all()
