"""The dry-run memory model on tiny pipelines: exact weight and text-encoder bytes in each dtype, the meta
probe against the same passes on real tensors, checkpointing, `--gpu-memory` and its advice, the CLI."""

import itertools
import json
import shutil

import pytest
import torch
from family_harness import overrides, teacher_folder
from tiny_pipelines import make_cogvideox, make_pixart, make_sd3, make_sd15, make_sdxl

from tdm.config import resolve
from tdm.estimate import (
    USABLE,
    advise,
    caching_bytes,
    memory_estimate,
    parse_size,
    static_bytes,
)
from tdm.families import family_class
from tdm.meta_probe import LiveBytes, grad_pass, no_grad_pass

SD15 = family_class("sd15")


@pytest.fixture(scope="module")
def sd15(tmp_path_factory):
    return teacher_folder(tmp_path_factory, "sd15", make_sd15)


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory):
    return teacher_folder(tmp_path_factory, "sdxl", make_sdxl)


@pytest.fixture(scope="module")
def pixart(tmp_path_factory):
    return teacher_folder(tmp_path_factory, "pixart", make_pixart)


def _bytes(tensors) -> int:
    """Bytes of distinct storages (tied weights count once)."""
    return sum({t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}.values())


def _state_bytes(model) -> int:
    return _bytes(model.state_dict().values())


@pytest.mark.parametrize("precision", ["no", "bf16", "fp16"])
def test_weight_bytes_are_those_of_the_model_in_its_dtype(sd15, precision):
    from diffusers import UNet2DConditionModel
    from peft import LoraConfig

    dtype = {"no": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    name = "fp32" if precision == "no" else precision
    unet = UNet2DConditionModel.from_pretrained(sd15[0], subfolder="unet", local_files_only=True).to(dtype)
    weights = _bytes([*unet.parameters(), *unet.buffers()])

    cfg = resolve("sd15", overrides(sd15, f"train.mixed_precision='{precision}'"))
    static = static_bytes(cfg, SD15)
    assert static[f"base network ({name})"] == weights
    for role in ("student", "fake"):  # the trainer's adapters, in fp32, with two fp32 AdamW moments
        unet.add_adapter(LoraConfig(r=cfg.lora.rank, lora_alpha=cfg.lora.alpha, target_modules=list(SD15.lora_targets)),
                         adapter_name=role)
    n_lora = sum(p.numel() for n, p in unet.named_parameters() if "lora_" in n)
    assert static["LoRA student + fake: fp32 weights, AdamW"] == n_lora * (4 + 8)

    full = static_bytes(resolve("sd15", overrides(sd15, f"train.mixed_precision='{precision}'", "lora.enabled=false",
                                                  "optim.adam_8bit=true")), SD15)
    fresh = UNet2DConditionModel.from_pretrained(sd15[0], subfolder="unet", local_files_only=True)
    fp32, n = _bytes([*fresh.parameters(), *fresh.buffers()]), sum(p.numel() for p in fresh.parameters())
    assert full[f"teacher ({name})"] == weights
    assert full["student + fake: fp32 weights, AdamW"] == 2 * (fp32 + n * 2)  # 8-bit moments: 1 byte each


def test_text_encoder_bytes_are_those_of_the_loaded_encoders(sdxl, pixart, tmp_path):
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, T5EncoderModel

    for (path, _), encoders in ((sdxl, {"text_encoder": CLIPTextModel, "text_encoder_2": CLIPTextModelWithProjection}),
                                (pixart, {"text_encoder": T5EncoderModel})):
        for precision, dtype in (("no", torch.float32), ("bf16", torch.bfloat16)):
            loaded = {k: cls.from_pretrained(path / k, local_files_only=True).to(dtype) for k, cls in encoders.items()}
            cfg = resolve("sdxl", [f"teacher.path={path}", f"train.mixed_precision='{precision}'"])
            assert caching_bytes(cfg) == sum(_state_bytes(m) for m in loaded.values())
    # without weights files the count comes from the configs on the meta device: every parameter and buffer
    copy = tmp_path / "no_weights"
    shutil.copytree(pixart[0], copy)
    (copy / "text_encoder" / "model.safetensors").unlink()
    t5 = T5EncoderModel.from_pretrained(pixart[0] / "text_encoder", local_files_only=True).to(torch.bfloat16)
    cfg = resolve("pixart-512", [f"teacher.path={copy}", "train.mixed_precision=bf16"])
    assert caching_bytes(cfg) == _bytes([*t5.parameters(), *t5.buffers()])


FAMILIES = {"sd15": ("sd15", make_sd15, []), "sdxl": ("sdxl", make_sdxl, []), "pixart": ("pixart-512", make_pixart, []),
            "sd3": ("sd3", make_sd3, []), "cogvideox": ("cogvideox-2b", make_cogvideox, ["teacher.frames=9"])}


@pytest.mark.parametrize("lora", [True, False])
@pytest.mark.parametrize("name", list(FAMILIES))
def test_meta_probe_equals_the_same_passes_on_real_tensors(name, lora, tmp_path_factory, one_thread):
    """The live bytes of a forward with grad, its backward and a no-grad forward, measured on the meta device
    with `probe_cond`'s conditions, equal those of the same calls on the real network with the family's
    real conditions (fp32, CPU)."""
    from tdm.families.diffusers.lora import RoleNet

    preset, build, more = FAMILIES[name]
    teacher = teacher_folder(tmp_path_factory, name, build)
    cfg = resolve(preset, overrides(teacher, f"lora.enabled={str(lora).lower()}", "train.mixed_precision='no'", *more))
    cls = family_class(name)
    family = cls(cfg, "cpu", tmp_path_factory.mktemp("run"))
    trainable = RoleNet(family, family.base, "fake") if lora else family.role_nets(family.base, ["fake"])["fake"]
    B = cfg.train.batch_size
    x_t, t = torch.randn(B, *family.latent_shape()), torch.full((B,), 500.0)
    cond = family._cond(torch.zeros(B, dtype=torch.long))
    params = [*family.base.parameters(), *family.base.buffers(), *trainable.parameters(), *trainable.buffers(),
              *family.embeddings.values(),
              x_t, t, *cond.values()]
    with LiveBytes(ignore=params) as track:
        loss = trainable(x_t, t, cond).float().square().mean()
        forward, saved = track.peak, track.reset()
        loss.backward()
        del loss
        backward = track.peak
    with LiveBytes(ignore=params) as track, torch.no_grad():
        RoleNet(family, family.base, None)(x_t, t, cond)
        teacher_peak = track.peak
    key = (cls, str(teacher[0]), cfg.teacher.resolution, cfg.teacher.frames,
           (4, 8.0, tuple(cls.lora_targets)) if lora else None, "no")
    assert grad_pass(*key, False, B) == (forward, saved, backward)
    assert no_grad_pass(*key, "teacher", B) == teacher_peak


def test_checkpointing_lowers_the_activations(sd15, pixart):
    for preset, teacher in (("sd15", sd15), ("pixart-512", pixart)):
        cfg = resolve(preset, overrides(teacher, "train.mixed_precision=bf16", "train.preview_every=0"))
        m = memory_estimate(cfg, family_class(cfg.teacher.family))
        off, on = m["phases"][False], m["phases"][True]
        assert on["rollout"] == off["rollout"]  # no grad, nothing to checkpoint
        assert on["fake update"] < off["fake update"] and on["generator update"] < off["generator update"]
        assert m["peak"][True] < m["peak"][False] and m["peak_GiB"] == round(m["peak"][False] / 1024**3, 3)


def test_parse_size():
    assert parse_size("24GB") == parse_size("24GiB") == parse_size("24 g") == 24 * 1024**3
    assert parse_size("80G") == 80 * 1024**3 and parse_size("1.5TB") == int(1.5 * 1024**4)
    assert parse_size("512MB") == 512 * 1024**2
    for bad in ("24", "GB", "24XB", "-1GB", "24 G B"):
        with pytest.raises(ValueError, match="give a size such as 24GB"):
            parse_size(bad)


def test_advice_turns_switches_on_cheapest_first(sd15):
    cfg = resolve("sd15", overrides(sd15, "train.mixed_precision=bf16"))
    m = memory_estimate(cfg, SD15)
    between = (m["peak"][False] + m["peak"][True]) / 2 / USABLE  # fits with checkpointing only
    assert advise(cfg, SD15, between) == [("train.gradient_checkpointing=true", m["peak"][True])]

    full = resolve("sd15", overrides(sd15, "lora.enabled=false", "train.mixed_precision='no'", "train.batch_size=4"))
    steps = advise(full, SD15, 1)  # one byte: nothing fits, every switch is tried in order
    assert [s for s, _ in steps] == [
        "train.mixed_precision=bf16", "train.gradient_checkpointing=true", "optim.adam_8bit=true",
        "train.teacher_offload=true", "train.batch_size=2", "train.batch_size=1",
        "lora.enabled=true train.teacher_offload=false train.batch_size=4", "train.batch_size=2", "train.batch_size=1"]
    peaks = [p for _, p in steps]
    assert all(b <= a for a, b in itertools.pairwise(peaks[:6]))  # each switch of full mode saves memory
    assert peaks[6] < peaks[3]  # LoRA at batch 4 holds less than full mode with every switch on


def test_cli_dry_run_memory_table_and_advice(sd15, capsys):
    from tdm.cli import main

    path, prompts = sd15
    common = ["distill", "--preset", "sd15", "--teacher", str(path), "--prompts", str(prompts),
              "teacher.resolution=64", "train.batch_size=2", "lora.rank=4"]
    assert main([*common, "--dry-run", "--gpu-memory", "24GB"]) == 0
    out = capsys.readouterr().out
    for row in ("prompt caching: text encoders", "base network (bf16)", "LoRA student + fake", "prompt embeddings",
                "VAE for previews", "+ rollout", "+ fake update", "+ generator update", "+ preview decode", "peak"):
        assert row in out, row
    assert "fits a 24576 MiB GPU" in out

    assert main([*common, "train.mixed_precision=no", "--dry-run", "--gpu-memory", "1MB"]) == 0
    out = capsys.readouterr().out
    assert "does not fit a 1 MiB GPU" in out and "train.gradient_checkpointing=true" in out
    assert "base network (fp32)" in out and "train.mixed_precision=bf16" in out

    assert main([*common, "--dry-run", "--gpu-memory", "lots"]) == 2
    assert "give a size such as 24GB" in capsys.readouterr().err
    assert main([*common, "--gpu-memory", "24GB"]) == 2
    assert "--gpu-memory goes with --dry-run" in capsys.readouterr().err


def test_memory_estimate_is_json_ready_with_bytes(sd15):
    m = memory_estimate(resolve("sd15", overrides(sd15)), SD15)
    assert m["peak"][m["gradient_checkpointing"]] == max(
        m["prompt caching"], sum(m["static"].values()) + max(m["phases"][m["gradient_checkpointing"]].values()))
    json.dumps({k: v for k, v in m.items() if k not in ("phases", "peak")})
