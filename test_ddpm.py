"""Tests for ddpm.py and fid.py (MNIST from $DDPM_DATA or ../shared/data).

    python -m pytest -q                 # everything: what CI runs
    python -m pytest -q -m "not slow"   # the math, shapes and samplers, in seconds: for hacking

`slow` marks the tests that train, start processes or read all of MNIST."""
import copy
import json
import math
import os
import pickle
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from scipy import linalg

import ddpm
import fid

# registered in pytest.ini
slow = pytest.mark.slow
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA GPU')

ROOT = Path(__file__).resolve().parent
DATA = os.environ.get('DDPM_DATA', str(ROOT.parent / 'shared' / 'data'))
LOSS = ddpm.Diffusion.loss  # before any test wraps it
# 200 digits in batches of 50: 4 steps an epoch, on the CPU (bitwise and timing assertions need it)
TINY = ['--data', DATA, '--limit', '200', '--batch', '50', '--T', '20', '--widths', '8,16',
        '--device', 'cpu']


def needs_mnist():
    if not (Path(DATA) / 'MNIST' / 'raw').is_dir():
        assert not os.environ.get('CI'), f'MNIST missing from {DATA} in CI'
        pytest.skip(f'MNIST not found in {DATA}')


def run(*args, timeout=300, env=None, script='ddpm.py', cwd=ROOT):
    """Run ddpm.py (or fid.py) as a user would; returns the finished process."""
    return subprocess.run([sys.executable, str(ROOT / script), *args], capture_output=True,
                          text=True, timeout=timeout, cwd=cwd, env=env)


def start(*args, script='ddpm.py'):
    """Start a script in the background, as from a terminal: Ctrl-C (SIGINT) reaches it even when
    this test runs in a background job, which ignores SIGINT and would pass that on. Returns the
    running process, its output piped."""
    return subprocess.Popen([sys.executable, str(ROOT / script), *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=ROOT,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def one_line_error(r, message):
    """A failed command whose whole stderr is one line holding `message`, and no traceback."""
    assert r.returncode != 0, r.stdout
    assert message in r.stderr, r.stderr
    assert 'Traceback' not in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr


def as_model(function, seen=None):
    """`function(x, t, labels)` as a sampler's model; the list `seen` records each call's x."""
    def model(x, t, labels=None):
        if seen is not None:
            seen.append(x.clone())
        return function(x, t, labels)
    model.parameters = lambda: iter([torch.zeros(1)])  # sample() reads the device from them
    return model


def oracle(diffusion, x0, seen=None):
    """A 'model' that knows the clean images x0: the true noise of any x_t (or v, for target v)."""
    def predict(x, t, labels=None):
        abar = diffusion.abar[(t * diffusion.T).round().long()].view(-1, 1, 1, 1)
        eps = (x - abar.sqrt() * x0) / (1 - abar).sqrt()
        return eps if diffusion.target == 'eps' else abar.sqrt() * eps - (1 - abar).sqrt() * x0
    return as_model(predict, seen)


S = 0.2  # the Gaussian data's standard deviation, about a mean of 0


def gaussian(diffusion, seen=None, mean=0.0, sd=S):
    """The exact model of data x0 ~ N(mean, sd^2) per pixel: E[x0 | x_t] = mean + sqrt(abar) sd^2
    / v (x_t - sqrt(abar) mean), v = abar sd^2 + 1 - abar. Its x0 estimate changes with t (unlike
    the oracle's), as a trained model's does."""
    def predict(x, t, labels=None):
        abar = diffusion.abar[(t * diffusion.T).round().long()].view(-1, 1, 1, 1)
        v, centered = abar * sd * sd + 1 - abar, x - abar.sqrt() * mean
        eps, x0 = centered * (1 - abar).sqrt() / v, mean + abar.sqrt() * sd * sd / v * centered
        return eps if diffusion.target == 'eps' else abar.sqrt() * eps - (1 - abar).sqrt() * x0
    return as_model(predict, seen)


def run_on_gaussian(d, sampler, steps, eta, seed):
    """`sampler` on the Gaussian data's exact model: the x it passed the model at each step, its
    output, a generator that replays its noise after x_T, and x_T in float64, for a float64
    hand-written sampler to follow."""
    seen = []
    gen = torch.Generator().manual_seed(seed)
    out = ddpm.sample(gaussian(d, seen), d, (64, 1, 4, 4), sampler=sampler, steps=steps, eta=eta,
                      generator=gen)
    gen = torch.Generator().manual_seed(seed)
    return seen, out, gen, torch.randn((64, 1, 4, 4), generator=gen).double()


def gaussian_x0(abar, x):
    """Float64 E[x0 | x_t] of the Gaussian data, and the noise it implies."""
    v = abar * S * S + 1 - abar
    x0 = np.sqrt(abar) * S * S / v * x
    return x0, (x - np.sqrt(abar) * x0) / np.sqrt(1 - abar)

# --- schedule math against an independent float64 computation -------------------------------------


@pytest.mark.parametrize('T,b0,b1', [(200, 1e-4, 0.1), (1000, 1e-4, 0.02), (7, 0.01, 0.5)])
def test_linear_schedule_matches_float64_reference(T, b0, b1):
    d = ddpm.Diffusion(T, 'linear', b0, b1)
    betas = np.linspace(b0, b1, T)
    np.testing.assert_allclose(d.abar[1:].numpy(), np.cumprod(1 - betas), rtol=1e-6)
    np.testing.assert_allclose(d.betas[1:].numpy(), betas, rtol=1e-6)
    assert d.abar[0] == 1
    assert d.betas[0] == 0


def test_cosine_schedule_endpoints_and_formula():
    T, s = 200, 0.008
    d = ddpm.Diffusion(T, 'cosine')
    f = np.cos((np.arange(T + 1) / T + s) / (1 + s) * np.pi / 2) ** 2
    np.testing.assert_allclose(d.abar[1:T].numpy(), (f / f[0])[1:T], rtol=1e-5)
    assert d.abar[0] == 1  # all signal at t = 0
    assert d.abar[T] < 1e-6  # essentially none at t = T
    assert (d.betas[1:] <= 0.999).all()
    assert (d.betas[1:] > 0).all()
    assert ddpm.Diffusion().T == 200
    assert torch.equal(ddpm.Diffusion().abar, d.abar)  # the class default: cosine


@pytest.mark.parametrize('args', [(200, 'linear', 1e-4, 0.999), (2500, 'linear'),
                                  (200, 'linear', 1e-8, 1e-8)])
def test_schedules_whose_signal_underflows_or_stalls_are_refused(args):
    # abar_T = 0 in float32 made log-SNR -inf: the step search never ended and the samplers drew NaN
    message = 'abar must fall step by step from 1 to above 0 in float32'
    with pytest.raises(ValueError, match=message):
        ddpm.Diffusion(*args)


def test_q_sample_mean_and_variance():
    d = ddpm.Diffusion()
    x0 = torch.full((200_000, 1, 1, 1), 0.7)
    gen = torch.Generator().manual_seed(0)
    for t in (1, 50, 200):
        xt = d.q_sample(x0, torch.full((len(x0),), t), torch.randn(x0.shape, generator=gen))
        abar = d.abar[t].item()
        assert abs(xt.mean().item() - np.sqrt(abar) * 0.7) < 0.01
        assert abs(xt.var().item() - (1 - abar)) < 0.01 * max(1 - abar, 0.1)

# --- the model ------------------------------------------------------------------------------------


@pytest.mark.parametrize('shape', [(3, 1, 28, 28), (2, 3, 32, 32), (2, 1, 17, 23)])
def test_scorenet_keeps_shape_and_uses_each_images_own_t(shape):
    torch.manual_seed(0)
    model = ddpm.ScoreNet(channels=shape[1], widths=(8, 16, 32))
    x, t = torch.randn(shape), torch.rand(shape[0])
    out = model(x, t)
    assert out.shape == shape
    for i in range(shape[0]):  # image i alone, with its own t, gives its output in the batch
        alone = model(x[i:i + 1], t[i:i + 1])
        torch.testing.assert_close(alone, out[i:i + 1], atol=1e-5, rtol=1e-4)
    assert not torch.allclose(model(x, t.flip(0)), out, atol=1e-4)  # and t matters


def test_scorenet_rejects_bad_sizes_clearly():
    model = ddpm.ScoreNet(channels=1)
    with pytest.raises(ValueError, match=r'takes \(N, 1, H, W\), H and W >= 8'):
        model(torch.randn(2, 3, 28, 28), torch.rand(2))
    with pytest.raises(ValueError, match='>= 8'):
        model(torch.randn(2, 1, 4, 28), torch.rand(2))


def test_conditional_scorenet_no_labels_is_the_no_label_index():
    torch.manual_seed(0)
    model = ddpm.ScoreNet(channels=1, widths=(8, 16), num_classes=10)
    x, t = torch.randn(4, 1, 28, 28), torch.rand(4)
    without = model(x, t)
    # "no label" is index 10, not 0
    torch.testing.assert_close(without, model(x, t, torch.full((4,), 10)))
    assert not torch.allclose(without, model(x, t, torch.zeros(4, dtype=torch.long)), atol=1e-4)
    with_labels = model(x, t, torch.tensor([0, 3, 9, 10]))
    # the label changes the prediction
    assert not torch.allclose(with_labels[:3], without[:3], atol=1e-4)


def test_depth_adds_residual_convs_to_every_block():
    shallow, deep = ddpm.ScoreNet(widths=(8, 16), depth=1), ddpm.ScoreNet(widths=(8, 16), depth=3)
    # depth 1: old checkpoints still load
    assert not any('extra' in name for name in shallow.state_dict())
    default = ddpm.ScoreNet(widths=(8, 16))
    assert default.state_dict().keys() == ddpm.ScoreNet(widths=(8, 16), depth=2).state_dict().keys()
    extra = sum(p.numel() for name, p in deep.named_parameters() if '.extra.' in name)
    # 2 more conv + GroupNorm per block
    assert extra == sum(2 * (9 * c * c + c + 2 * c) for c in (8, 16, 8))
    missing = deep.load_state_dict(shallow.state_dict(), strict=False).missing_keys
    assert missing
    assert all('.extra.' in name for name in missing)
    x, t = torch.randn(2, 1, 12, 12), torch.rand(2)
    assert not torch.allclose(deep(x, t), shallow(x, t))
    with torch.no_grad():  # an extra conv that outputs 0 adds 0: each one is a residual h + f(h)
        for name, module in deep.named_modules():
            if '.extra.' in name and isinstance(module, torch.nn.Conv2d):
                module.weight.zero_()
                module.bias.zero_()
    torch.testing.assert_close(deep(x, t), shallow(x, t))

# --- the loss and predict() -----------------------------------------------------------------------


@pytest.mark.parametrize('target', ['eps', 'v'])
def test_loss_of_an_oracle_is_zero_and_v_is_its_formula(target):
    d, x0 = ddpm.Diffusion(T=50, target=target), torch.rand(6, 3, 8, 8) * 2 - 1
    assert d.loss(oracle(d, x0), x0).item() < 1e-10
    torch.manual_seed(0)  # and a model that outputs the noise scores on v what the v formula says
    t, noise = torch.randint(1, 51, (6,)), torch.randn_like(x0)
    torch.manual_seed(0)
    loss = d.loss(lambda x, tt, labels: noise, x0)
    abar = d.abar[t].double().view(-1, 1, 1, 1)
    v = abar.sqrt() * noise.double() - (1 - abar).sqrt() * x0.double()
    expected = 0.0 if target == 'eps' else ((noise.double() - v) ** 2).mean().item()
    assert abs(loss.item() - expected) < 1e-6


def test_diffusion_follows_the_device_of_its_images():
    # README's snippet on a GPU failed in loss(): a CPU table indexed by CUDA steps. The meta device
    # stands in for a GPU here: on 7be74a0 this fails with "Tensor on device meta is not on the
    # expected device cpu"
    d = ddpm.Diffusion(T=20)
    with torch.device('meta'):
        model = ddpm.ScoreNet(widths=(8, 16))
        x0 = torch.zeros(4, 1, 8, 8)
    assert d.loss(model, x0).device.type == 'meta'
    assert d.abar.device.type == 'meta'  # moved once, kept: no copy at every step


@pytest.mark.parametrize('weight_max', [1.0, 5.0, math.inf])
def test_eps_loss_weighs_step_t_by_one_over_abar_up_to_weight_max(weight_max):
    d, x0 = ddpm.Diffusion(T=50), torch.rand(64, 1, 4, 4) * 2 - 1
    # every step: 1/abar from 1.002 to 1e6
    t, noise = torch.arange(1, 51).repeat(2)[:64], torch.randn_like(x0)
    out = torch.randn_like(x0)
    loss = d.loss(lambda x, tt, labels: out, x0, t=t, noise=noise, weight_max=weight_max)
    abar = d.abar.double()[t].view(-1, 1, 1, 1)  # the reference in float64
    weight = (1 / abar).clamp(max=weight_max)
    expected = (weight * (out.double() - noise.double()) ** 2).mean().item()
    assert abs(loss.item() - expected) < 1e-5 * expected
    if weight_max == 1.0:  # the plain mean of Ho et al.
        assert abs(loss.item() - torch.nn.functional.mse_loss(out, noise).item()) < 1e-6


@pytest.mark.parametrize('guidance', [0.0, 2.5])
@pytest.mark.parametrize('target', ['eps', 'v'])
def test_predict_turns_the_output_into_eps_and_x0_at_step_t(target, guidance):
    torch.manual_seed(0)
    d, model = ddpm.Diffusion(T=50, target=target), ddpm.ScoreNet(widths=(8, 16), num_classes=10)
    x, y, t = torch.randn(4, 1, 8, 8) * 1.5, torch.tensor([1, 7, 7, 2]), 17
    eps, x0 = d.predict(model, x, t, y, guidance=guidance)
    tt = torch.full((4,), t / 50)
    # float64 reference: (1 + w) out(label) - w out(no label), then x0 and eps from it
    with torch.no_grad():
        no_label = torch.full_like(y, 10)
        out = ((1 + guidance) * model(x, tt, y) - guidance * model(x, tt, no_label)).double()
    a, xd = d.abar[t].double(), x.double()
    if target == 'eps':
        want_x0 = (xd - (1 - a).sqrt() * out) / a.sqrt()
    else:
        want_x0 = a.sqrt() * xd - (1 - a).sqrt() * out
    # the case covers pixels inside and outside [-1, 1]: none is clipped
    assert 0 < (want_x0.abs() > 1).float().mean() < 1
    torch.testing.assert_close(x0.double(), want_x0, atol=1e-5, rtol=1e-5)
    want_eps = (xd - a.sqrt() * want_x0) / (1 - a).sqrt()
    torch.testing.assert_close(eps.double(), want_eps, atol=1e-4, rtol=1e-4)
    if target == 'eps':  # an eps model's eps is its output
        torch.testing.assert_close(eps.double(), out, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize('sampler, steps', [('ddpm', None), ('ddim', 50), ('dpm++', 50)])
def test_samplers_leave_no_haze_over_a_background_at_minus_1(sampler, steps):
    # data x0 ~ N(-1, s^2) per pixel, as MNIST's background: half its pixels lie above -1, and so
    # must half the samples' (measured: 0.50). Clipping the x0 estimates at -1 in every step (Ho et
    # al.'s code, a --clip flag until it was cut) turned their scatter into a bias that lifted two
    # thirds of the pixels above -1: a faint haze.
    d = ddpm.Diffusion(T=200)
    x = ddpm.sample(gaussian(d, mean=-1.0, sd=0.05), d, (256, 1, 8, 8), sampler=sampler,
                    steps=steps, eta=1.0, generator=torch.Generator().manual_seed(0))
    assert abs((x > -1).float().mean().item() - 0.5) < 0.02


# --- samplers: every step against a float64 hand-written one --------------------------------------


def test_ddpm_step_is_ho_et_als_posterior():
    d = ddpm.Diffusion(T=50, schedule='linear')
    seen, out, gen, x = run_on_gaussian(d, 'ddpm', None, 1.0, seed=1)
    assert len(seen) == 50  # Algorithm 2: every step from T to 1
    # the posterior q(x_{t-1} | x_t, x0) from the betas alone (Ho et al. eq. 7)
    betas = np.linspace(1e-4, 0.1, 50)
    abar = np.concatenate([[1.0], np.cumprod(1 - betas)])
    for t in range(50, 0, -1):
        torch.testing.assert_close(seen[50 - t].double(), x, atol=1e-4, rtol=1e-4)
        x0, _ = gaussian_x0(abar[t], x)
        beta, prev = betas[t - 1], abar[t - 1]
        mean = (beta * np.sqrt(prev) * x0 + (1 - prev) * np.sqrt(1 - beta) * x) / (1 - abar[t])
        z = torch.randn((64, 1, 4, 4), generator=gen).double()
        x = mean + np.sqrt(beta * (1 - prev) / (1 - abar[t])) * z
    torch.testing.assert_close(out.double(), x, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize('eta', [0.0, 0.5])
def test_ddim_steps_are_song_et_als_eq_12(eta):
    d = ddpm.Diffusion(T=200)
    seen, out, gen, x = run_on_gaussian(d, 'ddim', 10, eta, seed=2)
    ts, abar = ddpm.sampling_steps(d, 10), d.abar.double().numpy()
    for i, (t, s) in enumerate(zip(ts[:-1], ts[1:])):
        torch.testing.assert_close(seen[i].double(), x, atol=1e-4, rtol=1e-4)
        x0, eps = gaussian_x0(abar[t], x)
        sigma = eta * np.sqrt((1 - abar[s]) / (1 - abar[t]) * (1 - abar[t] / abar[s]))
        z = torch.randn(x.shape, generator=gen).double()
        x = np.sqrt(abar[s]) * x0 + np.sqrt(1 - abar[s] - sigma ** 2) * eps + sigma * z
    torch.testing.assert_close(out.double(), x, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize('eta', [0.0, 1.0])
def test_dpmpp_2m_steps_are_lu_et_als_algorithm(eta):
    d = ddpm.Diffusion(T=200)
    seen, out, gen, x = run_on_gaussian(d, 'dpm++', 12, eta, seed=3)
    ts, abar = ddpm.sampling_steps(d, 12), d.abar.double().numpy()

    def lam(t):
        return 0.5 * np.log(abar[t] / (1 - abar[t]))

    x0_prev = None
    for i, (t, s) in enumerate(zip(ts[:-1], ts[1:])):
        torch.testing.assert_close(seen[i].double(), x, atol=1e-4, rtol=1e-4)
        x0, _ = gaussian_x0(abar[t], x)
        if s == 0:
            x = x0
            break
        h = lam(s) - lam(t)
        D = x0
        # DPM-Solver++(2M): D = (1 + 1 / 2r) x0_t - 1 / 2r x0_prev, r = h_prev / h
        if x0_prev is not None:
            r = (lam(t) - lam(ts[i - 1])) / h
            D = (1 + 1 / (2 * r)) * x0 - 1 / (2 * r) * x0_prev
        alpha_s, sigma_s, sigma_t = np.sqrt(abar[s]), np.sqrt(1 - abar[s]), np.sqrt(1 - abar[t])
        if eta == 0:  # the ODE form (Lu et al. 2022, Algorithm 2)
            x = sigma_s / sigma_t * x - alpha_s * np.expm1(-h) * D
        else:  # the SDE form: exp(-h) of x_t, fresh noise of variance sigma_s^2 (1 - exp(-2h))
            z = torch.randn(x.shape, generator=gen).double()
            x = (sigma_s / sigma_t * np.exp(-h) * x + alpha_s * -np.expm1(-2 * h) * D
                 + sigma_s * np.sqrt(-np.expm1(-2 * h)) * z)
        x0_prev = x0
    torch.testing.assert_close(out.double(), x, atol=1e-4, rtol=1e-4)


def test_ode_samplers_converge_to_the_exact_solution_at_their_order():
    # Gaussian data have an exact probability-flow ODE: x_t = sqrt(v_t / v_T) x_T. Every sampler
    # ends by denoising x_1, so the exact end point is E[x0 | x_1] of the exact x_1. DDIM is first
    # order (halving the step halves the error), DPM-Solver++(2M) second order (a quarter): 8 -> 64
    # steps, about 8x and 64x.
    d = ddpm.Diffusion(T=1000)
    x_T = torch.randn((64, 1, 4, 4), generator=torch.Generator().manual_seed(0)).double()
    a1, aT = d.abar[1].double(), d.abar[1000].double()
    v1, vT = a1 * S * S + 1 - a1, aT * S * S + 1 - aT
    exact = a1.sqrt() * S * S / v1 * (v1 / vT).sqrt() * x_T
    gain = {}
    for sampler in ('ddim', 'dpm++'):
        errors = []
        for steps in (8, 64):
            x = ddpm.sample(gaussian(d), d, x_T.shape, sampler=sampler, steps=steps, eta=0.0,
                            generator=torch.Generator().manual_seed(0))
            errors.append((x.double() - exact).abs().max().item())
        gain[sampler] = errors[0] / errors[1]
    assert 5 < gain['ddim'] < 13, gain  # measured: 10.7
    assert gain['dpm++'] > 40, gain  # measured: 83


@pytest.mark.parametrize('sampler', ['ddpm', 'ddim', 'dpm++'])
def test_v_models_sample_as_eps_models_do(sampler):
    # the same data through a v model: predict() must turn v into the same eps and x0
    runs = []
    for target in ('eps', 'v'):
        d = ddpm.Diffusion(T=50, target=target)
        steps = None if sampler == 'ddpm' else 10  # ddpm: all T steps
        runs.append(ddpm.sample(gaussian(d), d, (16, 1, 4, 4), sampler=sampler, steps=steps,
                                eta=1.0, generator=torch.Generator().manual_seed(4)))
    torch.testing.assert_close(runs[0], runs[1], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize('target', ['eps', 'v'])
@pytest.mark.parametrize('sampler', ['ddim', 'dpm++'])
@pytest.mark.parametrize('steps', [1, 3, 50])
def test_deterministic_samplers_recover_x0_with_an_oracle(sampler, steps, target):
    # x0 in float64: in float32, one eps step from t=T (sqrt(abar) ~ 1e-3) rebuilds x0 only to
    # ~1e-4, and missed 1e-4 on some draws of x0 (measured in float64: eps 2e-13, v 5e-8, from
    # abar's float32 rounding)
    d, x0 = ddpm.Diffusion(T=50, target=target), torch.rand(4, 1, 8, 8, dtype=torch.float64) * 2 - 1
    x = ddpm.sample(oracle(d, x0), d, x0.shape, sampler=sampler, steps=steps, eta=0.0,
                    generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(x, x0, atol=1e-6, rtol=0)


def steps_taken(d, steps):
    """The steps t at which dpm++ calls the model (once a step; the last step lands on 0), from
    the times it passes."""
    seen = []

    def predict(x, t, labels=None):
        seen.append(round(t[0].item() * d.T))
        return torch.zeros_like(x)
    ddpm.sample(as_model(predict), d, (1, 1, 4, 4), sampler='dpm++', steps=steps)
    return seen


@pytest.mark.parametrize('T,schedule,steps', [
    (200, 'cosine', 50), (200, 'cosine', 20), (200, 'linear', 50), (1000, 'linear', 30),
    (1000, 'cosine', 500), (20, 'cosine', 19), (20, 'cosine', 20), (20, 'cosine', 1)])
def test_steps_are_the_nearest_to_even_log_snr_targets(T, schedule, steps):
    d = ddpm.Diffusion(T, schedule)
    got = steps_taken(d, steps)
    assert got == ddpm.sampling_steps(d, steps)[:-1]
    assert len(got) == steps
    assert got == sorted(set(got), reverse=True)
    assert got[0] == T
    assert steps == 1 or got[-1] == 1
    # in float64: the fewest m even targets from lam(T) to lam(1) whose nearest steps are `steps`
    # distinct ones (lam of steps 1..T)
    abar = d.abar[1:].double().numpy()
    lam = 0.5 * np.log(abar / (1 - abar))
    for m in range(steps, 100 * T):
        nearest = np.abs(lam[:, None] - np.linspace(lam[-1], lam[0], m)).argmin(0) + 1
        want = sorted(set(nearest.tolist()), reverse=True)
        if len(want) >= steps:
            break
    assert got == (want if steps < T else list(range(T, 0, -1)))
    if (T, schedule, steps) == (200, 'cosine', 50):  # short steps at both ends, long in between
        assert got[:10] == list(range(200, 190, -1))
        assert got[-8:] == list(range(8, 0, -1))
        assert 10 in np.diff(got[::-1])


def test_default_is_100_steps_or_all_of_a_shorter_schedule():
    # on MNIST's T=200 the paired paths scored FID about 1 better at 100 steps than at 50
    assert len(steps_taken(ddpm.Diffusion(T=200), None)) == 100
    assert len(steps_taken(ddpm.Diffusion(T=1000, schedule='linear'), None)) == 100
    assert len(steps_taken(ddpm.Diffusion(T=20), None)) == 20


def test_step_search_is_bounded():
    d = ddpm.Diffusion(T=20)
    # a log-SNR with a flat stretch: 15 distinct nearest steps can never be found
    d.lam[1:11] = d.lam[1]
    with pytest.raises(ValueError, match='cannot place 15 steps evenly in log-SNR'):
        ddpm.sampling_steps(d, 15)


@pytest.mark.parametrize('steps', [0, 21])
def test_sampler_rejects_steps_out_of_range(steps):
    d = ddpm.Diffusion(T=20)
    with pytest.raises(ValueError, match='steps in 1..20'):
        ddpm.sample(ddpm.ScoreNet(widths=(8, 16)), d, (1, 1, 8, 8), sampler='ddim', steps=steps)


def test_guidance_zero_is_the_plain_conditional_model():
    torch.manual_seed(0)
    d, model = ddpm.Diffusion(T=10), ddpm.ScoreNet(widths=(8, 16), num_classes=10)
    y = torch.tensor([1, 7, 7, 2])
    plain = as_model(lambda x, t, labels=None: model(x, t, y))
    a = ddpm.sample(model, d, (4, 1, 8, 8), labels=y, guidance=0.0,
                    generator=torch.Generator().manual_seed(5))
    b = ddpm.sample(plain, d, (4, 1, 8, 8), generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(a, b)


@pytest.mark.parametrize('interval', [(0.5, 3.0), (0.0, math.inf)])
def test_guidance_applies_only_at_the_noise_levels_in_its_interval(interval):
    d = ddpm.Diffusion()
    guided_at = []

    def spy(x, tau, labels):
        if (labels == 10).any():  # the unconditional half of a guided pass
            guided_at.append(round(tau[0].item() * d.T))
        return torch.zeros_like(x)
    model = as_model(spy)
    model.num_classes = 10
    ddpm.sample(model, d, (2, 1, 4, 4), labels=torch.tensor([3, 5]), guidance=2.0,
                guidance_sigmas=interval, generator=torch.Generator().manual_seed(0))
    # in float64: the sampler's steps t (all but the final 0) whose sqrt((1 - abar) / abar) is in
    # (low, high]
    abar = d.abar.double()
    sigma = ((1 - abar) / abar).sqrt()
    # the default sampler's 100 steps
    want = [t for t in ddpm.sampling_steps(d, 100)[:-1] if interval[0] < sigma[t] <= interval[1]]
    assert guided_at == want
    if interval == (0.5, 3.0):
        assert 0 < len(want) < 100
    else:
        assert len(want) == 100

# --- training pieces ------------------------------------------------------------------------------


def test_ema_warms_up_then_holds_its_decay_and_decay_0_copies():
    ema, model = torch.nn.Linear(1, 1, bias=False), torch.nn.Linear(1, 1, bias=False)
    for step, decay in [(0, 0.999), (1, 0.999), (40, 0.999), (10_000, 0.999), (7, 0.0)]:
        start, target = 5.0, 1.0
        with torch.no_grad():
            ema.weight.fill_(start)
            model.weight.fill_(target)
        ddpm.ema_update(ema, model, step, decay)
        kept = 0.0 if step == 0 else min(decay, (1 + step) / (10 + step))  # of the old EMA
        assert abs(ema.weight.item() - (kept * start + (1 - kept) * target)) < 1e-6, (step, decay)


def test_learning_rate_warms_up_then_reaches_zero_at_the_planned_end():
    peak, total = 3e-3, 10_000
    assert ddpm.learning_rate(0, total, peak) == pytest.approx(peak / 500)  # 500 warm-up steps
    cosine = 0.5 * (1 + np.cos(np.pi * 499 / total))
    assert ddpm.learning_rate(499, total, peak) == pytest.approx(peak * cosine)
    assert ddpm.learning_rate(total // 2, total, peak) == pytest.approx(peak / 2)
    assert ddpm.learning_rate(total, total, peak) == 0
    assert ddpm.learning_rate(total + 5, total, peak) == 0
    assert ddpm.learning_rate(0, 40, peak) == pytest.approx(peak / 4)  # short runs: a tenth


@slow
def test_tiny_overfit_loss_falls_below_what_an_untrained_model_reaches():
    needs_mnist()
    torch.manual_seed(0)
    images, _ = ddpm.load_mnist(DATA, limit=16)
    d, model = ddpm.Diffusion(), ddpm.ScoreNet(widths=(16, 32, 64))

    def eval_loss():
        return np.mean([d.loss(model, images).item() for _ in range(20)])

    with torch.no_grad():
        untrained = eval_loss()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(300):
        loss = d.loss(model, images)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        trained = eval_loss()
    assert untrained > 0.5, untrained
    assert trained < 0.15, trained

# --- the train command ----------------------------------------------------------------------------


@slow
def test_cli_train_sample_resume_end_to_end(tmp_path):
    needs_mnist()
    out = tmp_path / 'run'
    r = run('train', *TINY, '--epochs', '1', '--out', str(out))
    assert r.returncode == 0, r.stderr
    assert 'img/s' in r.stdout
    assert sorted(p.name for p in out.iterdir()) == ['ckpt.pt', 'log.csv']
    assert ddpm.load_checkpoint(out / 'ckpt.pt')['step'] == 4
    # no architecture flags needed
    r = run('sample', '--ckpt', str(out / 'ckpt.pt'), '--n', '10', '--out', str(tmp_path / 'g.png'),
            '--npz', str(tmp_path / 's.npz'), '--batch', '4')
    assert r.returncode == 0, r.stderr
    # the default sampler: 100 steps, or T (20) if fewer
    assert 'dpm++ with 20 steps;' in r.stdout
    # 10 digits, 4 per row, padding 2
    assert Image.open(tmp_path / 'g.png').size == (4 * 30 + 2, 3 * 30 + 2)
    samples = np.load(tmp_path / 's.npz')['samples']
    assert samples.shape == (10, 28, 28)
    assert samples.dtype == np.uint8
    # into the checkpoint's folder
    r = run('train', *TINY, '--epochs', '2', '--resume', str(out / 'ckpt.pt'))
    assert r.returncode == 0, r.stderr
    assert 'steps 4 to 8' in r.stdout
    assert ddpm.load_checkpoint(out / 'ckpt.pt')['step'] == 8
    # one run, one log: a line per epoch
    assert len((out / 'log.csv').read_text().splitlines()) == 2


def stop_at(monkeypatch, calls):
    """Make training receive SIGINT during its `calls`-th loss: the run finishes that step, saves
    and exits."""
    count, loss = [0], ddpm.Diffusion.loss

    def interrupted_loss(self, *args, **kwargs):
        count[0] += 1
        if count[0] == calls:
            os.kill(os.getpid(), signal.SIGINT)
        return loss(self, *args, **kwargs)
    monkeypatch.setattr(ddpm.Diffusion, 'loss', interrupted_loss)


@slow
def test_resume_from_the_middle_of_an_epoch_is_bitwise_exact(tmp_path, monkeypatch):
    needs_mnist()
    ddpm.main(['train', *TINY, '--epochs', '3', '--out', str(tmp_path / 'straight')])
    with monkeypatch.context() as m:
        stop_at(m, 6)  # step 6 of 12: the middle of epoch 2
        with pytest.raises(SystemExit, match='SIGINT at step 6'):
            ddpm.main(['train', *TINY, '--epochs', '3', '--out', str(tmp_path / 'resumed')])
    ddpm.main(['train', '--data', DATA, '--device', 'cpu', '--resume',
               str(tmp_path / 'resumed' / 'ckpt.pt')])
    a, b = (ddpm.load_checkpoint(tmp_path / d / 'ckpt.pt') for d in ('straight', 'resumed'))
    assert a['step'] == 12
    assert b['step'] == 12
    for key in ('model', 'ema'):
        for name, value in a[key].items():
            assert torch.equal(value, b[key][name]), (key, name)
    for name, value in a['optimizer']['state'][0].items():
        assert torch.equal(value, b['optimizer']['state'][0][name]), name


@slow
def test_resume_takes_left_out_flags_from_the_run_and_typed_ones_from_the_user(
        tmp_path, monkeypatch):
    needs_mnist()
    ddpm.main(['train', *TINY, '--epochs', '1', '--lr', '1e-3', '--out', str(tmp_path)])
    # the run's --data, not today's default
    monkeypatch.setenv('DDPM_DATA', str(tmp_path / 'no-mnist-here'))
    ddpm.main(['train', '--resume', str(tmp_path / 'ckpt.pt'), '--epochs', '2'])
    # not the defaults' batch 32 at lr 3e-3, T=200
    ckpt = ddpm.load_checkpoint(tmp_path / 'ckpt.pt')
    assert ckpt['step'] == 8
    assert ckpt['args']['lr'] == 1e-3
    assert ckpt['args']['batch'] == 50
    assert ckpt['config']['T'] == 20
    assert ckpt['config']['widths'] == (8, 16)
    # a flag typed with the parser's default value is still typed: --lr 3e-3 is used, not the
    # checkpoint's 1e-3
    ddpm.main(['train', '--data', DATA, '--resume', str(tmp_path / 'ckpt.pt'), '--epochs', '3',
               '--lr', '3e-3'])
    assert ddpm.load_checkpoint(tmp_path / 'ckpt.pt')['args']['lr'] == 3e-3


@slow
def test_half_precision_ema_weights_alone_sample(tmp_path):
    # the form of assets/mnist.pt: the EMA weights in float16 (buffers, such as the Fourier
    # frequencies, in float32) and the config, no optimizer; sample needs nothing else
    needs_mnist()
    ddpm.main(['train', *TINY, '--epochs', '1', '--out', str(tmp_path)])
    ckpt = ddpm.load_checkpoint(tmp_path / 'ckpt.pt')
    half = {name: value.half() if name != 'freqs' else value for name, value in ckpt['ema'].items()}
    small = {'format': ddpm.FORMAT, 'config': ckpt['config'], 'ema': half}
    torch.save(small, tmp_path / 'small.pt')
    drawn = {}
    for name in ('ckpt', 'small'):
        r = run('sample', '--ckpt', str(tmp_path / f'{name}.pt'), '--n', '8', '--out', '',
                '--npz', str(tmp_path / f'{name}.npz'), '--device', 'cpu')
        assert r.returncode == 0, r.stderr
        drawn[name] = np.load(tmp_path / f'{name}.npz')['samples'].astype(int)
    full, small = drawn['ckpt'], drawn['small']
    # float16 weights: the same digits, up to rounding (measured 0.03)
    assert np.abs(full - small).mean() < 0.5


SHIPPED = ROOT / 'assets' / 'mnist.pt'
SHIPPED_COND = ROOT / 'assets' / 'mnist_cond.pt'


def mnist_logits(samples):
    """fid.py's MNIST classifier's logits for uint8 digits (N, 28, 28)."""
    with torch.no_grad():
        return fid.Extractor('mnist').net(fid.to_input(samples))


@pytest.mark.parametrize('path, flags', [(SHIPPED, []), (SHIPPED_COND, ['--cond'])])
def test_shipped_models_are_the_defaults_after_60_epochs_in_float16(path, flags):
    # README's quick start samples assets/mnist.pt: `train --epochs 60` with every default, its EMA
    # in float16; --digit samples assets/mnist_cond.pt, the same with --cond
    assert path.stat().st_size < 8e6
    ckpt = torch.load(path, weights_only=True)
    assert set(ckpt) == {'format', 'config', 'args', 'step', 'ema'}  # no optimizer, no RNG state
    parser, _ = ddpm.build_parser()
    defaults = vars(parser.parse_args(['train', *flags]))
    defaults |= {'lr': 3e-3, 'ema': 0.999}  # "none" at batch 32: the flags it was run with
    for name in ddpm.RUN_FLAGS:
        if name != 'data':
            assert ckpt['args'][name] == defaults[name], name
    model = {name: defaults[name] for name in ddpm.MODEL_FLAGS}
    assert ckpt['config'] == model | {'shape': (1, 28, 28)}
    assert ckpt['step'] == 60 * 60000 // 32
    for name, value in ckpt['ema'].items():
        assert value.dtype == (torch.float32 if name == 'freqs' else torch.float16), name


@slow
def test_shipped_model_draws_digits_a_classifier_is_sure_of(tmp_path):
    # the design card's command right after clone: no run yet, so the shipped model
    r = run('sample', '--n', '100', '--npz', 's.npz', '--out', 'grid.png', '--device', 'cpu',
            cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert f'no --ckpt: sampling {SHIPPED}' in r.stdout
    # 10x10 digits, 2-pixel gaps
    assert Image.open(tmp_path / 'grid.png').size == (10 * 30 + 2, 10 * 30 + 2)
    samples = np.load(tmp_path / 's.npz')['samples']
    confidence, digit = mnist_logits(samples).softmax(1).max(1)
    # measured: 94% of these 100 (each digit 7-12 times), 95% of 10,000; a 30-minute model: 91%
    assert (confidence > 0.9).float().mean() > 0.9
    assert set(digit.tolist()) == set(range(10))


@slow
def test_shipped_conditional_model_draws_the_digits_asked_for(tmp_path):
    # `sample --digit all` right after clone: no runs/cond yet, so the shipped conditional model
    r = run('sample', '--digit', 'all', '--n', '100', '--npz', 's.npz', '--out', 'grid.png',
            '--device', 'cpu', cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert f'no --ckpt: sampling {SHIPPED_COND}' in r.stdout
    samples = np.load(tmp_path / 's.npz')['samples']
    read = mnist_logits(samples).argmax(1)
    asked = torch.arange(100) % 10
    # measured: all 100 of these read as asked (the classifier errs on 0.6% of real test digits)
    assert (read == asked).float().mean() >= 0.97


@slow
def test_sample_without_ckpt_takes_the_trained_run_and_a_named_missing_ckpt_is_an_error(
        tmp_path, monkeypatch, capsys):
    needs_mnist()
    ddpm.main(['train', *TINY, '--epochs', '1', '--out', str(tmp_path / 'runs' / 'mnist')])
    r = run('sample', '--n', '4', '--out', 'g.png', '--device', 'cpu', cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert 'no --ckpt: sampling runs/mnist/ckpt.pt' in r.stdout
    assert 'dpm++ with 20 steps;' in r.stdout  # the tiny run's T, not the shipped 200
    one_line_error(run('sample', '--ckpt', 'runs/other/ckpt.pt', '--device', 'cpu', cwd=tmp_path),
                   'checkpoint runs/other/ckpt.pt not found (train one with: python ddpm.py train)')
    # a chosen digit takes the conditional run, runs/cond, and names the command that makes one
    ddpm.main(['train', *TINY, '--epochs', '1', '--cond', '--out', str(tmp_path / 'runs' / 'cond')])
    monkeypatch.chdir(tmp_path)
    capsys.readouterr()
    ddpm.main(['sample', '--digit', '7', '--n', '2', '--out', 'g.png', '--device', 'cpu'])
    assert 'no --ckpt: sampling runs/cond/ckpt.pt' in capsys.readouterr().out
    exits_with_one_line(capsys, ddpm.main, ['sample', '--digit', '7', '--ckpt', 'runs/c/ckpt.pt'],
                        'not found (train one with: python ddpm.py train --cond --out runs/cond)')


@slow
def test_sample_draws_what_the_library_draws_by_default(tmp_path):
    # the library's defaults are the command line's: dpm++, 100 steps or T (20), the SDE
    needs_mnist()
    ddpm.main(['train', *TINY, '--epochs', '1', '--out', str(tmp_path)])
    ckpt = ddpm.load_checkpoint(tmp_path / 'ckpt.pt')
    d, model = ddpm.build(ckpt['config'], 'cpu', weights=ckpt['ema'])
    drawn = []
    for flags in ([], ['--sampler', 'ddim', '--eta', '0.5', '--steps', '7']):
        ddpm.main(['sample', '--ckpt', str(tmp_path / 'ckpt.pt'), '--n', '6', '--seed', '3',
                   '--out', '', '--npz', str(tmp_path / 's.npz'), '--device', 'cpu', *flags])
        drawn.append(np.load(tmp_path / 's.npz')['samples'])
    want = ddpm.sample(model, d, (6, 1, 28, 28), generator=torch.Generator().manual_seed(3))
    assert (drawn[0] == ddpm.to_uint8(want)).all()
    want = ddpm.sample(model, d, (6, 1, 28, 28), sampler='ddim', eta=0.5, steps=7,
                       generator=torch.Generator().manual_seed(3))
    assert (drawn[1] == ddpm.to_uint8(want)).all()


@slow
def test_resume_refuses_contradicting_flags(tmp_path):
    needs_mnist()
    ddpm.main(['train', *TINY, '--depth', '3', '--epochs', '1', '--out', str(tmp_path)])
    one_line_error(run('train', *TINY[:-6], '--T', '50', '--resume', str(tmp_path / 'ckpt.pt')),
                   '--T 50 contradicts the checkpoint (20)')
    # 2 is the default, but it was typed
    one_line_error(run('train', *TINY, '--epochs', '2', '--depth', '2', '--resume',
                       str(tmp_path / 'ckpt.pt')), '--depth 2 contradicts the checkpoint (3)')
    # another batch would read the saved step count as steps of its own size
    with pytest.raises(SystemExit, match=r'^error: --batch 25 contradicts the checkpoint \(50\)'):
        ddpm.main(['train', '--data', DATA, '--batch', '25', '--epochs', '2', '--resume',
                   str(tmp_path / 'ckpt.pt')])
    r = run('sample', '--ckpt', str(tmp_path / 'ckpt.pt'), '--n', '2', '--out',
            str(tmp_path / 'g.png'))
    assert r.returncode == 0, r.stderr  # the checkpoint's config builds the deeper net


@slow
def test_resuming_a_finished_run_names_the_flag_that_extends_it_and_writes_nothing(tmp_path):
    needs_mnist()
    ddpm.main(['train', *TINY, '--epochs', '1', '--out', str(tmp_path / 'a')])
    r = run('train', '--data', DATA, '--resume', str(tmp_path / 'a' / 'ckpt.pt'), '--out',
            str(tmp_path / 'b'))
    one_line_error(r, 'has finished its 4 steps: raise --epochs')
    assert not (tmp_path / 'b').exists()
    r = run('train', '--data', DATA, '--resume', str(tmp_path / 'a' / 'ckpt.pt'), '--epochs', '2')
    assert r.returncode == 0, r.stderr  # and raising it goes on
    # a --minutes run whose minutes are spent names --minutes, however high --epochs is
    ckpt = torch.load(tmp_path / 'a' / 'ckpt.pt', weights_only=True)
    ckpt['args']['minutes'], ckpt['seconds'] = 1.0, 61.0
    torch.save(ckpt, tmp_path / 'a' / 'ckpt.pt')
    r = run('train', '--data', DATA, '--resume', str(tmp_path / 'a' / 'ckpt.pt'), '--epochs', '50')
    one_line_error(r, 'has used its 1 minutes: raise --minutes')


@slow
def test_checkpoint_from_an_older_ddpm_py_is_refused_with_what_it_lacks(tmp_path):
    # before --depth, --target and --weight-max, a checkpoint implied values that today's defaults
    # contradict; resuming it as if it were today's would train another net with another loss
    needs_mnist()
    ddpm.main(['train', *TINY, '--epochs', '1', '--out', str(tmp_path / 'a')])
    ckpt = torch.load(tmp_path / 'a' / 'ckpt.pt', weights_only=True)
    del ckpt['args']['weight_max']
    torch.save(ckpt, tmp_path / 'old.pt')
    r = run('train', '--data', DATA, '--epochs', '2', '--resume', str(tmp_path / 'old.pt'),
            '--out', str(tmp_path / 'b'))
    one_line_error(r, 'from an older ddpm.py, without weight_max')
    assert not (tmp_path / 'b').exists()


@slow
def test_a_run_is_never_overwritten_by_another(tmp_path):
    needs_mnist()
    ddpm.main(['train', *TINY, '--epochs', '1', '--out', str(tmp_path / 'a')])
    before = {p.name: p.read_bytes() for p in (tmp_path / 'a').iterdir()}
    one_line_error(run('train', *TINY, '--epochs', '1', '--out', str(tmp_path / 'a')),
                   f'{tmp_path / "a"} holds another run: continue it with --resume')
    ddpm.main(['train', *TINY, '--epochs', '1', '--out', str(tmp_path / 'b')])
    # resumed, but into another run
    one_line_error(run('train', *TINY, '--epochs', '2', '--resume', str(tmp_path / 'b' / 'ckpt.pt'),
                       '--out', str(tmp_path / 'a')), 'holds another run')
    assert {p.name: p.read_bytes() for p in (tmp_path / 'a').iterdir()} == before


@slow
def test_a_folder_with_a_checkpoint_and_no_log_is_refused_and_left_as_it_was(tmp_path):
    needs_mnist()
    ddpm.main(['train', *TINY, '--epochs', '1', '--out', str(tmp_path / 'a')])
    (tmp_path / 'a' / 'log.csv').unlink()
    one_line_error(run('train', *TINY, '--out', str(tmp_path / 'a')), 'holds another run')
    assert [p.name for p in (tmp_path / 'a').iterdir()] == ['ckpt.pt']  # no log.csv made


@slow
def test_a_run_that_died_before_its_checkpoint_says_so_and_how_to_reuse_the_folder(tmp_path):
    needs_mnist()
    (tmp_path / 'c').mkdir()
    (tmp_path / 'c' / 'log.csv').write_text('1,0.25,0.5,1e-4,0.1\n')
    r = run('train', *TINY, '--out', str(tmp_path / 'c'))
    one_line_error(r, 'holds the log of a run that saved no checkpoint: delete')
    assert 'continue it with --resume' not in r.stderr  # there is nothing to resume
    (tmp_path / 'c' / 'log.csv').unlink()  # what the message says to do
    r = run('train', *TINY, '--epochs', '1', '--out', str(tmp_path / 'c'))
    assert r.returncode == 0, r.stderr


@slow
def test_a_second_train_on_the_same_folder_is_refused_while_the_first_runs(tmp_path):
    needs_mnist()
    first = start('train', *TINY, '--epochs', '10000', '--out', str(tmp_path))
    try:
        deadline = time.time() + 120
        while not (tmp_path / 'ckpt.pt').exists():  # its first epoch's checkpoint
            assert time.time() < deadline, 'no checkpoint within 120 s'
            assert first.poll() is None, first.stderr.read()
            time.sleep(0.05)
        one_line_error(run('train', '--data', DATA, '--resume', str(tmp_path / 'ckpt.pt'),
                           '--epochs', '20000'), f'another train is running in {tmp_path}')
    finally:
        first.kill()  # no clean exit: the kernel drops its lock
        first.wait(timeout=60)
    step = ddpm.load_checkpoint(tmp_path / 'ckpt.pt')['step']
    r = run('train', '--data', DATA, '--resume', str(tmp_path / 'ckpt.pt'), '--epochs',
            str(step // 4 + 1))
    assert r.returncode == 0, r.stderr
    assert f'steps {step} to' in r.stdout


@slow
@pytest.mark.parametrize('sig', [signal.SIGINT, signal.SIGTERM, signal.SIGHUP],
                         ids=['SIGINT', 'SIGTERM', 'SIGHUP'])
def test_signal_saves_a_checkpoint_that_resumes(tmp_path, sig):
    # SIGHUP: a closed terminal or a dropped ssh; it killed the run without a save
    needs_mnist()
    proc = start('train', *TINY, '--epochs', '10000', '--out', str(tmp_path))
    assert 'training' in proc.stdout.readline()
    time.sleep(2)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode != 0
    assert f'continue: python ddpm.py train --resume {tmp_path / "ckpt.pt"}' in err, err
    step = ddpm.load_checkpoint(tmp_path / 'ckpt.pt')['step']
    assert step > 0
    r = run('train', '--data', DATA, '--epochs', str(step // 4 + 1), '--resume',
            str(tmp_path / 'ckpt.pt'))
    assert r.returncode == 0, r.stderr
    assert f'steps {step} to' in r.stdout


def test_out_of_memory_is_one_line(monkeypatch):
    def out_of_memory(args):
        raise torch.OutOfMemoryError('CUDA out of memory. Tried to allocate 90 GiB\nsee the docs')
    monkeypatch.setattr(ddpm, 'sample_command', out_of_memory)
    one_line = r'^error: OutOfMemoryError CUDA out of memory. Tried to allocate 90 GiB see the docs'
    with pytest.raises(SystemExit, match=one_line):
        ddpm.main(['sample'])


@slow
@pytest.mark.parametrize('when', ['while torch loads', 'while it works'])
@pytest.mark.parametrize('script', ['ddpm.py', 'fid.py'])
def test_ctrl_c_outside_training_is_one_line(tmp_path, script, when):
    needs_mnist()
    if script == 'ddpm.py':  # sampling many digits: progress lines on stdout
        ddpm.main(['train', *TINY, '--epochs', '1', '--out', str(tmp_path)])
        proc = start('sample', '--ckpt', str(tmp_path / 'ckpt.pt'), '--n', '100000', '--batch',
                     '10', '--npz', str(tmp_path / 'out.npz'), '--device', 'cpu')
        progress = proc.stdout
    else:  # scoring many digits: progress lines on stderr
        np.savez_compressed(tmp_path / 's.npz', samples=np.zeros((100_000, 28, 28), np.uint8))
        proc = start(str(tmp_path / 's.npz'), '--data', DATA, script='fid.py')
        progress = proc.stderr
    if when == 'while torch loads':  # importing torch takes a second or more
        time.sleep(0.3)
    else:
        assert progress.readline()  # well into the work
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode != 0
    assert err.strip().splitlines()[-1] == 'interrupted', err
    assert 'Traceback' not in err, err
    assert not (tmp_path / 'out.npz').exists()
    assert 'FID' not in out, out


@slow
def test_checkpoint_survives_sigkill_during_saves(tmp_path):
    path = tmp_path / 'ckpt.pt'
    script = (f'import ddpm, torch\nstate = {{"format": ddpm.FORMAT, "config": {{}}, "ema": {{}}, '
              f'"w": torch.randn(2_000_000)}}\nwhile True:\n'
              f'    ddpm.write_atomic({str(path)!r}, lambda f: torch.save(state, f))\n')
    proc = subprocess.Popen([sys.executable, '-c', script], cwd=ROOT)
    deadline = time.time() + 60
    while not path.exists():
        assert time.time() < deadline, 'no checkpoint written within 60 s'
        assert proc.poll() is None
        time.sleep(0.05)
    time.sleep(1.0)  # many saves in flight by now
    proc.kill()
    proc.wait(timeout=60)
    assert ddpm.load_checkpoint(path)['w'].shape == (2_000_000,)


@slow
def test_nan_loss_stops_with_a_message_and_keeps_the_checkpoint(tmp_path, monkeypatch):
    needs_mnist()
    ddpm.main(['train', *TINY, '--epochs', '1', '--out', str(tmp_path / 'a')])
    before = (tmp_path / 'a' / 'ckpt.pt').read_bytes()

    def nan(*args, **kwargs):
        return torch.tensor(float('nan'), requires_grad=True)

    monkeypatch.setattr(ddpm.Diffusion, 'loss', nan)
    # the loss is read at each progress line (every 5 s) and before each checkpoint: here by the
    # one at step 8
    # the lr it trained with: batch 50 scales the default 3e-3 by sqrt(50 / 32)
    kept = r'loss became nan by step [5-8]; try a lower --lr than 0.00375 \(.*ckpt.pt is kept\)'
    with pytest.raises(SystemExit, match=kept):
        ddpm.main(['train', '--data', DATA, '--epochs', '2', '--resume',
                   str(tmp_path / 'a' / 'ckpt.pt')])
    assert (tmp_path / 'a' / 'ckpt.pt').read_bytes() == before
    with pytest.raises(SystemExit, match=r'loss became nan by step [1-4]; .*\(none was saved\)'):
        ddpm.main(['train', *TINY, '--epochs', '1', '--out', str(tmp_path / 'b')])


class FakeClock:
    """ddpm's clock, moved only by training steps: `seconds_per_step(step)` each."""
    def __init__(self, monkeypatch, seconds_per_step):
        self.now, self.steps, loss = 0.0, 0, LOSS

        def timed_loss(diffusion, *args, **kwargs):
            self.now += seconds_per_step(self.steps)
            self.steps += 1
            return loss(diffusion, *args, **kwargs)
        monkeypatch.setattr(ddpm.Diffusion, 'loss', timed_loss)
        monkeypatch.setattr(ddpm, 'time', SimpleNamespace(time=lambda: self.now))


@slow
def test_progress_line_reports_the_recent_pace_not_the_average(tmp_path, monkeypatch, capsys):
    needs_mnist()
    # 4 slow steps (a busy CPU), then fast ones
    FakeClock(monkeypatch, lambda step: 25 if step < 4 else 1)
    ddpm.main(['train', *TINY, '--epochs', '3', '--out', str(tmp_path)])  # 12 steps of 50 images
    lines = [line for line in capsys.readouterr().out.splitlines() if ' img/s ' in line]
    rates = [line.split(' img/s ')[0].rsplit(' ', 1)[1] for line in lines]
    # a line a step while slow (25 s >= 5 s), then one at each epoch's end; the average since the
    # start would read 8 * 50 / 104 = 4 img/s at step 8 and an ETA of 0.9 minutes
    assert rates == ['2', '2', '2', '2', '50', '50'], lines
    assert 'step 8/12' in lines[4], lines
    assert lines[4].endswith('eta 0.1m'), lines


@slow
def test_minutes_budget_plans_the_schedule_to_end_on_time(tmp_path, monkeypatch):
    needs_mnist()
    clock = FakeClock(monkeypatch, lambda step: 2.0)  # 2 s a step: a 1-minute budget holds 30 steps
    ddpm.main(['train', *TINY, '--minutes', '1', '--out', str(tmp_path)])
    ckpt = ddpm.load_checkpoint(tmp_path / 'ckpt.pt')
    assert ckpt['step'] == 30
    assert ckpt['total'] == 30
    assert clock.steps == 30
    assert ckpt['seconds'] == 60
    last = (tmp_path / 'log.csv').read_text().splitlines()[-1].split(',')
    assert last[0] == '30'
    assert float(last[3]) == 0  # the cosine reached 0 at the planned end
    FakeClock(monkeypatch, lambda step: 2.0)
    # the rest of 2 min
    ddpm.main(['train', '--data', DATA, '--minutes', '2', '--resume', str(tmp_path / 'ckpt.pt')])
    assert ddpm.load_checkpoint(tmp_path / 'ckpt.pt')['step'] == 60
    # log.csv's seconds are the run's, not the leg's
    assert (tmp_path / 'log.csv').read_text().splitlines()[-1].split(',')[-1] == '120.0'
    # --epochs still caps a fast run: 2 epochs of 4 steps
    FakeClock(monkeypatch, lambda step: 0.001)
    ddpm.main(['train', *TINY, '--minutes', '1', '--epochs', '2', '--out',
               str(tmp_path / 'capped')])
    assert ddpm.load_checkpoint(tmp_path / 'capped' / 'ckpt.pt')['step'] == 8


@slow
def test_label_dropout_happens_at_a_tenth(tmp_path, monkeypatch):
    needs_mnist()
    seen, loss = [], ddpm.Diffusion.loss

    def record(self, m, x, y=None, *a, **kw):  # the labels of each batch, then the real loss
        seen.append(y)
        return loss(self, m, x, y, *a, **kw)
    monkeypatch.setattr(ddpm.Diffusion, 'loss', record)
    ddpm.main(['train', *TINY[:3], '2000', *TINY[4:], '--cond', '--epochs', '1', '--out',
               str(tmp_path)])
    labels = torch.cat(seen)
    assert len(labels) == 2000
    assert abs((labels == 10).float().mean().item() - 0.1) < 0.02


@slow
@pytest.mark.parametrize('typed', [[], ['--lr', '1e-3', '--ema', '0.9']])
def test_left_out_lr_and_ema_follow_the_batch(tmp_path, monkeypatch, typed):
    needs_mnist()
    decays, update = [], ddpm.ema_update

    def record(ema, model, step, decay):
        decays.append(decay)
        update(ema, model, step, decay)
    monkeypatch.setattr(ddpm, 'ema_update', record)
    # 200 digits in batches of 128: 1 step an epoch, 2 in all; step 1's lr is half the peak
    ddpm.main(['train', *TINY[:5], '128', *TINY[6:], '--epochs', '2', '--out', str(tmp_path),
               *typed])
    peak, decay = (1e-3, 0.9) if typed else (3e-3 * math.sqrt(4), 0.999 ** 4)
    first_line = (tmp_path / 'log.csv').read_text().splitlines()[0].split(',')
    assert float(first_line[3]) == pytest.approx(peak / 2, rel=1e-3)
    assert decays == [decay, decay]


@slow
def test_a_checkpoint_of_fused_adam_resumes_with_this_machines_adam(tmp_path):
    needs_mnist()
    path = tiny_run(tmp_path)
    ckpt = torch.load(path, weights_only=True)
    for group in ckpt['optimizer']['param_groups']:  # as a run on CUDA saves it
        group['fused'] = True
    torch.save(ckpt, path)
    ddpm.main(['train', '--data', DATA, '--device', 'cpu', '--epochs', '2', '--resume', str(path)])
    resumed = ddpm.load_checkpoint(path, ddpm.RESUME_PARTS)
    assert resumed['step'] == 8
    assert resumed['optimizer']['param_groups'][0]['fused'] is None


@needs_cuda
def test_cuda_graphs_give_the_eager_loss_and_gradients():
    torch.manual_seed(0)
    d, eager = ddpm.Diffusion(), ddpm.ScoreNet(num_classes=10).cuda()
    example = torch.zeros(16, 1, 28, 28, device='cuda'), torch.zeros(16, dtype=torch.long).cuda()
    graphed = ddpm.cuda_graphed(copy.deepcopy(eager), *example)
    assert 'forward' in vars(graphed)  # recorded: not the eager fallback
    for seed in (1, 2):  # two batches: each replay reads its own inputs
        g = torch.Generator('cuda').manual_seed(seed)
        x0 = torch.rand(16, 1, 28, 28, device='cuda', generator=g) * 2 - 1
        y = torch.randint(0, 11, (16,), device='cuda', generator=g)
        t = torch.randint(1, 201, (16,), device='cuda', generator=g)
        noise = torch.randn(16, 1, 28, 28, device='cuda', generator=g)
        losses, grads = [], []
        for model in (eager, graphed):
            model.zero_grad(set_to_none=True)
            loss = d.loss(model, x0, y, t=t, noise=noise)
            loss.backward()
            losses.append(loss.item())
            grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
        assert losses[1] == pytest.approx(losses[0], rel=1e-3)
        assert (grads[1] - grads[0]).norm() < 1e-2 * grads[0].norm()


@needs_cuda
@slow
def test_a_cuda_run_resumes_on_the_cpu_and_back(tmp_path):
    needs_mnist()
    flags, path = TINY[:-2], str(tmp_path / 'run' / 'ckpt.pt')
    r = run('train', *flags, '--device', 'cuda', '--epochs', '1', '--out', str(tmp_path / 'run'))
    assert r.returncode == 0, r.stderr
    assert 'without CUDA graphs' not in r.stdout
    for device, steps in (('cpu', 8), ('cuda', 12)):
        r = run('train', *flags, '--device', device, '--epochs', str(steps // 4), '--resume', path)
        assert r.returncode == 0, r.stderr
        assert ddpm.load_checkpoint(path)['step'] == steps
    r = run('sample', '--ckpt', path, '--n', '8', '--out', str(tmp_path / 'g.png'))
    assert r.returncode == 0, r.stderr


@slow
def test_tiny_conditional_overfit_draws_the_requested_class(tmp_path, monkeypatch):
    needs_mnist()
    images, labels = ddpm.load_mnist(DATA, limit=1000)
    zeros_and_ones = (labels == 0) | (labels == 1)
    twenty = images[zeros_and_ones][:20], labels[zeros_and_ones][:20]
    monkeypatch.setattr(ddpm, 'load_mnist', lambda *a, **k: twenty)
    ddpm.main(['train', '--data', DATA, '--cond', '--T', '20', '--target', 'v', '--widths',
               '32,64,128', '--batch', '10', '--epochs', '200', '--device', 'cpu', '--out',
               str(tmp_path)])
    ckpt = ddpm.load_checkpoint(tmp_path / 'ckpt.pt')
    diffusion, model = ddpm.build(ckpt['config'], 'cpu')
    model.load_state_dict(ckpt['ema'])
    wanted = torch.tensor([0, 1] * 20)
    x = ddpm.sample(model, diffusion, (40, 1, 28, 28), sampler='dpm++', steps=20, labels=wanted,
                    guidance=1.0, generator=torch.Generator().manual_seed(0))
    drawn = mnist_logits(ddpm.to_uint8(x)).argmax(1)
    assert (drawn == wanted).float().mean() >= 0.8, drawn.tolist()

# --- bad input: one line, before any long work, nothing lost --------------------------------------


def test_checkpoint_that_would_run_code_is_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, (f'touch {tmp_path / "pwned"}',))
    path = tmp_path / 'evil.pt'
    with open(path, 'wb') as f:
        pickle.dump({'format': ddpm.FORMAT, 'x': Evil()}, f)
    with pytest.raises(ddpm.DDPMError, match='not a readable ddpm.py checkpoint'):
        ddpm.load_checkpoint(path)
    assert not (tmp_path / 'pwned').exists()


def exits_with_one_line(capsys, main, args, message):
    """`main(args)` in this process must exit non-zero with one line holding `message`: the exit
    message, or what argparse printed. An exception other than SystemExit (what would print a
    traceback) fails the test."""
    with pytest.raises(SystemExit) as stop:
        main(args)
    text = stop.value.code if isinstance(stop.value.code, str) else capsys.readouterr().err
    assert stop.value.code not in (0, None)
    assert message in text, text
    assert len(text.strip().splitlines()) == 1, text


@slow
def test_bad_inputs_give_one_line_errors(tmp_path, monkeypatch, capsys):
    (tmp_path / 'junk.pt').write_bytes(b'not a checkpoint')
    (tmp_path / 'empty.pt').write_bytes(b'')
    torch.save({'some': 'dict'}, tmp_path / 'other.pt')
    torch.save({'format': ddpm.FORMAT, 'config': {}}, tmp_path / 'no_ema.pt')
    (tmp_path / 'readonly').mkdir(mode=0o500)
    cases = [
        (['sample', '--ckpt', str(tmp_path / 'missing.pt')], 'not found'),
        (['sample', '--ckpt', str(tmp_path / 'junk.pt')], 'not a readable ddpm.py checkpoint'),
        (['sample', '--ckpt', str(tmp_path / 'empty.pt')], 'not a readable ddpm.py checkpoint'),
        (['train', '--resume', str(tmp_path / 'empty.pt')], 'not a readable ddpm.py checkpoint'),
        (['sample', '--ckpt', str(tmp_path / 'other.pt')], 'is not a ddpm.py checkpoint'),
        (['sample', '--ckpt', str(tmp_path / 'no_ema.pt')], "is incomplete: it lacks ['ema']"),
        (['train', '--T', '0'], 'argument --T: 0 is out of range'),
        (['train', '--lr', 'fast'], "argument --lr: invalid float value: 'fast'"),
        (['train', '--batch', '0'], 'argument --batch: 0 is out of range'),
        (['train', '--widths', '32'], '--widths needs two or more levels'),
        (['train', '--widths', '50000,50000'], 'argument --widths: 50000 is out of range'),
        (['train', '--depth', '0'], 'argument --depth: 0 is out of range'),
        (['sample', '--n', '-1'], 'argument --n: -1 is out of range'),
        (['sample', '--n', '1000000000000'], 'argument --n: 1000000000000 is out of range'),
        (['sample', '--digit', '11'], 'argument --digit: invalid choice'),
        (['sample', '--guidance', '-1'], 'argument --guidance: -1 is out of range'),
        (['sample', '--out', ''], "nothing to write: --out '' and no --npz"),
        (['sample', '--out', str(tmp_path / 'grid.txt'), '--npz', str(tmp_path / 'x.npz')],
         'the grid needs a type Pillow writes, such as .png'),
        (['sample', '--out', str(tmp_path / 'grid.psd'), '--npz', str(tmp_path / 'x.npz')],
         'the grid needs a type Pillow writes'),  # Pillow reads .psd, writes none
        (['sample', '--out', str(tmp_path / 'readonly'), '--npz', str(tmp_path / 'x.npz')],
         'the grid needs a type Pillow writes'),
        (['sample', '--out', str(tmp_path), '--npz', str(tmp_path / 'x.npz')],
         'the grid needs a type Pillow writes'),
        (['train', '--data', str(tmp_path / 'nowhere'), '--out', str(tmp_path / 'o')],
         'cannot load MNIST from'),
        (['train', '--device', 'nonsense'], 'nonsense'),
        (['train', '--minutes', 'inf'], 'argument --minutes: inf is out of range'),
        (['train', '--lr', 'nan'], 'argument --lr: nan is out of range'),
        (['sample', '--eta', 'inf'], 'argument --eta: inf is out of range'),
        (['train', '--resume', ''], "checkpoint '' not found"),  # it trained a new run
        (['train', '--seed', '-1'], 'argument --seed: -1 is out of range'),
        (['sample', '--seed', str(2**63)], f'argument --seed: {2**63} is out of range'),
    ]
    if os.geteuid() != 0:  # root can write anywhere
        cases.append((['train', *TINY, '--out', str(tmp_path / 'readonly' / 'run')],
                      'Permission denied'))
    monkeypatch.setenv('TORCH_HOME', str(tmp_path))
    monkeypatch.setenv('no_proxy', '*')
    monkeypatch.setenv('https_proxy', 'http://127.0.0.1:9')  # no download: fail at once
    for args, message in cases:
        exits_with_one_line(capsys, ddpm.main, args, message)
    assert not (tmp_path / 'x.npz').exists()  # the bad grid names were refused before sampling
    assert not (tmp_path / 'o').exists()  # a refused command made no folder
    for args, message in cases[:1] + cases[6:7]:  # and so in a process of its own, as users run it
        one_line_error(run(*args, timeout=120), message)


@slow
def test_damaged_checkpoints_give_one_line_errors(tmp_path, capsys):
    needs_mnist()
    ddpm.main(['train', *TINY, '--epochs', '1', '--out', str(tmp_path / 'a')])
    ckpt = torch.load(tmp_path / 'a' / 'ckpt.pt', weights_only=True)
    ckpt['ema']['out.weight'] = torch.zeros(3, 3)
    torch.save(ckpt, tmp_path / 'shapes.pt')
    ckpt = torch.load(tmp_path / 'a' / 'ckpt.pt', weights_only=True)
    del ckpt['optimizer']
    torch.save(ckpt, tmp_path / 'no_optimizer.pt')
    # what assets/mnist.pt holds
    sampling_only = {part: ckpt[part] for part in ('format', 'config', 'ema')}
    torch.save(sampling_only, tmp_path / 'ema_only.pt')
    ckpt = torch.load(tmp_path / 'a' / 'ckpt.pt', weights_only=True)
    ckpt['config'].update(schedule='linear', T=200, beta_end=0.999)
    # a checkpoint of a schedule that would hang the step search
    torch.save(ckpt, tmp_path / 'schedule.pt')
    main = ddpm.main
    exits_with_one_line(capsys, main, ['sample', '--ckpt', str(tmp_path / 'shapes.pt'), '--device',
                                       'cpu'], 'the weights do not fit the config at out.weight')
    exits_with_one_line(capsys, main, ['train', '--data', DATA, '--epochs', '2', '--resume',
                                       str(tmp_path / 'no_optimizer.pt')], "it lacks ['optimizer']")
    exits_with_one_line(capsys, main, ['train', '--data', DATA, '--resume',  # for sampling only
                                       str(tmp_path / 'ema_only.pt')],
                        "it lacks ['args', 'model', 'optimizer', 'rng', 'step']")
    exits_with_one_line(capsys, main, ['train', *TINY, '--T', '200', '--schedule', 'linear',
                                       '--beta-end', '0.999', '--out', str(tmp_path / 'b')],
                        'abar must fall step by step')
    # this one hung in the log-SNR step search: in a process of its own, with a timeout
    one_line_error(run('sample', '--ckpt', str(tmp_path / 'schedule.pt'), timeout=60),
                   'abar must fall')


def tiny_run(tmp_path, *flags):
    """A trained tiny run (one epoch): its checkpoint's path."""
    ddpm.main(['train', *TINY, '--epochs', '1', '--out', str(tmp_path / 'run'), *flags])
    return tmp_path / 'run' / 'ckpt.pt'


@slow
def test_a_checkpoint_cannot_make_sample_build_a_huge_model_or_schedule(tmp_path, capsys):
    needs_mnist()
    ckpt = torch.load(tiny_run(tmp_path), weights_only=True)
    huge = dict(ckpt, config=ckpt['config'] | {'widths': (4096,) * 3, 'depth': 8})
    torch.save(huge, tmp_path / 'huge.pt')  # 1 MB of weights for a 3.6G-parameter net
    long = dict(ckpt, config=ckpt['config'] | {'T': 10 ** 9})
    torch.save(long, tmp_path / 'long.pt')
    # a depth of 30,000 took 56 s and 2 GB to build on the meta device before it was refused
    deep = dict(ckpt, config=ckpt['config'] | {'depth': 30_000})
    torch.save(deep, tmp_path / 'deep.pt')
    started = time.time()
    exits_with_one_line(capsys, ddpm.main, ['sample', '--ckpt', str(tmp_path / 'huge.pt')],
                        'the weights do not fit the config at')
    exits_with_one_line(capsys, ddpm.main, ['sample', '--ckpt', str(tmp_path / 'long.pt')],
                        "the config's T 1000000000, depth 2, widths (8, 16) or shape (1, 28, 28) "
                        'is out of range')
    exits_with_one_line(capsys, ddpm.main, ['sample', '--ckpt', str(tmp_path / 'deep.pt')],
                        "the config's T 20, depth 30000, widths (8, 16) or shape (1, 28, 28) "
                        'is out of range')
    assert time.time() - started < 30  # refused before anything of that size was made


@slow
def test_a_checkpoints_data_folder_is_never_created(tmp_path, capsys):
    needs_mnist()
    path = tiny_run(tmp_path)
    ckpt = torch.load(path, weights_only=True)
    assert ckpt['args']['data'] == os.path.abspath(DATA)  # stored absolute
    elsewhere = tmp_path / 'somewhere' / '..' / 'else'
    ckpt['args']['data'], ckpt['args']['epochs'] = str(elsewhere), 2
    torch.save(ckpt, path)
    exits_with_one_line(capsys, ddpm.main, ['train', '--resume', str(path)],
                        f'the run trained on {elsewhere}, which is not here: pass --data')
    assert not (tmp_path / 'somewhere').exists()
    assert not (tmp_path / 'else').exists()
    ddpm.main(['train', '--resume', str(path), '--data', DATA])  # as the message says
    assert ddpm.load_checkpoint(path)['step'] == 8


@slow
def test_a_checkpoints_flags_pass_the_command_lines_checks(tmp_path, capsys):
    # a stranger's limit of -5 trained on all but five digits, without a word
    needs_mnist()
    path = tiny_run(tmp_path)
    cases = [('limit', -5, 'argument --limit: -5 is out of range'),
             ('minutes', math.inf, 'argument --minutes: inf is out of range'),
             ('lr', 1e9, 'argument --lr: 1000000000.0 is out of range'),
             ('widths', (8, 50_000), 'argument --widths: 50000 is out of range')]
    for name, value, message in cases:
        ckpt = torch.load(path, weights_only=True)
        ckpt['args'][name] = value
        torch.save(ckpt, tmp_path / 'hostile.pt')
        exits_with_one_line(capsys, ddpm.main, ['train', '--resume', str(tmp_path / 'hostile.pt'),
                                                '--epochs', '2'], message)


@slow
def test_printed_commands_paste_into_a_shell_as_printed(tmp_path):
    needs_mnist()
    folder = tmp_path / "sp ace's run"
    proc = start('train', *TINY, '--epochs', '10000', '--out', str(folder))
    assert 'training' in proc.stdout.readline()
    time.sleep(2)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    command = err.strip().splitlines()[-1].split('continue: ')[1]
    step = ddpm.load_checkpoint(folder / 'ckpt.pt')['step']
    r = subprocess.run(command + f' --data {DATA} --epochs {step // 4 + 1}', shell=True, cwd=ROOT,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert f'steps {step} to' in r.stdout
    r = run('train', *TINY, '--out', str(folder))
    command = r.stderr.split('continue it with ')[1].split(', or pick')[0]
    assert command == f'--resume {shlex.quote(str(folder / "ckpt.pt"))}'


@slow
def test_a_closed_stdout_stops_neither_training_nor_sampling(tmp_path):
    # `python ddpm.py train ... | head -2` once stopped training with "Broken pipe" at a progress
    # line, before the epoch's checkpoint; `sample ... | head -1` wrote nothing
    needs_mnist()
    commands = [['train', *TINY, '--epochs', '3', '--out', str(tmp_path / 'run')],
                ['sample', '--ckpt', str(tmp_path / 'run' / 'ckpt.pt'), '--n', '20', '--batch', '2',
                 '--npz', str(tmp_path / 's.npz'), '--out', str(tmp_path / 'g.png'), '--device',
                 'cpu']]
    for args in commands:
        proc = subprocess.Popen([sys.executable, str(ROOT / 'ddpm.py'), *args], cwd=ROOT,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        proc.stdout.readline()
        proc.stdout.close()  # as `| head -1` does once it has its line
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err
        assert err == ''
    assert ddpm.load_checkpoint(tmp_path / 'run' / 'ckpt.pt')['step'] == 12
    assert np.load(tmp_path / 's.npz')['samples'].shape == (20, 28, 28)
    assert Image.open(tmp_path / 'g.png').size == (5 * 30 + 2, 4 * 30 + 2)


@slow
def test_outputs_are_written_whole_or_not_at_all(tmp_path, monkeypatch, capsys):
    needs_mnist()
    path = tiny_run(tmp_path)
    npz = tmp_path / 'big.npz'
    ddpm.main(['sample', '--ckpt', str(path), '--n', '4', '--out', '', '--npz', str(npz)])
    before = npz.read_bytes()

    def disk_full(file, **arrays):
        file.write(b'half an npz')
        raise OSError(28, 'No space left on device')
    monkeypatch.setattr(ddpm.np, 'savez_compressed', disk_full)
    exits_with_one_line(capsys, ddpm.main, ['sample', '--ckpt', str(path), '--n', '4', '--out', '',
                                            '--npz', str(npz)], 'No space left on device')
    assert npz.read_bytes() == before  # the old file, whole
    assert [p.name for p in tmp_path.iterdir() if p.suffix == '.tmp'] == []
    monkeypatch.undo()
    # grid types that Pillow registers a writer for, but cannot write without a plugin (.h5) or
    # in color (.xbm): refused before sampling, not after it
    for grid in ('g.h5', 'g.xbm'):
        exits_with_one_line(capsys, ddpm.main, ['sample', '--ckpt', str(path), '--n', '4', '--out',
                                                str(tmp_path / grid), '--npz', str(npz)],
                            'the grid needs a type Pillow writes')
    assert npz.read_bytes() == before


@slow
@pytest.mark.parametrize('script', ['ddpm.py', 'fid.py'])
def test_ctrl_c_during_the_first_imports_is_one_line(script):
    # a SIGINT as the script imports its second module (argparse, before numpy and torch): once a
    # KeyboardInterrupt traceback, as the handler came after the first import line. Deterministic,
    # unlike a signal sent some milliseconds in.
    code = ('import os, runpy, signal, sys\n'
            'class Interrupt:\n'
            '    def find_spec(self, name, path, target=None):\n'
            '        if name == "argparse":\n'
            '            os.kill(os.getpid(), signal.SIGINT)\n'
            'sys.meta_path.insert(0, Interrupt())\n'
            f'sys.argv = [{script!r}, "--help"]\n'
            f'runpy.run_path({str(ROOT / script)!r}, run_name="__main__")\n')
    r = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, timeout=120)
    assert r.returncode != 0
    assert r.stderr.strip() == 'interrupted', r.stderr
    assert r.stdout == ''


@slow
def test_sampling_errors(tmp_path):
    needs_mnist()
    ddpm.main(['train', *TINY, '--epochs', '1', '--out', str(tmp_path)])
    one_line_error(run('sample', '--ckpt', str(tmp_path / 'ckpt.pt'), '--digit', '3'),
                   'trained without --cond')
    one_line_error(run('sample', '--ckpt', str(tmp_path / 'ckpt.pt'), '--sampler', 'ddim',
                       '--steps', '21'), 'steps in 1..20')
    # they were ignored without a word
    for flags in (['--steps', '10'], ['--eta', '0']):
        with pytest.raises(SystemExit, match='^error: sampler ddpm takes all 20 steps at eta 1'):
            ddpm.main(['sample', '--ckpt', str(tmp_path / 'ckpt.pt'), '--sampler', 'ddpm', *flags])


@slow
def test_digit_all_draws_every_digit_its_share_a_column_each(tmp_path, monkeypatch):
    needs_mnist()
    ddpm.main(['train', *TINY, '--epochs', '1', '--out', str(tmp_path), '--cond'])
    drawn, sample = [], ddpm.sample

    def record(model, diffusion, shape, **kwargs):
        drawn.append(kwargs['labels'])
        return sample(model, diffusion, shape, **kwargs)
    monkeypatch.setattr(ddpm, 'sample', record)
    ddpm.main(['sample', '--ckpt', str(tmp_path / 'ckpt.pt'), '--n', '15', '--digit', 'all',
               '--batch', '4', '--device', 'cpu', '--out', str(tmp_path / 'g.png')])
    labels = torch.cat(drawn).tolist()
    assert labels == [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 0, 1, 2, 3, 4]  # every digit, 1 or 2 each
    assert Image.open(tmp_path / 'g.png').size == (10 * 30 + 2, 2 * 30 + 2)  # a column per digit
    # without --batch, the CPU draws 100 at a time (500 spilled out of its caches: 1.4x slower)
    drawn.clear()
    ddpm.main(['sample', '--ckpt', str(tmp_path / 'ckpt.pt'), '--n', '250', '--digit', 'all',
               '--device', 'cpu', '--out', str(tmp_path / 'g.png')])
    assert [len(labels) for labels in drawn] == [100, 100, 50]


@slow
def test_readme_library_snippet_runs_as_pasted(tmp_path):
    readme = (ROOT / 'README.md').read_text()
    snippet = readme.split('```python\n')[1].split('```')[0]
    (tmp_path / 'snippet.py').write_text(snippet)
    r = subprocess.run([sys.executable, str(tmp_path / 'snippet.py')], capture_output=True,
                       text=True, timeout=300, cwd=tmp_path,
                       env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert r.returncode == 0, r.stderr
    # on a GPU, the tensors print their device: tensor(True, device='cuda:0')
    assert r.stdout.startswith('torch.Size([4, 3, 32, 32]) tensor(True'), r.stdout
    assert r.stdout.count('tensor(True') == 2, r.stdout


@slow
def test_import_has_no_side_effects_and_works_without_fcntl(tmp_path):
    for blocked in ([], ['fcntl']):  # Windows has no fcntl
        code = (f'import sys; sys.path.insert(0, {str(ROOT)!r}); '
                f'sys.modules.update(dict.fromkeys({blocked!r})); '
                f'import ddpm, fid; assert (ddpm.fcntl is None) == {bool(blocked)}')
        r = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True,
                           cwd=tmp_path, timeout=60)
        assert r.returncode == 0, r.stderr
        assert r.stdout == ''
        assert r.stderr == ''
        assert list(tmp_path.iterdir()) == []


@slow
def test_training_without_fcntl_still_works(tmp_path, monkeypatch):
    needs_mnist()
    monkeypatch.setattr(ddpm, 'fcntl', None)
    ddpm.main(['train', *TINY, '--epochs', '1', '--out', str(tmp_path)])
    assert ddpm.load_checkpoint(tmp_path / 'ckpt.pt')['step'] == 4

# --- never lose a run, round 4: outputs, refusals, hostile files, signals, the library's edges ---


def never_sample(*args, **kwargs):
    pytest.fail('sampled before refusing')


@slow
def test_an_output_name_too_long_for_its_temporary_twin_is_refused_before_sampling(
        tmp_path, monkeypatch, capsys):
    # a 250-byte name passed the check, then NAME.PID.tmp (over 255 bytes) failed after all the work
    needs_mnist()
    path = tiny_run(tmp_path)
    monkeypatch.setattr(ddpm, 'sample', never_sample)
    for flag in ('--npz', '--out'):
        name = str(tmp_path / ('n' * 246 + ('.npz' if flag == '--npz' else '.png')))
        args = ['sample', '--ckpt', str(path), '--out', '', '--npz', 's.npz', flag, name]
        exits_with_one_line(capsys, ddpm.main, args, 'File name too long')
    assert sorted(p.name for p in tmp_path.iterdir()) == ['run']


@slow
def test_outputs_never_replace_an_input_a_device_or_each_other(tmp_path, monkeypatch, capsys):
    needs_mnist()
    path = tiny_run(tmp_path)
    before = path.read_bytes()
    os.mkfifo(tmp_path / 'pipe')
    # a stand-in for /dev/null: as root, `--npz /dev/null` replaced the system's with a file
    (tmp_path / 'null').symlink_to('/dev/null')
    png = str(tmp_path / 'g.png')
    cases = [(['--npz', str(path)], f'--npz {path} is also --ckpt'),
             (['--npz', str(tmp_path / 'run' / '..' / 'run' / 'ckpt.pt')], 'is also --ckpt'),
             (['--npz', png, '--out', png], f'--out {png} is also --npz'),
             (['--npz', str(tmp_path / 'pipe')], 'is a folder or a device'),
             (['--npz', str(tmp_path / 'null')], 'is a folder or a device'),
             (['--npz', str(tmp_path)], 'is a folder or a device')]
    monkeypatch.setattr(ddpm, 'sample', never_sample)
    for flags, message in cases:
        args = ['sample', '--ckpt', str(path), '--out', '', *flags]
        exits_with_one_line(capsys, ddpm.main, args, message)
    assert path.read_bytes() == before
    assert (tmp_path / 'null').resolve() == Path('/dev/null')
    assert (tmp_path / 'pipe').is_fifo()
    assert not Path(png).exists()


@slow
def test_refused_trains_make_no_folder(tmp_path, capsys):
    # six levels need 32-pixel images: the refusal came at the first step, after the run's folder
    # and an empty log.csv were made
    needs_mnist()
    out = tmp_path / 'o'
    args = ['train', *TINY[:-4], '--widths', '8,8,8,8,8,8', '--device', 'cpu', '--out', str(out)]
    exits_with_one_line(capsys, ddpm.main, args,
                        '6 U-Net levels need images of 32 px or more: these are 28x28')
    assert not out.exists()


@slow
def test_any_seed_from_0_to_2_63_trains_and_samples(tmp_path):
    # seed * 100,003 overflowed the shuffle generator's 64 bits: "Overflow when unpacking long long"
    needs_mnist()
    seed = str(2**63 - 1)
    ddpm.main(['train', *TINY, '--epochs', '1', '--seed', seed, '--out', str(tmp_path)])
    ddpm.main(['sample', '--ckpt', str(tmp_path / 'ckpt.pt'), '--n', '2', '--seed', seed,
               '--out', '', '--npz', str(tmp_path / 's.npz'), '--device', 'cpu'])
    assert np.load(tmp_path / 's.npz')['samples'].shape == (2, 28, 28)


@slow
def test_loading_mnist_makes_no_folder_that_it_leaves_behind(tmp_path, monkeypatch, capsys):
    needs_mnist()
    monkeypatch.setenv('no_proxy', '*')
    monkeypatch.setenv('https_proxy', 'http://127.0.0.1:9')  # no download: fail at once
    here = tmp_path / 'here'
    here.mkdir()
    for folder in (tmp_path / 'nowhere', here):
        exits_with_one_line(capsys, ddpm.main, ['train', '--data', str(folder), '--out',
                                                str(tmp_path / 'o')], 'cannot load MNIST from')
        exits_with_one_line(capsys, fid.main, ['floor', '--data', str(folder)],
                            'cannot load MNIST from')
    assert sorted(p.name for p in tmp_path.iterdir()) == ['here']
    assert list(here.iterdir()) == []
    # an empty DDPM_DATA is no folder: not ./, where MNIST/raw was made
    monkeypatch.setenv('DDPM_DATA', '')
    assert ddpm.build_parser()[0].parse_args(['train']).data == './data'
    # a folder holding a run is refused for that, not for the data it would have loaded first
    path = tiny_run(tmp_path)
    monkeypatch.chdir(here)
    exits_with_one_line(capsys, ddpm.main, ['train', '--out', str(path.parent)],
                        'holds another run')
    # a checkpoint's data folder that holds no MNIST gets none made inside it
    ckpt = torch.load(path, weights_only=True)
    ckpt['args']['data'], ckpt['args']['epochs'] = str(here), 2
    torch.save(ckpt, path)
    exits_with_one_line(capsys, ddpm.main, ['train', '--resume', str(path)],
                        f'the run trained on {here}, which is not here: pass --data')
    assert list(here.iterdir()) == []


@slow
def test_printed_commands_read_a_leading_dash_as_a_path_and_are_never_cut(
        tmp_path, monkeypatch, capsys):
    needs_mnist()
    monkeypatch.chdir(tmp_path)
    ddpm.main(['train', *TINY, '--epochs', '1', '--out=-r'])
    exits_with_one_line(capsys, ddpm.main, ['train', *TINY, '--out=-r'],
                        'continue it with --resume ./-r/ckpt.pt, or pick another --out')
    # as printed, it resumes the run (argparse read --resume -r/ckpt.pt as two flags)
    capsys.readouterr()
    ddpm.main(['train', '--data', DATA, '--epochs', '2', '--resume', './-r/ckpt.pt'])
    assert 'steps 4 to 8' in capsys.readouterr().out
    # a long folder's message was cut at 300 characters, in the middle of its path
    deep = tmp_path / ('d' * 200) / ('e' * 200)
    ddpm.main(['train', *TINY, '--epochs', '1', '--out', str(deep)])
    exits_with_one_line(capsys, ddpm.main, ['train', *TINY, '--out', str(deep)],
                        f'--resume {deep / "ckpt.pt"}, or pick another --out')


@slow
def test_hostile_checkpoints_are_refused_before_any_work(tmp_path, capsys):
    needs_mnist()
    path = tiny_run(tmp_path)
    # booleans and None skipped argparse: ema True trained with decay 1.0
    for name, value in (('ema', True), ('epochs', None), ('cond', 'yes')):
        ckpt = torch.load(path, weights_only=True)
        ckpt['args'][name] = value
        torch.save(ckpt, tmp_path / 'hostile.pt')
        exits_with_one_line(capsys, ddpm.main, ['train', '--resume', str(tmp_path / 'hostile.pt'),
                                                '--epochs', '2', '--out', str(tmp_path / 'o')],
                            f'its {name} cannot be {value!r}')
    # NaN weights drew black digits and exited 0; resumed, they hinted at a lower --lr
    for part, command in (('ema', 'sample'), ('model', 'train')):
        ckpt = torch.load(path, weights_only=True)
        ckpt[part]['out.bias'][0] = math.nan
        torch.save(ckpt, tmp_path / 'nan.pt')
        flag = '--ckpt' if command == 'sample' else '--resume'
        exits_with_one_line(capsys, ddpm.main, [command, flag, str(tmp_path / 'nan.pt'), '--out',
                                                str(tmp_path / 'o.png')],
                            f'holds NaN or infinite weights ({part} out.bias)')
    assert sorted(p.name for p in tmp_path.iterdir()) == ['hostile.pt', 'nan.pt', 'run']


@slow
@pytest.mark.parametrize('script', ['ddpm.py', 'fid.py'])
def test_ctrl_c_as_the_interpreter_exits_prints_nothing(script):
    # a second Ctrl-C during exit printed "Exception ignored in atexit callback ... SystemExit"
    code = ('import atexit, os, runpy, signal, sys, time\n'
            'atexit.register(lambda: (os.kill(os.getpid(), signal.SIGINT), time.sleep(0.5)))\n'
            f'sys.argv = [{script!r}, "--help"]\n'
            f'runpy.run_path({str(ROOT / script)!r}, run_name="__main__")\n')
    r = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stderr == ''
    assert 'usage' in r.stdout


@slow
def test_a_stop_signal_as_training_starts_saves_the_run(tmp_path):
    # the handlers came after the "training on" line (on CUDA, after the graphs' capture)
    needs_mnist()
    proc = start('train', *TINY, '--epochs', '10000', '--out', str(tmp_path))
    assert 'training' in proc.stdout.readline()
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert 'SIGTERM at step' in err, err
    assert ddpm.load_checkpoint(tmp_path / 'ckpt.pt', ddpm.RESUME_PARTS)['step'] >= 0


def test_the_library_refuses_what_it_cannot_do_when_called():
    with pytest.raises(ValueError, match=r'widths needs two or more levels, got \(8,\)'):
        ddpm.ScoreNet(widths=(8,))  # it built, then failed in forward on a channel mismatch
    with pytest.raises(ValueError, match='T 0, .*use T >= 1'):
        ddpm.Diffusion(T=0)  # it built, then failed inside loss
    d, model = ddpm.Diffusion(T=20), ddpm.ScoreNet(widths=(8, 16))
    for eta in (-0.5, 1.5):  # returned NaN images
        with pytest.raises(ValueError, match=f'eta must be in \\[0, 1\\].*got {eta}'):
            ddpm.sample(model, d, (1, 1, 8, 8), eta=eta)
    with pytest.raises(ValueError, match='sampler ddpm takes all 20 steps at eta 1'):
        ddpm.sample(model, d, (1, 1, 8, 8), sampler='ddpm', eta=0.0)  # it ran at eta 1
    with pytest.raises(ValueError, match="unknown sampler 'euler'"):
        ddpm.sample(model, d, (1, 1, 8, 8), sampler='euler')


def test_a_float64_model_trains_and_samples_in_float64():
    # it trained, but sample() failed: its noise was float32
    torch.manual_seed(0)
    d, model = ddpm.Diffusion(T=20), ddpm.ScoreNet(widths=(8, 16)).double()
    x0 = torch.rand(4, 1, 8, 8, dtype=torch.float64) * 2 - 1
    assert d.loss(model, x0).dtype == torch.float64
    assert ddpm.sample(model, d, (2, 1, 8, 8), steps=3).dtype == torch.float64


# --- fid.py ---------------------------------------------------------------------------------------


def sqrt_psd(m):
    """The square root of a symmetric positive semi-definite matrix, by eigendecomposition."""
    w, v = np.linalg.eigh(m)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def independent_frechet_trace(s1, s2):
    """Tr((S1 S2)^1/2) = Tr((S1^1/2 S2 S1^1/2)^1/2), a symmetric form."""
    root = sqrt_psd(s1)
    return np.trace(sqrt_psd(root @ s2 @ root))


def independent_frechet(mu1, s1, mu2, s2):
    trace = np.trace(s1) + np.trace(s2) - 2 * independent_frechet_trace(s1, s2)
    return float(((mu1 - mu2) ** 2).sum() + trace)


def test_frechet_distance_of_non_commuting_covariances():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(400, 6)), rng.normal(size=(400, 6)) @ rng.normal(size=(6, 6)) + 1
    stats_a, stats_b = (a.mean(0), np.cov(a, rowvar=False)), (b.mean(0), np.cov(b, rowvar=False))
    assert not np.allclose(stats_a[1] @ stats_b[1], stats_b[1] @ stats_a[1])  # they do not commute
    expected = independent_frechet(*stats_a, *stats_b)
    assert abs(fid.frechet_distance(*stats_a, *stats_b) - expected) < 1e-6 * expected
    assert abs(fid.frechet_distance(*stats_b, *stats_a) - expected) < 1e-6 * expected
    assert abs(fid.frechet_distance(*stats_a, *stats_a)) < 1e-6


def test_frechet_distance_retries_a_singular_product_with_an_offset(monkeypatch):
    rng = np.random.default_rng(1)
    s1 = np.cov(rng.normal(size=(50, 4)), rowvar=False)
    s2 = np.cov(rng.normal(size=(50, 4)), rowvar=False)
    mu1, mu2 = rng.normal(size=4), rng.normal(size=4)
    calls, sqrtm = [], linalg.sqrtm

    def failing_once(m):
        calls.append(m)
        return np.full_like(m, np.inf) if len(calls) == 1 else sqrtm(m)
    monkeypatch.setattr(fid.linalg, 'sqrtm', failing_once)
    got = fid.frechet_distance(mu1, s1, mu2, s2, eps=1e-3)
    offset = np.eye(4) * 1e-3  # the retry nudges both covariances off singularity
    assert len(calls) == 2
    assert np.allclose(calls[1], (s1 + offset) @ (s2 + offset))
    root_trace = independent_frechet_trace(s1 + offset, s2 + offset)
    want = ((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2) - 2 * root_trace
    assert abs(got - want) < 1e-8


@slow
def test_mnist_feature_net_is_accurate():
    needs_mnist()
    assert fid.accuracy(fid.Extractor('mnist').net, DATA) >= 0.99


@slow
def test_mnist_fid_is_zero_on_itself_and_grows_with_noise():
    needs_mnist()
    extractor, (images, _) = fid.Extractor('mnist'), fid.load_mnist(DATA, train=False)
    images = images[:2000]
    stats = fid.statistics(extractor(images))
    assert abs(fid.frechet_distance(*stats, *stats)) < 1e-6
    rng, scores = np.random.default_rng(0), []
    for noise in (10, 40, 80):
        noisy = np.clip(images + rng.normal(0, noise, images.shape), 0, 255).astype(np.uint8)
        scores.append(fid.frechet_distance(*stats, *fid.statistics(extractor(noisy))))
    assert 0 < scores[0] < scores[1] < scores[2], scores


class Recorder(torch.nn.Module):
    """A stand-in for the Inception network: records its input; an image's feature is its mean."""
    def __init__(self):
        super().__init__()
        self.inputs = []

    def forward(self, x):
        self.inputs.append(x)
        return x.mean((2, 3))


def stub_extractor(kind='inception'):
    extractor = object.__new__(fid.Extractor)
    extractor.kind, extractor.batch = kind, 200
    extractor.net, extractor.weights = Recorder(), 'stub'
    return extractor


@pytest.mark.parametrize('channels', [None, 1, 3, 4])
def test_inception_input_is_pytorch_fids_preprocessing(channels):
    rng = np.random.default_rng(0)
    shape = (5, 28, 28) if channels is None else (5, 28, 28, channels)
    images = rng.integers(0, 256, shape, dtype=np.uint8)
    images[0] = 255  # the range ends at 255 / 128 - 1
    extractor = stub_extractor()
    extractor(images)
    x = extractor.net.inputs[0]
    assert x.shape == (5, 3, 299, 299)
    rgb = torch.as_tensor(images).float()
    rgb = rgb[:, None].repeat(1, 3, 1, 1) if rgb.dim() == 3 else rgb[..., :3].permute(0, 3, 1, 2)
    if channels == 1:
        rgb = rgb[:, :1].repeat(1, 3, 1, 1)
    resize = torch.nn.functional.interpolate
    want = resize(rgb, size=(299, 299), mode='bilinear', align_corners=False) / 128 - 1
    torch.testing.assert_close(x, want)
    assert x.max().item() == pytest.approx(255 / 128 - 1)
    assert x.min().item() >= -1
    corners = resize(rgb, size=(299, 299), mode='bilinear', align_corners=True) / 128 - 1
    assert not torch.allclose(x, corners)  # align_corners=False, as pytorch-fid


@slow
def test_inception_features_separate_real_from_noise():
    try:
        extractor = fid.Extractor('inception', batch=50)
    except fid.FIDError:
        assert not os.environ.get('CI'), 'CI must provide the Inception weights (see .ci/run)'
        pytest.skip('Inception weights not available here')
    needs_mnist()
    images = fid.load_mnist(DATA, train=False)[0]
    a, b = extractor(images[:40]), extractor(images[40:80])
    noise = extractor(np.random.default_rng(0).integers(0, 256, (40, 28, 28), dtype=np.uint8))
    assert a.shape == (40, 2048)
    real = fid.frechet_distance(*fid.statistics(a), *fid.statistics(b))
    fake = fid.frechet_distance(*fid.statistics(a), *fid.statistics(noise))
    assert real < fake / 3, (real, fake)


class FakeExtractor:
    """What reference_stats needs of an extractor: a kind, the short hash of its weights, and
    features of images."""
    kind, weights = 'mnist', 'w1'

    def __call__(self, images):
        return images


def test_reference_statistics_are_cached_by_what_they_depend_on(tmp_path, monkeypatch):
    needs_mnist()
    monkeypatch.setenv('FID_CACHE', str(tmp_path / 'cache'))
    zeros = np.zeros((30, 28, 28), np.uint8)
    monkeypatch.setattr(fid, 'load_mnist', lambda root, train: (zeros, None))
    computed = []

    def count(features):
        computed.append(1)
        return np.ones(3), np.eye(3)
    monkeypatch.setattr(fid, 'statistics', count)
    extractor = FakeExtractor()
    fid.reference_stats(extractor, DATA, n=20)
    fid.reference_stats(extractor, DATA, n=20)
    assert len(computed) == 1  # a hit is reused
    for change in ({'kind': 'inception'}, {'weights': 'other'}, {}):
        for key, value in change.items():
            setattr(extractor, key, value)
        fid.reference_stats(extractor, DATA, n=20 if change else 10)
    monkeypatch.setattr(fid, 'FEATURES_VERSION', 'v9')
    fid.reference_stats(extractor, DATA, n=10)
    # the extractor, its weights, n and the feature version each make a new entry
    assert len(computed) == 5
    entry = next((tmp_path / 'cache').glob('*-v9-*'))
    entry.write_bytes(b'damaged')
    fid.reference_stats(extractor, DATA, n=10)  # a damaged entry is rebuilt, not fatal
    assert len(computed) == 6
    assert np.load(entry)['mu'].shape == (3,)
    monkeypatch.setenv('FID_CACHE', str(tmp_path / 'file' / 'cache'))
    # a cache folder that cannot be made: computed, a warning, no error
    (tmp_path / 'file').write_bytes(b'')
    assert fid.reference_stats(extractor, DATA, n=10)[0].shape == (3,)


@slow
def test_fid_cli_bad_inputs(tmp_path, monkeypatch, capsys):

    def zeros(*shape, dtype=np.uint8):
        return np.zeros(shape, dtype)

    np.savez(tmp_path / 'float.npz', samples=zeros(100, 28, 28, dtype=np.float32))
    np.savez(tmp_path / 'few.npz', samples=zeros(99, 28, 28))  # in the sweep: N=2-4 gave a number
    np.savez(tmp_path / 'shape.npz', samples=zeros(100, 28))
    np.savez(tmp_path / 'two.npz', samples=zeros(100, 28, 28, 2))
    np.savez(tmp_path / 'ok.npz', samples=zeros(100, 28, 28))
    # without `samples`, the first array was scored: here all-zero labels, beside the images
    np.savez(tmp_path / 'unnamed.npz', labels=zeros(100), images=zeros(100, 28, 28))
    os.mkfifo(tmp_path / 'pipe.npz')  # np.load would block on it forever
    (tmp_path / 'weights.pt').write_bytes(b'not TorchScript')
    ok, weights, nowhere = (str(tmp_path / name) for name in ('ok.npz', 'weights.pt', 'nowhere.pt'))

    def npz(name):
        return [str(tmp_path / f'{name}.npz')]

    cases = [(npz('missing'), 'is not a file of samples'), (npz('float'), 'expected uint8'),
             (npz('few'), 'FID needs 100 samples or more to mean anything, got 99'),
             (npz('shape'), 'expected uint8'), (npz('two'), 'expected uint8'),
             ([ok, '--n', 'x'], "argument --n: invalid int value: 'x'"),
             ([ok, '--n', '3'], '--n must be at least 100, got 3'),
             ([ok, '--n', '101'], f'--n 101, but {ok} holds 100 samples'),  # it scored 100
             (npz('unnamed'), "holds no array named samples, and more than one: ['labels', "),
             (npz('pipe'), 'is not a file of samples'),
             ([str(tmp_path)], 'is not a file of samples'),
             ([ok, '--features', 'inception', '--inception', weights],
              'cannot load the inception weights'),
             ([ok, '--features', 'inception', '--inception', nowhere],
              f'--inception {nowhere} not found')]
    monkeypatch.setenv('FID_CACHE', str(tmp_path))
    for args, message in cases:
        exits_with_one_line(capsys, fid.main, [*args, '--data', DATA], message)
    monkeypatch.setenv('FID_INCEPTION', nowhere)
    exits_with_one_line(capsys, fid.main, [ok, '--features', 'inception'],
                        f'FID_INCEPTION {nowhere} not found')
    for args, message in cases[:1] + cases[5:6]:  # and so in a process of its own, as users run it
        one_line_error(run(*args, timeout=120, script='fid.py'), message)


@slow
def test_fid_scores_the_only_array_of_an_npz_and_warns_below_the_feature_dimension(
        tmp_path, monkeypatch):
    needs_mnist()
    digits = fid.load_mnist(DATA, train=False)[0][:120]
    np.savez(tmp_path / 'only.npz', digits=digits)
    np.savez(tmp_path / 'named.npz', labels=np.zeros(120, np.uint8), samples=digits)
    monkeypatch.setenv('FID_CACHE', str(tmp_path))
    for name in ('only', 'named'):
        r = run(str(tmp_path / f'{name}.npz'), '--data', DATA, '--json', script='fid.py',
                env=dict(os.environ, FID_CACHE=str(tmp_path)))
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout)['n'] == 120
        assert 'warning: 120 samples, fewer than the 128 features' in r.stderr


def test_fid_reports_damaged_mnist_weights_in_one_line(tmp_path, monkeypatch):
    # a truncated copy
    (tmp_path / 'fid_mnist.pt').write_bytes(fid.MNIST_WEIGHTS.read_bytes()[:1000])
    monkeypatch.setattr(fid, 'MNIST_WEIGHTS', tmp_path / 'fid_mnist.pt')
    with pytest.raises(fid.FIDError, match='cannot load the mnist weights'):
        fid.Extractor('mnist')


@slow
def test_fid_cli_scores_samples(tmp_path):
    needs_mnist()
    train = fid.load_mnist(DATA, train=True)[0]
    # the file's order is not random
    images = train[np.random.default_rng(1).permutation(len(train))[:2000]]
    np.savez(tmp_path / 's.npz', samples=images[..., None])  # (N, H, W, 1) reads as gray
    r = run(str(tmp_path / 's.npz'), '--data', DATA, '--json', script='fid.py',
            env=dict(os.environ, FID_CACHE=str(tmp_path)))
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    # real digits score near the floor: 10-16 over five random subsets of 2000 (15-22 at 1000, 4-5
    # at 10000)
    assert report['n'] == 2000
    assert report['weights'] == fid.sha256(fid.MNIST_WEIGHTS)[:12]
    assert 0 < report['fid'] < 25
    assert list(tmp_path.glob('mnist-test-mnist-*-10000.npz'))  # reference statistics cached, keyed
