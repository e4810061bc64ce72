"""Every random draw of a training run, reproducible on any device and any number of processes."""

from __future__ import annotations

import torch

from .denoiser import Cond, take_cond


class RunRNG:
    """Two generators, both saved in checkpoints so that a resumed run draws what it would have drawn.

    `host` (CPU) draws what the host needs to plan an iteration (K, steps, times, prompt indices), so the
    plan never waits on the device; `noise` lives on the device and draws the tensors used there, since a
    CPU generator cannot fill a CUDA tensor. Each of `world` processes draws for the global batch and keeps
    its own rows: N processes at batch B / N see exactly the numbers one process at batch B sees.
    """

    def __init__(self, seed: int, device: torch.device | str = "cpu", rank: int = 0, world: int = 1):
        self.device = torch.device(device)
        self.rank, self.world = rank, world
        self.host = torch.Generator().manual_seed(seed)
        # the meta device holds no data, so there is nothing to draw (tests run whole iterations on it)
        self.noise = None if self.device.type == "meta" else torch.Generator(self.device).manual_seed(seed + 1)

    def local(self, x: Cond) -> Cond:
        """This process's rows of a global-batch draw."""
        n = next(iter(x.values())).shape[0] if isinstance(x, dict) else x.shape[0]
        n //= self.world
        return take_cond(x, slice(self.rank * n, (self.rank + 1) * n))

    def choice(self, n: int) -> int:
        """An index in [0, n), the same on every process."""
        return int(torch.randint(n, (1,), generator=self.host))

    def randint(self, low: int, high: int, n: int) -> torch.Tensor:
        """`n` local integers in [low, high) on the host."""
        return self.local(torch.randint(low, high, (n * self.world,), generator=self.host))

    def rand(self, n: int) -> torch.Tensor:
        """`n` local uniforms in [0, 1) on the host, float64 like the schedules."""
        return self.local(torch.rand((n * self.world,), generator=self.host, dtype=torch.float64))

    def randn(self, shape: tuple[int, ...], dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Standard normal noise of local `shape` on the device."""
        size = (shape[0] * self.world, *shape[1:])
        return self.local(torch.randn(size, generator=self.noise, device=self.device, dtype=dtype))

    def state_dict(self) -> dict:
        return {"host": self.host.get_state(), "noise": None if self.noise is None else self.noise.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.host.set_state(state["host"])
        if self.noise is not None:
            self.noise.set_state(state["noise"])
