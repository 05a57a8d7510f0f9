"""The recipe search's candidates (RESULTS.md), as patches on ddpm.py chosen by environment variables:

    DDPM_N0=1 DDPM_EMAS=0.998,0.9995,0.9998 python .ci/experiment.py train --epochs 60 --out ~/runs/N60c
    DDPM_N0=1 python .ci/experiment.py sample --ckpt ~/runs/N60c/ema_0.9995.pt --n 10000 --npz s.npz --out ''
    python .ci/experiment.py export ~/runs/N60c/ckpt.pt 0.9995 ~/runs/N60c/ema_0.9995.pt
    python .ci/experiment.py export ~/runs/N60c/ckpt.pt model ~/runs/N60c/raw.pt  # no EMA

Otherwise it runs ddpm.py's command line unchanged. The candidates:

- DDPM_N0=1: the first down block without its GroupNorm (h = SiLU(conv(x) + time)), so that the net sees each
  image's mean level, which GroupNorm removes. Sampling such a run needs DDPM_N0=1 too.
- DDPM_EMAS=d1,d2,...: more EMAs of the weights beside the run's own, per-step decays, saved beside the
  checkpoint as OUT/emas.pt at every save; `export` makes a sampling checkpoint of one of them.
- DDPM_TDIST=edm: training steps drawn as in EDM (Karras et al. 2022): ln(sigma) ~ N(-1.2, 1.2^2), sigma =
  sqrt((1 - abar) / abar), mapped to the step of the nearest log-SNR.
- DDPM_BETA2=0.99: Adam's beta2.
- DDPM_EPS_SCALE=1.005 (sampling): epsilon scaling (Ning et al. 2024): the predicted noise divided by
  this at every step, x0 recomputed from it, against the exposure bias (the net's inputs at sampling
  drift from the training's q(x_t | x0)). Noise draws unchanged, so a seed pairs it with the default.
- DDPM_LAM_TOP=-3 (sampling): the first step goes from T straight to the step whose lam = ln(alpha / sigma)
  is nearest -3, and the rest are even in lam from there, instead of from T's -8.3: the steps at noise
  where x0's estimate is still the mean digit go to the middle.
- DDPM_SKIP_T=1 (sampling): start at step T - 1 from pure noise, without the net's estimate at T (noise
  times 4,000 there); the same number of steps, placed as for one more and the first dropped.
- DDPM_SOLVER=3m (sampling, dpm++ unconditional): DPM-Solver++(3M) SDE, k-diffusion's sample_dpmpp_3m_sde
  in VP form: the exact step for x0 held constant, plus corrections from the first and second differences
  of the last three x0 estimates in lam. Same noise draws as the default's 2M, so a seed pairs them exactly.
- DDPM_BROWNIAN=1 (sampling, dpm++ unconditional): one noise path per sample on the finest grid, every step
  of T, shared by every step count: a coarse step's noise is the exact sum of the fine steps' within it
  (each fine step's noise decayed as the SDE decays it to the coarse step's end). So a seed pairs 50, 100
  and 200 steps on one path, and their FIDs differ by the discretization alone. At steps = T it draws what
  the default sampler draws (x_T, then one noise per step, in the generator's order).

It lives beside the CI script to keep the top level as the design card has it; CI does not run it.
"""
import copy
import math
import os
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import ddpm  # noqa: E402
from export import write_sampling_checkpoint  # noqa: E402


def first_block_without_norm():
    init = ddpm.ScoreNet.__init__

    def patched(self, *args, **kwargs):
        init(self, *args, **kwargs)
        self.down[0].norm = nn.Identity()
    ddpm.ScoreNet.__init__ = patched


def extra_emas(decays):
    """Keep an EMA per decay in `emas`, updated after the run's own, saved with each checkpoint."""
    emas, run = {}, {}
    ema_update, write_atomic, open_run = ddpm.ema_update, ddpm.write_atomic, ddpm.open_run

    def patched_open_run(out):
        run['side'] = Path(out) / 'emas.pt'
        return open_run(out)

    def patched_ema_update(ema, model, step, decay):
        ema_update(ema, model, step, decay)
        if not emas:
            saved = torch.load(run['side'], weights_only=True) if step > 0 else None
            if saved is not None and saved['step'] != step:
                sys.exit(f"{run['side']} is at step {saved['step']}, the run at {step}")
            for d in decays:
                emas[d] = copy.deepcopy(ema)
                if saved is not None:
                    emas[d].load_state_dict(saved['emas'][d])
        for d, extra in emas.items():
            ema_update(extra, model, step, d)
        run['step'] = step + 1

    def patched_write_atomic(path, write):
        write_atomic(path, write)
        if Path(path).name == 'ckpt.pt' and emas:
            state = {'step': run['step'], 'emas': {d: m.state_dict() for d, m in emas.items()}}
            write_atomic(run['side'], lambda f: torch.save(state, f))

    ddpm.open_run, ddpm.ema_update, ddpm.write_atomic = (
        patched_open_run, patched_ema_update, patched_write_atomic)


def edm_steps():
    loss = ddpm.Diffusion.loss

    def patched(self, model, x0, labels=None, *, t=None, noise=None, weight_max=5.0):
        if t is None:
            log_sigma = -1.2 + 1.2 * torch.randn(len(x0), device=x0.device)
            # lam is half the log-SNR: ln sigma = -lam
            distance = (log_sigma[:, None] + self.lam[None, 1:].to(x0.device)).abs()
            t = distance.argmin(dim=1) + 1
        return loss(self, model, x0, labels, t=t, noise=noise, weight_max=weight_max)
    ddpm.Diffusion.loss = patched


def adam_beta2(beta2):
    adam = torch.optim.Adam

    def patched(params, **kwargs):
        return adam(params, betas=(0.9, beta2), **kwargs)
    ddpm.torch.optim.Adam = patched


def scaled_eps(scale):
    """Epsilon scaling (Ning et al. 2024, "Elucidating the exposure bias in diffusion models"): the
    sampler sees the predicted noise divided by `scale`, and x0 recomputed from it, at every step."""
    predict = ddpm.Diffusion.predict

    def patched(self, model, x, t, labels=None, **kwargs):
        eps, _ = predict(self, model, x, t, labels, **kwargs)
        eps = eps / scale
        abar = self.abar_at(torch.full((len(x),), t, device=x.device), x)
        return eps, (x - (1 - abar).sqrt() * eps) / abar.sqrt()
    ddpm.Diffusion.predict = patched


def sampling_steps_from(lam_top):
    def patched(diffusion, steps):
        lam = diffusion.lam.double().numpy()
        T = diffusion.T
        for m in range(steps - 1, 100 * T):
            targets = np.linspace(lam_top, lam[1], m)
            ts = np.unique(np.interp(targets, lam[:0:-1], np.arange(T, 0, -1)).round())
            ts = ts[ts < T]
            if len(ts) >= steps - 1:
                return [T] + ts[::-1].astype(int).tolist() + [0]
        raise ValueError(f'cannot place {steps} steps')
    ddpm.sampling_steps = patched


def sampling_without_step_T():
    steps_of = ddpm.sampling_steps

    def patched(diffusion, steps):
        # x_(T-1) is noise to 1e-4 (abar is 6e-5 there on the cosine schedule at T=200)
        return steps_of(diffusion, steps + 1)[1:]
    ddpm.sampling_steps = patched


def dpmpp_start(patch, model, diffusion, shape, sampler, steps, eta, labels, generator):
    """What an experimental dpm++ sampler starts from, as ddpm.sample does: its eta, the steps
    placed, the model's device and dtype, and x_T."""
    sampler, steps, eta = ddpm.sampler_settings(diffusion, sampler, steps, eta)
    if sampler != 'dpm++' or labels is not None:
        sys.exit(f'{patch}: dpm++ without labels only')
    parameter = next(model.parameters())
    device, dtype = parameter.device, parameter.dtype
    x = torch.randn(shape, generator=generator, device=device, dtype=dtype)
    return eta, ddpm.sampling_steps(diffusion, steps), device, dtype, x


@torch.no_grad()
def sample_3m(model, diffusion, shape, *, sampler='dpm++', steps=None, eta=1.0, labels=None,
              guidance=1.0, guidance_sigmas=(0.28, 2.0), generator=None):
    d = diffusion
    eta, ts, device, dtype, x = dpmpp_start('DDPM_SOLVER=3m', model, d, shape, sampler, steps, eta,
                                            labels, generator)
    lam = d.lam.double()
    x0s, hs = [], []  # the last x0 estimates and step sizes in lam, newest first
    for t, s in zip(ts[:-1], ts[1:]):
        _, x0 = d.predict(model, x, t)
        if s == 0:
            x = x0
            break
        h = float(lam[s] - lam[t])
        h_eta = h * (1 + eta)
        sigma_s, sigma_t = (1 - d.abar[s]).sqrt(), (1 - d.abar[t]).sqrt()
        x = sigma_s / sigma_t * math.exp(-eta * h) * x - d.abar[s].sqrt() * math.expm1(-h_eta) * x0
        phi_2 = math.expm1(-h_eta) / h_eta + 1
        if len(x0s) >= 2:
            r0, r1 = hs[0] / h, hs[1] / h
            d1_0 = (x0 - x0s[0]) / r0
            d1_1 = (x0s[0] - x0s[1]) / r1
            d1 = d1_0 + (d1_0 - d1_1) * r0 / (r0 + r1)
            d2 = (d1_0 - d1_1) / (r0 + r1)
            phi_3 = phi_2 / h_eta - 0.5
            x = x + d.abar[s].sqrt() * (phi_2 * d1 - phi_3 * d2)
        elif len(x0s) == 1:
            x = x + d.abar[s].sqrt() * phi_2 * (x0 - x0s[0]) / (hs[0] / h)
        if eta:
            noise = torch.randn(shape, generator=generator, device=device, dtype=dtype)
            x = x + sigma_s * math.sqrt(-math.expm1(-2 * eta * h)) * noise
        x0s, hs = [x0] + x0s[:1], [h] + hs[:1]
    return x.clamp(-1, 1)


@torch.no_grad()
def sample_brownian(model, diffusion, shape, *, sampler='dpm++', steps=None, eta=1.0, labels=None,
                    guidance=1.0, guidance_sigmas=(0.28, 2.0), generator=None):
    """ddpm.sample's dpm++ (unconditional), its noise taken from one path on the finest grid."""
    d = diffusion
    eta, ts, device, dtype, x = dpmpp_start('DDPM_BROWNIAN=1', model, d, shape, sampler, steps, eta,
                                            labels, generator)
    lam, lam64 = d.lam, d.lam.double()
    # path[T - k]: the unit noise of the fine step k -> k - 1, for k = T..2 (the step to 0 has none)
    path = torch.randn((d.T - 1, *shape), generator=generator, device=device, dtype=dtype)
    x0_prev = None
    for i, (t, s) in enumerate(zip(ts[:-1], ts[1:])):
        eps, x0 = d.predict(model, x, t)
        if s == 0:
            x = x0
        else:
            # ddpm.sample's dpm++ step, line for line, so that at steps = T it draws the same samples
            h = lam[s] - lam[t]
            D = x0
            if x0_prev is not None:
                D = x0 + (x0 - x0_prev) * h / (2 * (lam[t] - lam[ts[i - 1]]))
            sigma_s, sigma_t = (1 - d.abar[s]).sqrt(), (1 - d.abar[t]).sqrt()
            x = sigma_s / sigma_t * (-eta * h).exp() * x
            x = x - d.abar[s].sqrt() * (-(1 + eta) * h).expm1() * D
            if eta:
                # the fine steps' noises, each decayed to s as the SDE decays it, in unit variance
                noise = torch.zeros_like(x)
                total = (-torch.expm1(-2 * eta * (lam64[s] - lam64[t]))).sqrt()
                for k in range(t, s, -1):
                    decay = torch.exp(-eta * (lam64[s] - lam64[k - 1]))
                    scale = decay * (-torch.expm1(-2 * eta * (lam64[k - 1] - lam64[k]))).sqrt()
                    noise += float(scale / total) * path[d.T - k]
                x = x + sigma_s * (-torch.expm1(-2 * eta * h)).sqrt() * noise
        x0_prev = x0
    return x.clamp(-1, 1)


def export_ema(source, decay, target):
    """A sampling checkpoint of one EMA of a run: 'main' (the run's own), a decay in OUT/emas.pt,
    or 'model': the trained weights themselves, no EMA."""
    ckpt = ddpm.load_checkpoint(source, ddpm.RESUME_PARTS)
    if decay == 'model':
        ckpt['ema'] = ckpt['model']
        ckpt['args']['ema'] = 0.0
    elif decay != 'main':
        saved = torch.load(Path(source).with_name('emas.pt'), weights_only=True)
        if saved['step'] != ckpt['step']:
            sys.exit(f"emas.pt is at step {saved['step']}, {source} at {ckpt['step']}")
        ckpt['ema'] = saved['emas'][float(decay)]
        ckpt['args']['ema'] = float(decay)
    write_sampling_checkpoint(ckpt, target)


if __name__ == '__main__':
    if os.environ.get('DDPM_N0') == '1':
        first_block_without_norm()
    if os.environ.get('DDPM_EMAS'):
        extra_emas([float(d) for d in os.environ['DDPM_EMAS'].split(',')])
    if os.environ.get('DDPM_TDIST') == 'edm':
        edm_steps()
    if os.environ.get('DDPM_BETA2'):
        adam_beta2(float(os.environ['DDPM_BETA2']))
    if os.environ.get('DDPM_EPS_SCALE'):
        scaled_eps(float(os.environ['DDPM_EPS_SCALE']))
    if os.environ.get('DDPM_LAM_TOP'):
        sampling_steps_from(float(os.environ['DDPM_LAM_TOP']))
    if os.environ.get('DDPM_SKIP_T') == '1':
        sampling_without_step_T()
    if os.environ.get('DDPM_SOLVER') == '3m':
        ddpm.sample = sample_3m
    if os.environ.get('DDPM_BROWNIAN') == '1':
        ddpm.sample = sample_brownian
    if sys.argv[1:2] == ['export']:
        export_ema(*sys.argv[2:])
    else:
        sys.exit(ddpm.main())
