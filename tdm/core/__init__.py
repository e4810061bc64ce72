"""The math core, pure torch (no diffusers, accelerate or config imports): schedules and student grids, the
denoiser interface and CFG, samplers, the run's random generators."""
