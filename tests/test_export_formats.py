"""Every export of every diffusers family, loaded where users look, on tiny pipelines built in code: a fresh stock
pipeline through its public loader (the model card's own code, run as written) and ComfyUI's LoRA key map, rebuilt
here from its source (Comfy-Org/ComfyUI `comfy/lora.py` `model_lora_keys_unet`, `comfy/utils.py`
`mmdit_to_diffusers` / `pixart_to_diffusers`, the LoRA adapter of `comfy/weight_adapter/lora.py`; ComfyUI itself is
not run). Each LoRA module of a file must attach and the pipeline must reproduce the library's sampler to 1e-4 (fp32;
relative where the latents exceed 1), or the export is refused with a message that names the format that works."""

import json

import pytest
import torch
from family_harness import lora_run, moved_student, teacher_folder
from safetensors import safe_open
from safetensors.torch import load_file
from tiny_pipelines import make_cogvideox, make_flux, make_pixart, make_sd3, make_sd15, make_sdxl, make_wan

from tdm.export.pipeline import export_run, load_pipeline
from tdm.export.scheduler import build_inference_scheduler
from tdm.families import family_class

FAMILIES = {  # name: (preset, builder, extra overrides, pipeline call arguments)
    "sd15": ("sd15", make_sd15, (), {}),
    "sdxl": ("sdxl", make_sdxl, (), {}),
    "pixart": ("pixart-512", make_pixart, (), {"use_resolution_binning": False, "height": 64, "width": 64}),
    "sd3": ("sd3", make_sd3, (), {}),
    "cogvideox": ("cogvideox-2b", make_cogvideox, ("teacher.frames=9",), {"num_frames": 9, "height": 64, "width": 64}),
    "flux": ("flux-dev", make_flux, (), {"height": 64, "width": 64}),
    "wan": ("wan-1.3b", make_wan, ("teacher.frames=9", "teacher.width=64"),
            {"num_frames": 9, "height": 64, "width": 64}),
}
TIMESTEPS = {"sd15": [899, 674, 449, 224], "sdxl": [899, 674, 449, 224], "pixart": [899, 674, 449, 224],
             "sd3": [999.0, 899.0, 749.0, 499.0], "cogvideox": [999, 856, 665, 399],
             "flux": [999.0, 899.0, 749.0, 499.0], "wan": [1000.0, 750.0, 500.0, 250.0]}  # the presets' 4-step grids
GUIDANCE = {"flux": 3.5}  # the pipeline's guidance_scale: FLUX.1-dev's embedding at the preset's scale; else 1
PIPE_ARGS = {"prompt_embeds": "prompt_embeds", "pooled": "pooled_prompt_embeds",
             "prompt_attention_mask": "prompt_attention_mask"}  # condition -> the pipeline's argument


@pytest.fixture(scope="module", params=list(FAMILIES))
def trained(request, tmp_path_factory):
    """(family, teacher folder, run folder, (x_T, cond, the library's 4-step student)) of a 2-iteration LoRA run."""
    name = request.param
    preset, build, extra, _ = FAMILIES[name]
    teacher = teacher_folder(tmp_path_factory, name, build)
    run = lora_run(preset, teacher, tmp_path_factory.mktemp(f"{name}_run"), *extra)
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return name, teacher[0], run, moved_student(run)
    finally:
        torch.set_num_threads(n)


def _sample(name, pipe, x_T, cond, kwargs) -> torch.Tensor:
    pipe.set_progress_bar_config(disable=True)
    args = {PIPE_ARGS[k]: v for k, v in cond.items() if k in PIPE_ARGS}
    out = pipe(**args, latents=x_T.clone(), output_type="latent", **FAMILIES[name][3], **kwargs)
    return out.frames if name in ("cogvideox", "wan") else out.images


def _error(x, x_ours) -> tuple[float, str]:
    """max |x - x_ours| over max(1, max |x_ours|) (tiny PixArt's latents reach 250), and a line that says both."""
    err, top = (x - x_ours).abs().max().item(), x_ours.abs().max().item()
    return err / max(1.0, top), f"max |pipeline - sample_student| = {err:.2e} (max |x| {top:.3g})"


def _lora_file(out):
    files = list(out.glob("*.safetensors"))
    assert len(files) <= 1, files
    return files[0] if files else None


def _modules_in(lora: dict) -> int:
    return sum(k.endswith(("lora_A.weight", "lora_down.weight")) for k in lora)


def _attached(*modules) -> int:
    """LoRA layers holding an adapter in `modules` (a pipeline: its networks)."""
    from peft.tuners.lora import LoraLayer

    if len(modules) == 1 and hasattr(modules[0], "components"):
        modules = [c for c in modules[0].components.values() if isinstance(c, torch.nn.Module)]
    return sum(isinstance(m, LoraLayer) and bool(m.lora_A) for c in modules for m in c.modules())


@pytest.mark.parametrize("fmt", ["diffusers", "kohya", "full"])
def test_export_in_stock_diffusers(trained, tmp_path, one_thread, fmt):
    """The model card's code, run as written (fp32 on a CPU), attaches every LoRA module of the file and reproduces
    the library's 4-step sampler to 1e-4; `tdm.load_pipeline` sets up the same pipeline. A file diffusers has no
    loader for carries no such code and `load_pipeline` refuses it; a kohya file no stock loader reads is refused."""
    name, teacher, run, (x_T, cond, x_ours) = trained
    fam = family_class(name)
    if fmt == "kohya" and "kohya" not in fam.diffusers_reads + fam.comfyui_reads:
        with pytest.raises(ValueError, match=f"export --format {fam.diffusers_reads[0]} or full") as err:
            export_run(run, fmt, tmp_path / fmt)
        assert not (tmp_path / fmt).exists() and "\n" not in str(err.value)
        print(f"{name} kohya: refused: {err.value}")
        return
    out = export_run(run, fmt, tmp_path / fmt)
    spec = json.loads((out / "tdm_inference.json").read_text())
    assert spec["timesteps"] == TIMESTEPS[name] and spec["guidance_scale"] == GUIDANCE.get(name, 1.0)
    card = (out / "README.md").read_text()
    lora_file = _lora_file(out)
    assert (lora_file is None) == (fmt == "full")
    if lora_file is not None:  # the settings travel in the LoRA file itself
        with safe_open(str(lora_file), "pt") as f:
            meta, lora = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
        assert meta["tdm.base_model_path"] == str(teacher.resolve()) and meta["tdm.rank"] == "4"
        assert meta["tdm.alpha"] == "8.0" and meta["tdm.alpha_folded"] == "true"
        assert meta["tdm.student_steps"] == "4" and json.loads(meta["tdm.timesteps"]) == spec["timesteps"]
        assert meta["tdm.guidance_scale"] == str(GUIDANCE.get(name, 1.0))
        assert meta["tdm.scheduler_class"] == spec["scheduler"]["class_name"]
        assert all(float(v) == lora[k.replace(".alpha", ".lora_down.weight")].shape[0]  # alpha / rank = 1
                   for k, v in lora.items() if k.endswith(".alpha"))
        assert json.loads(meta["tdm.comfyui_sigmas"])[-1] == 0 and "| student steps | 4 |" in card
    if fmt != "full" and fmt not in fam.diffusers_reads:
        assert "```python" not in card and f"--format {fam.diffusers_reads[0]}" in card
        with pytest.raises(ValueError, match=f"attached 0 of its {_modules_in(lora)} LoRA modules") as err:
            load_pipeline(teacher, lora=out)
        print(f"{name} {fmt}: stock diffusers attaches 0/{_modules_in(lora)} LoRA modules: refused ({err.value})")
        return

    code = card.split("```python\n")[1].split("\n```")[0]
    *setup, call = code.splitlines()
    assert call.startswith(("image = pipe(", "video = pipe(")) and "**kwargs" in call
    scope = {}
    exec("\n".join(setup), scope)  # noqa: S102 -- the card's code, as a user runs it
    pipe, kwargs = scope["pipe"], scope["kwargs"]
    assert kwargs == {"guidance_scale": GUIDANCE.get(name, 1.0), **spec["scheduler"]["set_timesteps_kwargs"]}
    total = 0 if lora_file is None else _modules_in(lora)
    attached = _attached(pipe)
    if name == "pixart" and lora_file:  # the card merges peft's adapter into the weights: count before the merge
        from peft import PeftModel

        attached = _attached(PeftModel.from_pretrained(
            type(pipe.transformer).from_pretrained(teacher, subfolder="transformer"), str(out)))
    assert attached == total and (total > 0) == (fmt != "full")
    err, line = _error(_sample(name, pipe, x_T, cond, kwargs), x_ours)
    print(f"{name} {fmt}: stock diffusers (model card code) attached {attached}/{total} LoRA modules, {line}")
    assert err < 1e-4

    ours, ours_kwargs = load_pipeline(out) if fmt == "full" else load_pipeline(teacher, lora=out)
    assert ours_kwargs == kwargs
    # StableDiffusionPipeline.__init__ rewrites a loaded scheduler's steps_offset to 1, which given timesteps ignore
    config = {k: v for k, v in spec["scheduler"]["config"].items() if k != "steps_offset"}
    for p in (ours, pipe):
        assert type(p.scheduler).__name__ == spec["scheduler"]["class_name"]
        assert {k: p.scheduler.config[k] for k in config} == config


# -- ComfyUI's LoRA key map, over diffusers' module names -------------------------------------------------------------
# ComfyUI keys a LoRA by names it derives from its own model's weights (ldm / MMDiT / PixArt names) and from the
# diffusers names its converters map onto them; the composition lands on a diffusers module (and, for its fused qkv
# weights, on rows of it), which is what these maps return: LoRA name -> [(diffusers module, first row or None)].
UP_DOWN = ((".lora_up.weight", ".lora_down.weight"), ("_lora.up.weight", "_lora.down.weight"),
           (".lora_B.weight", ".lora_A.weight"), (".lora.up.weight", ".lora.down.weight"),
           (".lora_linear_layer.up.weight", ".lora_linear_layer.down.weight"))  # the pairs ComfyUI's LoRA reads
SD3_BLOCK = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj",
             "attn2.to_q", "attn2.to_k", "attn2.to_v", "attn.to_out.0", "attn.to_add_out", "attn2.to_out.0",
             "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2", "norm1.linear",
             "norm1_context.linear")  # mmdit_to_diffusers' block weights
MMDIT = {"x_block.attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"), "x_block.attn.proj": ("attn.to_out.0",),
         "context_block.attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
         "context_block.attn.proj": ("attn.to_add_out",),
         "x_block.attn2.qkv": ("attn2.to_q", "attn2.to_k", "attn2.to_v"), "x_block.attn2.proj": ("attn2.to_out.0",),
         "x_block.mlp.fc1": ("ff.net.0.proj",), "x_block.mlp.fc2": ("ff.net.2",),
         "context_block.mlp.fc1": ("ff_context.net.0.proj",), "context_block.mlp.fc2": ("ff_context.net.2",),
         "x_block.adaLN_modulation.1": ("norm1.linear",)}
PIXART_BLOCK = ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "attn2.to_q", "attn2.to_k", "attn2.to_v",
                "attn2.to_out.0", "ff.net.0.proj", "ff.net.2")  # pixart_to_diffusers' block weights

FLUX_DOUBLE = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj",
               "attn.to_out.0", "attn.to_add_out", "norm1.linear", "norm1_context.linear", "ff.net.0.proj", "ff.net.2",
               "ff_context.net.0.proj", "ff_context.net.2")  # flux_to_diffusers' double-block weights
FLUX_SINGLE = ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp", "norm.linear", "proj_out")  # and single-block ones


def comfyui_key_map(name: str, net) -> dict[str, list[tuple[str, int | None]]]:
    weights = {k.removesuffix(".weight") for k in net.state_dict() if k.endswith(".weight")}
    key_map = {}
    if name in ("sd15", "sdxl"):  # unet_to_diffusers covers every UNet weight
        for k in weights:
            to = [(k, None)]
            key_map[f"lora_unet_{k.replace('.', '_')}"] = key_map[f"lycoris_{k.replace('.', '_')}"] = to
            old = k.replace(".to_", ".processor.to_")  # diffusers' old attention-processor LoRA names
            old = old.removesuffix(".0") if old.endswith(".to_out.0") else old
            key_map[old] = key_map[f"unet.{old}"] = to
    blocks = [f"transformer_blocks.{i}." for i in range(len(getattr(net, "transformer_blocks", ())))]
    if name == "sd3":
        for b in blocks:
            for k in (b + s for s in SD3_BLOCK if b + s in weights):
                key_map[f"transformer.{k}"] = key_map[f"base_model.model.{k}"] = [(k, None)]
                key_map[f"lora_transformer_{k.replace('.', '_')}"] = key_map[f"lycoris_{k.replace('.', '_')}"] = [
                    (k, None)]
        # every MMDiT weight also by its own name; ComfyUI cuts qkv at 64 * depth rows, which is the hidden size of
        # every released SD3 (not of this tiny one, whose hidden size it is here)
        rows = net.config.num_attention_heads * net.config.attention_head_dim
        for i, b in enumerate(blocks):
            for mmdit, parts in MMDIT.items():
                if all(b + p in weights for p in parts):
                    to = [(b + p, j * rows if len(parts) == 3 else None) for j, p in enumerate(parts)]
                    key_map[f"lora_unet_joint_blocks_{i}_{mmdit.replace('.', '_')}"] = to
                    key_map[f"diffusion_model.joint_blocks.{i}.{mmdit}"] = to
    if name == "flux":  # flux_to_diffusers: these diffusers names, onto ComfyUI's fused qkv / linear1 rows
        singles = [f"single_transformer_blocks.{i}." for i in range(len(net.single_transformer_blocks))]
        for k in [b + s for b in blocks for s in FLUX_DOUBLE] + [b + s for b in singles for s in FLUX_SINGLE]:
            if k in weights:
                key_map[f"transformer.{k}"] = key_map[f"lora_transformer_{k.replace('.', '_')}"] = [(k, None)]
                key_map[f"lycoris_{k.replace('.', '_')}"] = [(k, None)]
    if name == "pixart":
        for k in (b + s for b in blocks for s in PIXART_BLOCK if b + s in weights):
            key_map[f"transformer.{k}"] = key_map[f"base_model.model.{k}"] = [(k, None)]
            key_map[f"unet.base_model.model.{k}"] = [(k, None)]
    return key_map


def comfyui_patches(lora: dict, key_map: dict) -> tuple[list, set]:
    """ComfyUI's `load_lora` for plain LoRAs: per mapped name an up/down pair and its alpha; the keys it read."""
    patches, read = [], set()
    for x, to in key_map.items():
        for up, down in UP_DOWN:
            if x + up in lora:
                alpha = lora[x + ".alpha"].item() if x + ".alpha" in lora else None
                patches.append((to, lora[x + up], lora[x + down], alpha))
                read |= {x + up, x + down} | ({x + ".alpha"} if alpha is not None else set())
                break
    return patches, read


@pytest.mark.parametrize("fmt", ["diffusers", "kohya"])
def test_export_in_comfyui_key_map(trained, tmp_path, one_thread, fmt):
    """The files a family's `comfyui_reads` names match ComfyUI's key map key for key, and the weights patched as
    ComfyUI patches them (W += alpha / rank * up @ down, fused rows included) reproduce the library's sampler to 1e-4;
    the other LoRA file matches no key at all (the model card sends ComfyUI users to the one that does)."""
    name, teacher, run, (x_T, cond, x_ours) = trained
    fam = family_class(name)
    if not fam.comfyui_reads:
        pytest.skip(f"ComfyUI core has no {fam.pipeline_class.removesuffix('Pipeline')} model")
    if fmt not in fam.diffusers_reads + fam.comfyui_reads:
        pytest.skip(f"{name} {fmt}: refused at export (test_export_in_stock_diffusers)")
    import diffusers

    out = export_run(run, fmt, tmp_path / fmt)
    lora = load_file(str(_lora_file(out)))
    pipe = diffusers.DiffusionPipeline.from_pretrained(teacher, local_files_only=True)
    spec = json.loads((out / "tdm_inference.json").read_text())
    pipe.scheduler = build_inference_scheduler(spec["scheduler"])
    net = getattr(pipe, fam.network_folder)
    patches, read = comfyui_patches(lora, comfyui_key_map(name, net))
    total = _modules_in(lora)
    print(f"{name} {fmt}: ComfyUI's key map reads {len(patches)}/{total} LoRA modules "
          f"({len(read)}/{len(lora)} keys)")
    card = (out / "README.md").read_text()
    if fmt not in fam.comfyui_reads:
        assert not patches and f"--format {fam.comfyui_reads[0]}` writes the file it reads" in card
        return
    assert len(patches) == total > 0 and read == set(lora)
    with safe_open(str(_lora_file(out)), "pt") as f:
        sigmas = json.loads(f.metadata()["tdm.comfyui_sigmas"])
    assert "LoraLoaderModelOnly" in card and ", ".join(f"{s:.8g}" for s in sigmas) in card
    params = dict(net.named_parameters())
    with torch.no_grad():
        for to, up, down, alpha in patches:
            delta = (1.0 if alpha is None else alpha / down.shape[0]) * (up.flatten(1) @ down.flatten(1))
            for module, row in to:
                w = params[f"{module}.weight"]
                w += (delta if row is None else delta[row : row + w.shape[0]]).reshape(w.shape)
    kwargs = {"guidance_scale": spec["guidance_scale"], **spec["scheduler"]["set_timesteps_kwargs"]}
    err, line = _error(_sample(name, pipe, x_T, cond, kwargs), x_ours)
    print(f"{name} {fmt}: weights patched by ComfyUI's rules, {line}")
    assert err < 1e-4


def test_sd3_kohya_fuses_qkv_exactly():
    """sd-scripts' fused qkv LoRA of SD3: down stacked, up block-diagonal, alpha = its rank; up @ down * alpha / rank
    is the q, k and v updates stacked, and a projection without a LoRA keeps zero rows."""
    from tdm.families.diffusers.sd3 import SD3Family

    g = torch.Generator().manual_seed(0)
    lora = {f"transformer_blocks.3.attn.{p}.lora_{ab}.weight": torch.randn(shape, generator=g)
            for p in ("to_q", "to_v", "to_out.0") for ab, shape in (("A", (2, 16)), ("B", (16, 2)))}
    kohya = SD3Family.kohya_state_dict(lora)
    qkv = "lora_unet_joint_blocks_3_x_block_attn_qkv"
    assert set(kohya) == {f"{n}.{s}" for n in (qkv, "lora_unet_joint_blocks_3_x_block_attn_proj")
                          for s in ("lora_down.weight", "lora_up.weight", "alpha")}
    down, up, alpha = kohya[f"{qkv}.lora_down.weight"], kohya[f"{qkv}.lora_up.weight"], kohya[f"{qkv}.alpha"]
    assert down.shape == (4, 16) and up.shape == (48, 4) and alpha.item() == 4.0
    delta = up @ down * alpha / down.shape[0]
    ab = {p: lora[f"transformer_blocks.3.attn.{p}.lora_B.weight"] @ lora[f"transformer_blocks.3.attn.{p}.lora_A.weight"]
          for p in ("to_q", "to_v")}
    torch.testing.assert_close(delta, torch.cat([ab["to_q"], torch.zeros(16, 16), ab["to_v"]]), rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match=r"norm1_context\.linear .* export --format diffusers"):
        SD3Family.kohya_state_dict({"transformer_blocks.0.norm1_context.linear.lora_A.weight": torch.zeros(2, 16)})
