"""Denoiser wrapper and classifier-free guidance (TDM-METHOD §1)."""

import pytest
import torch
from torch import nn

from tdm.core.denoiser import Denoiser, cfg_denoise
from tdm.core.schedules import FlowSchedule, VPSchedule

pytestmark = pytest.mark.usefixtures("one_thread")

VP = VPSchedule.from_betas("scaled_linear")
FLOW = FlowSchedule(3.0)
D, C = 6, 3  # data and conditioning widths


class TinyNet(nn.Module):
    """net(x_t, t, cond) -> Linear([x_t, t/1000, c]); cond is a tensor, a {'emb', 'mask'} dict or None."""

    def __init__(self, out_dim=D, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.lin = nn.Linear(D + 1 + C, out_dim)
        with torch.no_grad():
            self.lin.weight.copy_(torch.randn(self.lin.weight.shape, generator=g) * 0.5)
            self.lin.bias.copy_(torch.randn(self.lin.bias.shape, generator=g))

    def forward(self, x, t, cond):
        if cond is None:
            c = torch.zeros(x.shape[0], C)
        elif isinstance(cond, dict):
            c = cond["emb"] * cond["mask"][:, None]
        else:
            c = cond
        return self.lin(torch.cat([x, t.float()[:, None] / 1000, c], 1))


def _data(seed=0, B=5):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, D, generator=g), torch.randn(B, C, generator=g)


@pytest.mark.parametrize("sched,ptype,t", [
    (VP, "epsilon", 500.0), (VP, "sample", 10.0), (VP, "v_prediction", 999.0),
    (FLOW, "flow", 700.0), (FLOW, "sample", 300.0), (FLOW, "epsilon", 100.0)])
def test_denoiser_identity(sched, ptype, t):
    """§1: whatever the parameterisation, x_t = alpha x0_hat + sigma eps_hat."""
    x, c = _data()
    net = TinyNet()
    den = Denoiser(net, sched, ptype)
    tt = torch.tensor([t, t / 2, t / 3, t, t / 5], dtype=torch.float64)
    x0_hat, eps_hat = den(x, tt, c)
    a, s = sched.alpha(tt).float()[:, None], sched.sigma(tt).float()[:, None]
    torch.testing.assert_close(a * x0_hat + s * eps_hat, x, atol=1e-5, rtol=1e-5)
    out = net(x, tt, c)
    if ptype == "sample":
        torch.testing.assert_close(x0_hat, out)
    if ptype == "epsilon":
        torch.testing.assert_close(eps_hat, out)
    if ptype == "flow":  # velocity = eps - x0
        torch.testing.assert_close(eps_hat - x0_hat, out, atol=1e-5, rtol=1e-5)
    assert (den.calls, den.rows) == (1, 5)


def test_denoiser_scalar_t_and_unknown_type():
    x, c = _data()
    den = Denoiser(TinyNet(), VP, "epsilon")
    a = den(x, torch.tensor(400.0), c)
    b = den(x, torch.full((5,), 400.0), c)
    torch.testing.assert_close(a, b)
    with pytest.raises(ValueError):
        Denoiser(TinyNet(), VP, "score")


def test_learned_sigma_keeps_first_half():
    """§1 PixArt: learned-variance channels are dropped; only the first half of the output is used."""
    x, c = _data()
    t = torch.full((5,), 321.0)
    wide = TinyNet(out_dim=2 * D)
    narrow = TinyNet(out_dim=D)
    with torch.no_grad():
        narrow.lin.weight.copy_(wide.lin.weight[:D])
        narrow.lin.bias.copy_(wide.lin.bias[:D])
    got = Denoiser(wide, VP, "epsilon", learned_sigma=True)(x, t, c)
    ref = Denoiser(narrow, VP, "epsilon")(x, t, c)
    torch.testing.assert_close(got, ref)
    with torch.no_grad():  # the second half really is ignored
        wide.lin.weight[D:] += 100.0
    torch.testing.assert_close(Denoiser(wide, VP, "epsilon", learned_sigma=True)(x, t, c), ref)


def _conds(kind, B=5):
    g = torch.Generator().manual_seed(7)
    emb = torch.randn(B, C, generator=g)
    if kind == "tensor":
        return emb, torch.zeros(B, C)
    return {"emb": emb, "mask": torch.ones(B)}, {"emb": torch.zeros(B, C), "mask": torch.zeros(B)}


@pytest.mark.parametrize("kind", ["tensor", "dict"])
def test_cfg_w1_is_plain_conditional(kind):
    """§1: w = 1 means no guidance and costs one conditional pass on B rows."""
    x, _ = _data()
    cond, uncond = _conds(kind)
    t = torch.full((5,), 600.0)
    den = Denoiser(TinyNet(), VP, "epsilon")
    got = cfg_denoise(den, x, t, cond, uncond, 1.0)
    assert (den.calls, den.rows) == (1, 5)
    ref = Denoiser(TinyNet(), VP, "epsilon")(x, t, cond)
    torch.testing.assert_close(got, ref)


@pytest.mark.parametrize("kind", ["tensor", "dict"])
@pytest.mark.parametrize("ptype", ["epsilon", "v_prediction"])
def test_cfg_w3_batched(kind, ptype):
    """§1: x0_w = x0_u + w (x0_c - x0_u) (same in eps space), computed in ONE forward on 2B rows."""
    x, _ = _data()
    cond, uncond = _conds(kind)
    t = torch.tensor([10.0, 200.0, 400.0, 800.0, 999.0])
    den = Denoiser(TinyNet(), VP, ptype)
    x0_w, eps_w = cfg_denoise(den, x, t, cond, uncond, 3.0)
    assert (den.calls, den.rows) == (1, 10)
    ref = Denoiser(TinyNet(), VP, ptype)
    x0_c, eps_c = ref(x, t, cond)
    x0_u, eps_u = ref(x, t, uncond)
    torch.testing.assert_close(x0_w, x0_u + 3 * (x0_c - x0_u), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(eps_w, eps_u + 3 * (eps_c - eps_u), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(x0_w, x0_c)  # guidance did something


def test_cfg_scalar_t():
    x, _ = _data()
    cond, uncond = _conds("tensor")
    den = Denoiser(TinyNet(), VP, "epsilon")
    a = cfg_denoise(den, x, torch.tensor(300.0), cond, uncond, 2.5)
    b = cfg_denoise(den, x, torch.full((5,), 300.0), cond, uncond, 2.5)
    torch.testing.assert_close(a, b)
    assert den.reset_counters() == (2, 20) and (den.calls, den.rows) == (0, 0)
