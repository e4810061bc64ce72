"""A stock diffusers pipeline driving the exported scheduler reproduces `sample_student` exactly."""

import inspect
import json

import pytest
import torch

pytest.importorskip("diffusers")

from tdm.core.denoiser import Denoiser  # noqa: E402
from tdm.core.samplers import sample_student  # noqa: E402
from tdm.core.schedules import FlowSchedule, VPSchedule, teacher_grid  # noqa: E402
from tdm.export.scheduler import (  # noqa: E402
    build_inference_scheduler,
    inference_scheduler,
    vp_alphas_cumprod,
    vp_betas,
)
from tdm.scheduler_config import vp_schedule

TOL = 1e-5  # absolute for O(1) outputs; relative to max|x| beyond (diffusers keeps float32 tables)
SHAPE = (3, 4, 4, 4)  # (batch, channels, h, w) latents
SD15 = {"_class_name": "PNDMScheduler", "beta_schedule": "scaled_linear", "beta_start": 0.00085,
        "beta_end": 0.012, "num_train_timesteps": 1000, "prediction_type": "epsilon", "steps_offset": 1,
        "set_alpha_to_one": False, "skip_prk_steps": True}
SD21_V = {"_class_name": "DDIMScheduler", "beta_schedule": "scaled_linear", "beta_start": 0.00085,
          "beta_end": 0.012, "num_train_timesteps": 1000, "prediction_type": "v_prediction",
          "timestep_spacing": "leading", "steps_offset": 1, "clip_sample": False}
PIXART = {"_class_name": "DPMSolverMultistepScheduler", "beta_schedule": "linear", "beta_start": 0.0001,
          "beta_end": 0.02, "num_train_timesteps": 1000, "prediction_type": "epsilon", "solver_order": 2,
          "variance_type": None}
COGVIDEOX_2B = {"_class_name": "CogVideoXDDIMScheduler", "beta_schedule": "scaled_linear", "beta_start": 0.00085,
                "beta_end": 0.012, "num_train_timesteps": 1000, "prediction_type": "v_prediction",
                "rescale_betas_zero_snr": True, "set_alpha_to_one": True, "snr_shift_scale": 3.0,
                "timestep_spacing": "trailing", "clip_sample": False}
COGVIDEOX_5B = dict(COGVIDEOX_2B, snr_shift_scale=1.0)
SD_ZERO_SNR_V = dict(SD21_V, rescale_betas_zero_snr=True, timestep_spacing="trailing")
SD3 = {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 3.0}
VP_GRIDS = ([899, 674, 449, 224, 0], [999, 856, 665, 399, 0], [899, 0])


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield


class ToyNet:
    """A fixed random linear map of x plus a function of t; records the timesteps it is called with."""

    def __init__(self, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        d = SHAPE[1] * SHAPE[2] * SHAPE[3]
        self.W = (torch.eye(d) + 0.05 * torch.randn(d, d, generator=g) / d**0.5).double()
        self.b = torch.randn(d, generator=g).double()
        self.seen = []

    def __call__(self, x, t, cond=None):
        t = torch.as_tensor(t)
        self.seen.append(t.reshape(-1)[0].item())
        tt = t.to(x.dtype).reshape(-1, 1)
        out = x.reshape(x.shape[0], -1) @ self.W.to(x.dtype) + 0.05 * torch.sin(tt / 150.0) * self.b.to(x.dtype)
        return out.reshape(x.shape)


def stock_pipeline(spec: dict, net, noise: torch.Tensor):
    """What StableDiffusion/SDXL/PixArt/CogVideoX/SD3 pipelines do with a scheduler (diffusers 0.42)."""
    scheduler = build_inference_scheduler(json.loads(json.dumps(spec)))  # as stored in tdm_inference.json
    kw = spec["set_timesteps_kwargs"]
    # retrieve_timesteps(scheduler, num_inference_steps, device, timesteps=..., sigmas=...)
    (name, values), = kw.items()
    assert name in inspect.signature(scheduler.set_timesteps).parameters
    scheduler.set_timesteps(**{name: values}, device="cpu")
    # prepare_latents: randn * init_noise_sigma (SD3 does not multiply; FlowMatch has no such attribute)
    latents = noise * getattr(scheduler, "init_noise_sigma", 1.0)
    # prepare_extra_step_kwargs: eta (pipeline default 0.0) and generator where step accepts them
    params = inspect.signature(scheduler.step).parameters
    extra = {k: v for k, v in (("eta", 0.0), ("generator", None)) if k in params}
    for t in scheduler.timesteps:
        model_input = scheduler.scale_model_input(latents, t) if hasattr(scheduler, "scale_model_input") else latents
        out = net(model_input, t.expand(latents.shape[0]))
        latents = scheduler.step(out, t, latents, **extra, return_dict=False)[0]
    return latents, scheduler


def close(out: torch.Tensor, ref: torch.Tensor) -> bool:
    return (out - ref).abs().max().item() < TOL * max(1.0, ref.abs().max().item())


def ours(schedule, prediction_type: str, grid, noise: torch.Tensor):
    net = ToyNet()
    x = sample_student(Denoiser(net, schedule, prediction_type), noise, torch.tensor(grid, dtype=torch.float64))
    return x, net.seen


def noise(seed: int = 1) -> torch.Tensor:
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@pytest.mark.parametrize("vp_scheduler", ["dpm", "euler"])
@pytest.mark.parametrize("grid", VP_GRIDS)
@pytest.mark.parametrize("config", [SD15, SD21_V, PIXART], ids=["sd15-eps", "sd21-v", "pixart-eps"])
def test_vp_pipeline_matches_student(config, grid, vp_scheduler):
    schedule = vp_schedule(config)  # the library's own path for ordinary VP teachers
    assert torch.allclose(schedule.log_abar.exp(), vp_alphas_cumprod(config), rtol=1e-12, atol=0)
    z = noise()
    ref, ref_seen = ours(schedule, config["prediction_type"], grid, z)
    spec = inference_scheduler(config, grid, "vp", vp_scheduler=vp_scheduler)
    net = ToyNet()
    out, scheduler = stock_pipeline(spec, net, z)
    assert close(out, ref)
    assert net.seen == [float(t) for t in grid[:-1]] == ref_seen   # the model sees exactly our timesteps
    if vp_scheduler == "dpm":
        assert scheduler.timesteps.dtype == torch.int64 and scheduler.init_noise_sigma == 1.0


@pytest.mark.parametrize("grid", VP_GRIDS + ([999, 749, 499, 249, 0], [999, 0]))
@pytest.mark.parametrize("config", [COGVIDEOX_2B, COGVIDEOX_5B, SD_ZERO_SNR_V],
                         ids=["cogvideox2b", "cogvideox5b", "sd-zero-snr-v"])
def test_zero_snr_pipeline_matches_student(config, grid):
    """Zero-SNR (and CogVideoX's SNR shift): exact once the student's VPSchedule has the teacher's
    alphas_cumprod with diffusers' terminal 2**-24 (vp_schedule ignores both keys)."""
    schedule = VPSchedule(vp_betas(config))
    z = noise()
    ref, _ = ours(schedule, "v_prediction", grid, z)
    spec = inference_scheduler(config, grid, "vp")
    scheduler = build_inference_scheduler(spec)
    abar = scheduler.alphas_cumprod.double()  # float32 inside diffusers: compare alpha and sigma
    assert torch.allclose(abar.sqrt(), vp_alphas_cumprod(config).sqrt(), rtol=0, atol=2e-6)
    assert torch.allclose((1 - abar).sqrt(), (1 - vp_alphas_cumprod(config)).sqrt(), rtol=0, atol=2e-6)
    net = ToyNet()
    out, _ = stock_pipeline(spec, net, z)
    assert close(out, ref)
    assert net.seen == [float(t) for t in grid[:-1]]


def test_cogvideox_alphas_cumprod_match_its_own_scheduler():
    from diffusers import CogVideoXDDIMScheduler

    for config in (COGVIDEOX_2B, COGVIDEOX_5B):
        theirs = CogVideoXDDIMScheduler.from_config(config).alphas_cumprod.double()
        assert torch.allclose(theirs, vp_alphas_cumprod(config, terminal=None), rtol=1e-6, atol=1e-12)


@pytest.mark.parametrize("K", [4, 3, 1])
def test_flow_pipeline_matches_student(K):
    schedule = FlowSchedule(shift=3.0)
    grid = teacher_grid(K, schedule)  # shifted float grid, e.g. [1000, 857.14, 600, 0] for K = 3
    z = noise()
    ref, _ = ours(schedule, "flow", grid, z)
    spec = inference_scheduler(SD3, grid, "flow")
    assert spec["config"]["shift"] == 1.0  # set_timesteps(sigmas=...) would shift our grid again
    net = ToyNet()
    out, scheduler = stock_pipeline(spec, net, z)
    assert close(out, ref)
    want = grid[:-1].to(torch.float32)
    got = torch.tensor(net.seen, dtype=torch.float32)
    assert torch.allclose(got, want, rtol=0, atol=1e-4)  # float32 rounding of sigma * 1000
    if K != 3:
        assert torch.equal(got, want)  # integer-valued grids: exactly


def test_pixart_one_step_reads_pred_original_sample():
    """PixArtAlphaPipeline takes step(...)[1] when num_inference_steps == 1: Euler provides x0_hat there."""
    grid = [899, 0]
    z = noise()
    ref, _ = ours(vp_schedule(PIXART), "epsilon", grid, z)
    spec = inference_scheduler(PIXART, grid, "vp", vp_scheduler="euler")
    scheduler = build_inference_scheduler(spec)
    scheduler.set_timesteps(**spec["set_timesteps_kwargs"])
    t = scheduler.timesteps[0]
    latents = z * scheduler.init_noise_sigma
    out = ToyNet()(scheduler.scale_model_input(latents, t), t.expand(SHAPE[0]))
    x0 = scheduler.step(out, t, latents, return_dict=False)[1]
    assert close(x0, ref)


def test_spec_is_json_and_rejects_bad_grids():
    spec = inference_scheduler(SD15, [899, 674, 449, 224, 0], "vp")
    assert spec["class_name"] == "DPMSolverMultistepScheduler"
    assert spec["set_timesteps_kwargs"] == {"timesteps": [899, 674, 449, 224]}
    assert json.loads(json.dumps(spec)) == spec
    assert inference_scheduler(SD3, [1000.0, 500.0, 0.0], "flow")["set_timesteps_kwargs"] == {"sigmas": [1.0, 0.5]}
    with pytest.raises(ValueError):
        inference_scheduler(SD15, [899, 674.5, 0], "vp")
    with pytest.raises(ValueError):
        inference_scheduler(SD15, [899, 449], "vp")
    with pytest.raises(ValueError):
        inference_scheduler(SD15, [1000, 0], "vp")
    with pytest.raises(ValueError):
        inference_scheduler(SD3, [1000, 0], "edm")


def test_real_stock_pipelines_end_to_end():
    """StableDiffusionPipeline, PixArtAlphaPipeline (K = 1) and StableDiffusion3Pipeline themselves, with tiny
    random networks and given prompt embeddings, return the student's latents."""
    pytest.importorskip("transformers")
    from diffusers import (
        AutoencoderKL,
        PixArtAlphaPipeline,
        PixArtTransformer2DModel,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )

    torch.manual_seed(0)
    vae = AutoencoderKL(block_out_channels=(8,), latent_channels=4, norm_num_groups=4,
                        down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",))
    emb, pooled, mask = torch.randn(2, 5, 8), torch.randn(2, 8), torch.ones(2, 5)
    common = dict(guidance_scale=1.0, height=8, width=8, output_type="latent")
    z = torch.randn((2, 4, 8, 8), generator=torch.Generator().manual_seed(3))

    def run(pipe, spec, **kw):
        pipe.set_progress_bar_config(disable=True)
        with torch.no_grad():
            return pipe(generator=torch.Generator().manual_seed(3), **common, **kw,
                        **spec["set_timesteps_kwargs"]).images

    def student(net, schedule, prediction_type, grid, learned_sigma=False):
        with torch.no_grad():
            return sample_student(Denoiser(net, schedule, prediction_type, learned_sigma), z,
                                  torch.as_tensor(grid, dtype=torch.float64))

    unet = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
                                block_out_channels=(8, 16), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=8,
                                attention_head_dim=2, norm_num_groups=4).eval()
    for config in (SD15, SD21_V):
        grid = [999, 856, 665, 399, 0]
        spec = inference_scheduler(config, grid, "vp")
        pipe = StableDiffusionPipeline(vae=vae, text_encoder=None, tokenizer=None, unet=unet,
                                       scheduler=build_inference_scheduler(spec), safety_checker=None,
                                       feature_extractor=None, requires_safety_checker=False)
        ref = student(lambda x, t, c: unet(x, t, encoder_hidden_states=emb).sample,
                      vp_schedule(config), config["prediction_type"], grid)
        assert close(run(pipe, spec, prompt_embeds=emb).double(), ref)

    pixart = PixArtTransformer2DModel(sample_size=8, num_layers=1, patch_size=2, attention_head_dim=8,
                                      num_attention_heads=2, in_channels=4, out_channels=8, cross_attention_dim=16,
                                      caption_channels=8, norm_num_groups=4).eval()
    spec = inference_scheduler(PIXART, [899, 0], "vp", vp_scheduler="euler")  # one step: pipeline reads step()[1]
    pipe = PixArtAlphaPipeline(tokenizer=None, text_encoder=None, vae=vae, transformer=pixart,
                               scheduler=build_inference_scheduler(spec))
    ref = student(lambda x, t, c: pixart(x, encoder_hidden_states=emb, encoder_attention_mask=mask, timestep=t,
                                         added_cond_kwargs={"resolution": None, "aspect_ratio": None}).sample,
                  vp_schedule(PIXART), "epsilon", [899, 0], learned_sigma=True)
    out = run(pipe, spec, prompt_embeds=emb, prompt_attention_mask=mask, use_resolution_binning=False)
    assert close(out.double(), ref)

    sd3 = SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, num_layers=1, attention_head_dim=8,
                                num_attention_heads=2, joint_attention_dim=8, caption_projection_dim=16,
                                pooled_projection_dim=8, out_channels=4).eval()
    schedule = FlowSchedule(shift=3.0)
    grid = teacher_grid(3, schedule)
    spec = inference_scheduler(SD3, grid, "flow")
    pipe = StableDiffusion3Pipeline(transformer=sd3, scheduler=build_inference_scheduler(spec), vae=vae,
                                    text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None,
                                    text_encoder_3=None, tokenizer_3=None)
    ref = student(lambda x, t, c: sd3(hidden_states=x, timestep=t.float(), encoder_hidden_states=emb,
                                      pooled_projections=pooled).sample, schedule, "flow", grid)
    assert close(run(pipe, spec, prompt_embeds=emb, pooled_prompt_embeds=pooled).double(), ref)
