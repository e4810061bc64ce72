"""GPU correctness checked on the CPU: every random draw is made by a generator on the device of the tensor it
fills (PyTorch refuses a CPU generator for a CUDA tensor, so a CPU-only suite would never see such a bug).

A TDM iteration of every family runs on the meta device, which computes shapes and no data, under a
TorchFunctionMode that compares each random call's generator with the device of the tensor it returns.
"""

import pytest
import torch
from family_harness import overrides, teacher_folder
from test_families import FAMILIES
from torch.overrides import TorchFunctionMode

from tdm.config import resolve
from tdm.core.rng import RunRNG
from tdm.core.samplers import sample_ddim
from tdm.trainer import Trainer

RANDOM = {torch.randn, torch.rand, torch.randint, torch.randn_like, torch.rand_like, torch.randint_like,
          torch.normal, torch.bernoulli, torch.multinomial, torch.randperm, torch.Tensor.normal_,
          torch.Tensor.uniform_, torch.Tensor.random_, torch.Tensor.bernoulli_, torch.Tensor.exponential_}


class GeneratorDevices(TorchFunctionMode):
    """Records every random call as (name, generator device, output device)."""

    def __init__(self):
        super().__init__()
        self.draws: list[tuple[str, str | None, str]] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func in RANDOM and torch.is_tensor(out):
            g = kwargs.get("generator")
            self.draws.append((func.__name__, None if g is None else g.device.type, out.device.type))
        return out

    @property
    def mismatches(self) -> list:
        return [d for d in self.draws if d[1] is not None and d[1] != d[2]]


def test_the_check_sees_a_cpu_generator_filling_another_device():
    with GeneratorDevices() as mode:
        torch.randn(3, generator=torch.Generator(), device="meta")
        torch.randn(3, generator=torch.Generator())
    assert mode.mismatches == [("randn", "cpu", "meta")] and len(mode.draws) == 2


def _meta_iteration(trainer: Trainer) -> GeneratorDevices:
    """One iteration of the trainer's method with every network, embedding and start noise on the meta device."""
    meta = torch.device("meta")
    method, fam = trainer.method, trainer.family
    for d in (method.teacher, method.student, method.fake):
        d.net.to(meta)
    fam.device = meta
    if hasattr(fam, "embeddings"):
        fam.embeddings = {k: v.to(meta) for k, v in fam.embeddings.items()}
    rng = RunRNG(0, meta)

    def update(role: str, loss: torch.Tensor) -> None:
        net = trainer.accelerator.unwrap_model(trainer.nets["student"] if role == "student" else trainer.nets["fake"])
        if hasattr(net, "activate"):
            net.activate()
        loss.backward()

    B = 2
    with GeneratorDevices() as mode:
        cond, uncond = fam.sample_cond(B, rng.host)
        x_T = rng.randn(fam.sample_shape(B))
        m = method.step(x_T, cond, uncond, update, rng)
        sample_ddim(method.student, x_T, method.grids[max(method.grids)], cond, stochastic=True,
                    generator=torch.Generator().manual_seed(0))
    assert m["loss_student"].device == meta
    return mode


@pytest.mark.parametrize("name", list(FAMILIES))
def test_every_draw_of_a_diffusers_iteration_is_on_its_device(name, tmp_path_factory, tmp_path, one_thread):
    preset, build, extra = FAMILIES[name]
    teacher = teacher_folder(tmp_path_factory, name, build)
    trainer = Trainer(resolve(preset, overrides(teacher, *extra, "train.mixed_precision=no")), tmp_path / "r")
    mode = _meta_iteration(trainer)
    assert mode.mismatches == []
    assert sum(d[2] == "meta" for d in mode.draws) >= 3  # start noise, the two xi of §4, the sampler's noise


def test_every_draw_of_a_digits_iteration_is_on_its_device(tmp_path, one_thread):
    """(The toy family's exact teacher computes its posterior in float64 on the CPU: it has no device to check.)"""
    trainer = Trainer(resolve("digits", ["train.progress=false"]), tmp_path / "r")
    mode = _meta_iteration(trainer)
    assert mode.mismatches == []
    assert sum(d[2] == "meta" for d in mode.draws) >= 3
