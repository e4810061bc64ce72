"""Stock diffusers schedulers that reproduce the TDM student sampler exactly (TDM-METHOD §2, §5).

The student sampler (`tdm.core.samplers.sample_student`, deterministic) runs on a descending grid
`[t_K, ..., t_1, 0]`: `(x0_hat, eps_hat) = G(x_t, t)`, `x_next = alpha_next x0_hat + sigma_next eps_hat`,
and the last step returns `x0_hat`. A distilled student must run from a STOCK diffusers pipeline, which
drives its scheduler as `retrieve_timesteps(scheduler, ..., timesteps=...|sigmas=...)` (i.e.
`set_timesteps(timesteps=...)` or `set_timesteps(sigmas=...)`), `latents = randn * init_noise_sigma`,
then per `t in scheduler.timesteps`: `scale_model_input(latents, t)`, `model(..., timestep=t)`,
`latents = scheduler.step(out, t, latents, **extra)[0]` (extra = `eta=0.0` / `generator` where `step`
accepts them). `inference_scheduler` returns what `tdm_inference.json` records for that; the choice,
checked against the diffusers 0.42 sources, is:

VP teachers (SD1.x/2.x, SDXL, PixArt-alpha, CogVideoX; epsilon or v_prediction):
    `DPMSolverMultistepScheduler(solver_order=1, algorithm_type="dpmsolver++", final_sigmas_type="zero")`
    driven with `timesteps=[t_K, ..., t_1]` (the pipeline's `timesteps=` argument).
    First-order DPM-Solver++ is DDIM in closed form: `x_t = (sigma_t/sigma_s) x_s + alpha_t (1 - e^{-h}) x0
    = alpha_t x0 + sigma_t eps_hat`. It accepts custom integer timesteps and steps to the NEXT ENTRY of
    that list (not to `t - T//K`), the model sees exactly our integers (int64), `init_noise_sigma = 1`,
    `scale_model_input` is the identity, epsilon/v/sample outputs are converted with the same
    `alpha, sigma` as `Schedule.to_x0_eps`, and with `final_sigmas_type="zero"` the last step has
    `sigma_t = 0, alpha_t = 1, h = inf`, so it returns `x0_hat` exactly. It also supports
    `rescale_betas_zero_snr` (with diffusers' terminal `alphas_cumprod[-1] = 2**-24`) and `trained_betas`,
    through which CogVideoX's SNR-shifted, zero-SNR schedule is carried (see `vp_alphas_cumprod`).
    Measured: max |pipeline - sample_student| ~ 1e-6 for O(1) outputs, ~1e-6 relative otherwise (float32
    tables inside diffusers), also through the real StableDiffusion/PixArt/CogVideoX pipelines.
    Pitfall: `step` returns a 1-tuple. PixArtAlphaPipeline with `num_inference_steps == 1` takes
    `step(...)[1]` and fails; for a ONE-step PixArt student use `vp_scheduler="euler"` below.

    `vp_scheduler="euler"`: `EulerDiscreteScheduler(timestep_spacing="leading", final_sigmas_type="zero")`
    with `timesteps=` is also exact in exact arithmetic (Euler in `x/alpha` against `sigma/alpha` is DDIM,
    Karras et al. 2022) and its `step` returns `(prev_sample, pred_original_sample)`. It needs
    `timestep_spacing="leading"`: only then is `init_noise_sigma = sqrt(sigma_max^2 + 1) = 1/alpha_{t_K}`;
    with "linspace"/"trailing" diffusers uses `sigma_max` and the start is off by the factor
    `sqrt(1 - abar_{t_K})` (measured 2e-4 .. 3e-2 output error). It works in `x/alpha` space, so with a
    zero-SNR teacher (`sigma_max = 4096`) float32 cancellation costs up to ~5e-6 (DPM: ~1e-6); hence DPM
    is the default.

Rectified-flow teachers (SD3, SD3.5; output = velocity, model timestep = 1000 * sigma):
    `FlowMatchEulerDiscreteScheduler(shift=1.0, use_dynamic_shifting=False)` driven with
    `sigmas=[t_K/T, ..., t_1/T]` (the pipeline's `sigmas=` argument). Its step `x + (sigma_next - sigma) v`
    is our DDIM step for `alpha = 1 - sigma`; the appended terminal sigma 0 makes the last step
    `x - sigma v = x0_hat`; its timesteps are `sigmas * T` (float32), i.e. our grid; the SD3 pipeline does
    not multiply by `init_noise_sigma` nor call `scale_model_input`. The grid already carries the
    teacher's time shift, and `set_timesteps(sigmas=...)` RE-APPLIES `shift` (or `time_shift(mu)` when
    `use_dynamic_shifting`) to given sigmas, so the exported config must have `shift=1.0` and
    `use_dynamic_shifting=False` (FLUX pipelines pass `mu`, which is then ignored). Keeping the teacher's
    scheduler (shift 3) and passing our sigmas shifts twice (measured error 0.35). `stochastic_sampling`
    must stay False (it re-noises with fresh noise).

Why not the others (diffusers 0.42):
- TCDScheduler, gamma (eta) = 0: custom timesteps work and the steps are DDIM, but on the last step
  `prev_timestep = torch.tensor(0)` (not -1), so it returns `sqrt(abar_0) x0_hat + sqrt(1 - abar_0) eps_hat`
  instead of `x0_hat` (`final_alpha_cumprod`/`set_alpha_to_one` are never reached); error 0.05 .. 0.14 in
  our toy check (sigma_0 = 0.029 of noise left for SD betas). Its `step` default is eta = 0.3; pipelines
  pass 0.0 only where they forward `eta`.
- LCMScheduler: every non-final step re-noises with FRESH noise,
  `alpha_prev * denoised + sigma_prev * randn` (TDM's stochastic variant, not the deterministic
  sampler), and the boundary scalings `c_skip = 0.25/((10 t)^2 + 0.25)`, `c_out` are not exactly 0/1.
- DDIMScheduler / CogVideoXDDIMScheduler / CogVideoXDPMScheduler: `set_timesteps(num_inference_steps)`
  takes no custom timesteps (`retrieve_timesteps` raises), and `step` uses `prev_timestep = t - T // K`,
  i.e. a uniform stride. They reproduce only grids of that form (e.g. "trailing" with K dividing T:
  `[999, 749, 499, 249]`), never `[899, 674, 449, 224]` or `[999, 856, 665, 399]` (measured 0.08 off).
  CogVideoX's classes also default to `snr_shift_scale=3.0`, part of the teacher's schedule.
- DDPMScheduler accepts custom timesteps but is ancestral (adds variance noise whenever t > 0).
- EulerDiscreteScheduler: usable, see above.

VP schedules: the exported scheduler rebuilds `alphas_cumprod` from the teacher's config, so the
student's `VPSchedule` must equal `vp_alphas_cumprod(config)` (float64): the teacher class's default
beta keys, `rescale_betas_zero_snr`, CogVideoX's `snr_shift_scale` (default 3.0 for the CogVideoX
classes, applied to `alphas_cumprod` before the zero-SNR rescale) and diffusers' terminal value
`2**-24` in place of an exact zero. `VPSchedule(vp_betas(config))` is such a schedule. (Against an exact
zero, alpha_999 = 0, a grid starting at 999 differs by 3e-5 .. 1e-4 after 4 steps, 1e-3 after 1 step.)
"""

from __future__ import annotations

import torch

from ..scheduler_config import ZERO_SNR_TERMINAL, _resolved, vp_alphas_cumprod

KINDS = ("vp", "flow")
VP_SCHEDULERS = ("dpm", "euler")
def vp_betas(config: dict, terminal: float | None = ZERO_SNR_TERMINAL) -> torch.Tensor:
    """Betas with `cumprod(1 - betas) == vp_alphas_cumprod(config, terminal)`: `VPSchedule(vp_betas(c))`
    is the student schedule the exported scheduler reproduces. Raises if the terminal clamp makes
    `alphas_cumprod` non-monotone (e.g. linear betas with zero SNR: abar[T-2] < 2**-24)."""
    abar = vp_alphas_cumprod(config, terminal)
    betas = 1 - torch.cat([abar[:1], abar[1:] / abar[:-1]])
    if torch.any(betas <= 0) or torch.any(betas > 1):
        raise ValueError("alphas_cumprod is not strictly decreasing; no betas in (0, 1] reproduce it")
    return betas


def _check_grid(grid, T: int, discrete: bool) -> list[float]:
    g = [float(x) for x in (grid.tolist() if torch.is_tensor(grid) else grid)]
    if len(g) < 2 or g[-1] != 0 or any(b >= a for a, b in zip(g, g[1:])):
        raise ValueError(f"grid must be strictly descending and end at 0, got {g}")
    if discrete:
        if any(x != round(x) for x in g) or g[0] > T - 1:
            raise ValueError(f"a VP grid must hold integers in [0, {T - 1}], got {g}")
    elif g[0] > T:
        raise ValueError(f"a flow grid must lie in [0, {T}], got {g}")
    return g


def _vp_beta_config(config: dict) -> dict:
    """Beta keys for the inference scheduler: the teacher's own keys when diffusers rebuilds the same
    alphas_cumprod from them, else `trained_betas` carrying the effective schedule (CogVideoX SNR shift)."""
    c = _resolved(config)
    keys = dict(num_train_timesteps=int(c["num_train_timesteps"]),
                rescale_betas_zero_snr=bool(c["rescale_betas_zero_snr"]))
    if float(c["snr_shift_scale"]) == 1.0:
        tb = c["trained_betas"]
        keys.update(beta_schedule=c["beta_schedule"], beta_start=float(c["beta_start"]),
                    beta_end=float(c["beta_end"]),
                    trained_betas=None if tb is None else [float(b) for b in torch.as_tensor(tb).tolist()])
        return keys
    abar = vp_alphas_cumprod(config, terminal=None)
    betas = 1 - torch.cat([abar[:1], abar[1:] / abar[:-1]])  # terminal beta 1 under zero SNR
    # rescale_betas_zero_snr=True on an already zero-terminal schedule only triggers the 2**-24 clamp.
    keys.update(beta_schedule="linear", beta_start=float(betas[0]), beta_end=float(betas[-1]),
                trained_betas=betas.tolist(), rescale_betas_zero_snr=bool(abar[-1] == 0))
    return keys


def inference_scheduler(train_scheduler_config: dict, grid, kind: str, *, vp_scheduler: str = "dpm") -> dict:
    """`{"class_name", "config", "set_timesteps_kwargs"}` for running the student from a stock pipeline.

    `train_scheduler_config`: the teacher's `scheduler_config.json` as a dict. `grid`: the student's
    descending grid `[t_K, ..., t_1, 0]` on the teacher's time axis. `kind`: 'vp' (prediction type taken
    from the config) or 'flow'. `set_timesteps_kwargs` is both what to pass to `set_timesteps` and the
    pipeline argument (`timesteps=` for VP, `sigmas=` for flow); run the pipeline with guidance 1.
    """
    if kind not in KINDS:
        raise ValueError(f"unknown kind {kind!r}; expected one of {KINDS}")
    T = int(train_scheduler_config.get("num_train_timesteps", 1000))
    if kind == "flow":
        g = _check_grid(grid, T, discrete=False)
        config = dict(num_train_timesteps=T, shift=1.0, use_dynamic_shifting=False, invert_sigmas=False,
                      shift_terminal=None, use_karras_sigmas=False, use_exponential_sigmas=False,
                      use_beta_sigmas=False, time_shift_type="exponential", stochastic_sampling=False)
        return {"class_name": "FlowMatchEulerDiscreteScheduler", "config": config,
                "set_timesteps_kwargs": {"sigmas": [t / T for t in g[:-1]]}}

    g = _check_grid(grid, T, discrete=True)
    prediction_type = _resolved(train_scheduler_config)["prediction_type"]
    if prediction_type not in ("epsilon", "v_prediction", "sample"):
        raise ValueError(f"a VP teacher needs prediction_type epsilon, v_prediction or sample, got {prediction_type!r}")
    common = dict(_vp_beta_config(train_scheduler_config), prediction_type=prediction_type,
                  use_karras_sigmas=False, use_exponential_sigmas=False, use_beta_sigmas=False,
                  final_sigmas_type="zero", steps_offset=0)
    if vp_scheduler == "dpm":
        class_name = "DPMSolverMultistepScheduler"
        config = dict(common, solver_order=1, algorithm_type="dpmsolver++", solver_type="midpoint",
                      lower_order_final=True, euler_at_final=False, use_lu_lambdas=False,
                      use_flow_sigmas=False, thresholding=False, variance_type=None,
                      timestep_spacing="linspace", use_dynamic_shifting=False)
    elif vp_scheduler == "euler":
        class_name = "EulerDiscreteScheduler"
        # "leading" is what makes init_noise_sigma = sqrt(sigma_max^2 + 1) = 1 / alpha_{t_K}
        config = dict(common, timestep_spacing="leading", interpolation_type="linear", timestep_type="discrete")
    else:
        raise ValueError(f"unknown vp_scheduler {vp_scheduler!r}; expected one of {VP_SCHEDULERS}")
    return {"class_name": class_name, "config": config,
            "set_timesteps_kwargs": {"timesteps": [int(t) for t in g[:-1]]}}


def flow_steps_scheduler(train_scheduler_config: dict, grid) -> dict:
    """For a flow pipeline that calls `set_timesteps(num_inference_steps)` only (WanPipeline): flow-match Euler with
    `shift=1` makes `linspace(1, 1/T, K)`, and `shift_terminal=1/K` stretches it (an affine map fixing 1) to
    `1, (K-1)/K, ..., 1/K`: the 'linear' grid `t_k = T k / K`, stepped as `sigmas=` steps it (see above). No other
    grid comes out of K alone."""
    T = int(train_scheduler_config.get("num_train_timesteps", 1000))
    g = _check_grid(grid, T, discrete=False)
    K = len(g) - 1
    if any(abs(t - T * k / K) > 1e-9 * T for t, k in zip(g, range(K, 0, -1))):
        raise ValueError(f"this pipeline passes no timesteps to its scheduler, which then makes only the linear grid "
                         f"T k / K; the student's grid {g} is not it: train with student.grid=linear")
    spec = inference_scheduler(train_scheduler_config, grid, "flow")
    spec["config"]["shift_terminal"] = 1 / K if K > 1 else None  # K = 1: [1] already (a stretch would divide by 0)
    spec["set_timesteps_kwargs"] = {"num_inference_steps": K}
    return spec


def build_inference_scheduler(spec: dict):
    """Instantiate the diffusers scheduler of a spec from `inference_scheduler` (or tdm_inference.json)."""
    import diffusers

    cls = getattr(diffusers, spec["class_name"])
    return cls.from_config(dict(spec["config"]))
