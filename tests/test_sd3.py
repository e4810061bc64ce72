"""SD3 (rectified flow, TDM-METHOD §5) on a tiny pipeline built in code: the shifted grid, the exported
FlowMatchEulerDiscreteScheduler(sigmas=...), the prompt embeddings (its exports: tests/test_export_formats.py)."""

import pytest
import torch
from family_harness import overrides, teacher_folder
from tiny_pipelines import make_sd3

from tdm.config import resolve


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    return teacher_folder(tmp_path_factory, "sd3", make_sd3)


def test_shifted_grid_and_exported_sigmas():
    """The preset's 'shifted' grid (s = 3) is a valid float grid on [0, 1000], and the exported
    FlowMatchEulerDiscreteScheduler, driven with its sigmas, steps through exactly that grid."""
    from tdm.core.schedules import GridSpec, timestep_grid
    from tdm.export.scheduler import build_inference_scheduler, inference_scheduler

    grid = timestep_grid(4, GridSpec("shifted", shift=3.0), T=1000, discrete=False)
    assert grid.dtype == torch.float64 and grid.tolist() == [999.0, 899.0, 749.0, 499.0, 0.0]
    spec = inference_scheduler({"_class_name": "FlowMatchEulerDiscreteScheduler", "shift": 3.0}, grid, "flow")
    sched = build_inference_scheduler(spec)
    sched.set_timesteps(**spec["set_timesteps_kwargs"])
    assert torch.allclose(sched.sigmas.double(), grid / 1000, atol=1e-7)  # terminal 0 appended
    assert torch.allclose(sched.timesteps.double(), grid[:-1], atol=1e-4)


def test_prompt_embeddings_layout(teacher, tmp_path, one_thread):
    from tdm.families import build_family

    fam = build_family(resolve("sd3", overrides(teacher)), run_dir=tmp_path)
    e, p = fam.embeddings["prompt_embeds"], fam.embeddings["pooled"]
    n = len(fam.prompts) + 1  # + the empty prompt
    assert e.shape == (n, 77 + 256, 96) and p.shape == (n, 32 + 40)
    assert (e[:, :77, 80:] == 0).all()  # CLIP features zero-padded to T5's width
    assert fam.sample_shape(2) == (2, 16, 8, 8) and fam.schedule.shift == 3.0 and fam.prediction_type == "flow"
