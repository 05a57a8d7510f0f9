"""Denoising diffusion (Ho et al. 2020) in one file: the noise schedule, a ScoreNet U-Net, training,
three samplers (DDPM, DDIM, DPM-Solver++) behind `python ddpm.py train` and `python ddpm.py sample`.

Copied into another project, its pieces work on any (N, C, H, W) images in [-1, 1]:

    diffusion = Diffusion()                     # T=200 steps, cosine schedule, the net predicts eps
    model = ScoreNet(channels=3)                # a U-Net of the noisy image and the time
    loss = diffusion.loss(model, images)        # one training step's loss
    x = sample(model, diffusion, (16, 3, 32, 32))   # 100 DPM-Solver++ steps, as the CLI samples
"""
import signal
import sys

if __name__ == '__main__':
    # Ctrl-C from here on, even while torch loads, quits in one line
    signal.signal(signal.SIGINT, lambda signum, frame: sys.exit('interrupted'))

import argparse
import copy
import io
import math
import os
import shlex
import shutil
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from PIL import Image

try:
    # file locks, where the platform has them (not on Windows)
    import fcntl
except ImportError:
    fcntl = None


class DDPMError(Exception):
    """A user-facing problem (bad input, a missing file): the command line prints it as one line."""


def one_line(error):
    """An exception in one line: a message written for users whole, any other with its type."""
    message = ' '.join(str(error).split())
    if isinstance(error, (DDPMError, ValueError, OSError)):
        return message
    # an internal error's text can be a whole tensor: its start says what went wrong
    return f'{type(error).__name__} {message[:300]}'


# --- The noise schedule and the forward process ---------------------------------------------------

class Diffusion:
    """A noise schedule over steps 1..T (step 0 is the clean image), its loss and its predictions.

    Its tables are float32: betas, abar (the product of 1 - beta up to each step) and lam (the
    log-SNR). They are made on the CPU; abar_at moves abar to the images' device on its first call
    there, where it then stays."""

    def __init__(self, T=200, schedule='cosine', beta_start=1e-4, beta_end=0.1, target='eps'):
        if T < 1 or schedule not in ('linear', 'cosine') or target not in ('eps', 'v'):
            raise ValueError(f'T {T}, schedule {schedule!r}, target {target!r}: use T >= 1, '
                             'schedule linear or cosine, target eps or v')
        self.T = T
        self.target = target
        if schedule == 'linear':
            # Ho et al.'s schedule, with the original project's beta_end
            betas = torch.linspace(beta_start, beta_end, T, dtype=torch.float64)
        else:
            # Nichol & Dhariwal 2021, eq. 17, betas clipped at 0.999
            fraction = torch.arange(T + 1, dtype=torch.float64) / T
            f = torch.cos((fraction + 0.008) / 1.008 * math.pi / 2) ** 2
            betas = (1 - f[1:] / f[:-1]).clamp(max=0.999)
        betas = torch.cat([torch.zeros(1, dtype=torch.float64), betas])
        self.betas = betas.float()
        self.abar = torch.cumprod(1 - betas, 0).float()
        # log-SNR, half of it: where the samplers place their steps
        self.lam = 0.5 * torch.log(self.abar / (1 - self.abar))
        if not (self.lam[1:].isfinite().all() and (self.lam[2:] < self.lam[1:-1]).all()):
            raise ValueError(f'{schedule} schedule, T={T}: abar must fall step by step '
                             'from 1 to above 0 in float32')

    def abar_at(self, t, x):
        """abar at the steps t (N,), shaped (N, 1, ..., 1) to scale a batch x.

        The table moves to x's device here, on the first call there, and stays: so that a step on
        a GPU does not copy it from the CPU every time."""
        if self.abar.device != x.device:
            self.abar = self.abar.to(x.device)
        return self.abar[t].view(-1, *[1] * (x.dim() - 1))

    def q_sample(self, x0, t, noise):
        """x_t ~ q(x_t | x_0) = N(sqrt(abar_t) x_0, (1 - abar_t) I), for a batch of steps t."""
        abar = self.abar_at(t, x0)
        return abar.sqrt() * x0 + (1 - abar).sqrt() * noise

    def loss(self, model, x0, labels=None, *, t=None, noise=None, weight_max=5.0):
        """The training loss of a batch x0 at steps t (none: uniform) with noise (none: normal).

        target 'eps': the squared error of the predicted noise, step t's weighted by
        min(1 / abar_t, weight_max). 1 / abar_t is the weight that the v loss puts on eps's error;
        the cap keeps the nearly pure-noise steps near T from ruling the loss (1: Ho et al.'s plain
        mean). target 'v': the plain squared error of v = sqrt(abar) eps - sqrt(1 - abar) x0."""
        t = torch.randint(1, self.T + 1, (len(x0),), device=x0.device) if t is None else t
        noise = torch.randn_like(x0) if noise is None else noise
        abar = self.abar_at(t, x0)
        if self.target == 'eps':
            target = noise
            weight = (1 / abar).clamp(max=weight_max)
        else:
            target = abar.sqrt() * noise - (1 - abar).sqrt() * x0
            weight = 1.0
        prediction = model(self.q_sample(x0, t, noise), t / self.T, labels)
        return (weight * (prediction - target) ** 2).mean()

    def predict(self, model, x, t, labels=None, *, guidance=0.0):
        """The model's estimates (eps, x0) for images x, all at step t (an int).

        With labels and guidance w: classifier-free guidance (Ho & Salimans 2022), the output
        (1 + w) out(x, label) - w out(x, no label); eps and v mix alike. x0 is not clipped to
        [-1, 1]: clipping it in every step, as Ho et al.'s code does, turns its scatter about a
        background at -1 into a bias that the sampler carries to the end, a haze."""
        steps = torch.full((len(x),), t, device=x.device)
        if labels is None or guidance == 0:
            out = model(x, steps / self.T, labels)
        else:
            # one forward pass of 2N: conditional, then unconditional
            no_label = torch.full_like(labels, model.num_classes)
            both = model(torch.cat([x, x]), torch.cat([steps, steps]) / self.T,
                         torch.cat([labels, no_label]))
            out = (1 + guidance) * both[:len(x)] - guidance * both[len(x):]
        abar = self.abar_at(steps, x)
        if self.target == 'eps':
            x0 = (x - (1 - abar).sqrt() * out) / abar.sqrt()
        else:
            x0 = abar.sqrt() * x - (1 - abar).sqrt() * out
        return (x - abar.sqrt() * x0) / (1 - abar).sqrt(), x0


def drop_labels(labels, num_classes, share=0.1):
    """Training labels with a random `share` of them made "no label" (num_classes), so that one
    model learns both predictions that classifier-free guidance mixes."""
    dropped = torch.rand(len(labels), device=labels.device) < share
    return torch.where(dropped, num_classes, labels)


# --- The ScoreNet: a time-dependent U-Net that predicts the noise eps(x_t, t), or v ---------------

class Block(nn.Module):
    """A 3x3 conv (stride 2 halves the size; `up` doubles it to the skip's `size`, else ambiguous),
    time embedding, GroupNorm, SiLU; then depth - 1 residual convs, h + SiLU(GroupNorm(conv(h)))."""

    def __init__(self, c_in, c_out, emb_dim, *, stride=1, up=False, depth=1):
        super().__init__()
        conv = nn.ConvTranspose2d if up else nn.Conv2d
        self.conv = conv(c_in, c_out, 3, stride=2 if up else stride, padding=1)
        # at most 8 groups, and a divisor of any width
        groups = math.gcd(c_out, 8)
        self.time = nn.Linear(emb_dim, c_out)
        self.norm = nn.GroupNorm(groups, c_out)
        # depth - 1 more convs at the output size
        self.extra = nn.ModuleList(
            nn.Sequential(nn.Conv2d(c_out, c_out, 3, padding=1), nn.GroupNorm(groups, c_out),
                          nn.SiLU())
            for _ in range(depth - 1))

    def forward(self, x, emb, size=None):
        h = self.conv(x) if size is None else self.conv(x, output_size=size)
        h = F.silu(self.norm(h + self.time(emb)[:, :, None, None]))
        # residual, so that the gradient keeps a short path
        for layer in self.extra:
            h = h + layer(h)
        return h


class ScoreNet(nn.Module):
    """A U-Net of Blocks with skips, and a last conv that also sees x_t (a short path for the last
    steps' small noise). Level j has widths[j] channels at 1 / 2**j of the image's size, so H and W
    must be at least 2 ** (levels - 1). With num_classes, label num_classes means "no label"."""

    def __init__(self, channels=1, widths=(32, 64, 128, 256), emb_dim=256, num_classes=0, depth=2):
        super().__init__()
        if len(widths) < 2:
            raise ValueError(f'widths needs two or more levels, got {tuple(widths)}')
        self.channels = channels
        self.num_classes = num_classes
        self.min_size = 2 ** (len(widths) - 1)
        # Gaussian Fourier features of the time: fixed random frequencies
        self.register_buffer('freqs', torch.randn(emb_dim // 2) * 30)
        self.embed = nn.Sequential(nn.Linear(emb_dim, emb_dim), nn.SiLU())
        self.label_embed = nn.Embedding(num_classes + 1, emb_dim) if num_classes else None
        # Down: level j's block takes level j - 1's output (the image, for j = 0) to widths[j]
        # channels, halving H and W below the first level.
        ins = (channels, *widths[:-1])
        self.down = nn.ModuleList(Block(c_in, c_out, emb_dim, stride=2 if j else 1, depth=depth)
                                  for j, (c_in, c_out) in enumerate(zip(ins, widths)))
        # Up, from the top level: block j takes level j to level j - 1's size and widths[j - 1]
        # channels. The top block reads the top down block's output alone; each block below reads
        # the output of the block above joined to level j's skip: twice widths[j] channels.
        self.up = nn.ModuleList()
        top = len(widths) - 1
        for j in range(top, 0, -1):
            c_in = widths[j] if j == top else 2 * widths[j]
            self.up.append(Block(c_in, widths[j - 1], emb_dim, up=True, depth=depth))
        # the last conv reads level 0: the last up block's output, its skip, and x_t itself
        self.out = nn.Conv2d(2 * widths[0] + channels, channels, 3, padding=1)

    def forward(self, x, tau, labels=None):
        """The predicted noise (or v) of noisy images x (N, C, H, W) at times tau (N,), the step t
        over T in [0, 1]; labels: (N,) ints, or None (no labels at all means "no label" for all)."""
        if x.dim() != 4 or x.shape[1] != self.channels or min(x.shape[2:]) < self.min_size:
            raise ValueError(f'ScoreNet takes (N, {self.channels}, H, W), H and W >= '
                             f'{self.min_size}: {tuple(x.shape)}')
        angles = 2 * math.pi * tau[:, None] * self.freqs
        emb = self.embed(torch.cat([angles.sin(), angles.cos()], dim=1))
        if self.num_classes:
            no_label = torch.full_like(tau, self.num_classes, dtype=torch.long)
            emb = emb + self.label_embed(no_label if labels is None else labels)
        skips, h = [], x
        for block in self.down:
            h = block(h, emb)
            skips.append(h)
        for block, skip in zip(self.up, reversed(skips[:-1])):
            h = torch.cat([block(h, emb, size=skip.shape[-2:]), skip], dim=1)
        return self.out(torch.cat([h, x], dim=1))


# --- Samplers: each walks the steps T = t_0 > t_1 > ... > t_n = 0 from pure noise -----------------

def sampling_steps(diffusion, steps):
    """`steps` steps for a sampler, T first, then 0 (the clean image) appended.

    DPM-Solver's advice: steps even in log-SNR. m targets even in log-SNR, from step T's to step
    1's, each take the nearest step (interpolated along the table, then rounded). Where log-SNR
    moves fast per step (both ends of the cosine schedule), neighbouring targets round to the same
    step, so m grows until there are `steps` distinct ones."""
    T = diffusion.T
    lam = diffusion.lam.double().numpy()
    # every step is some target's nearest long before 100 T targets, unless log-SNR is flat
    for m in range(steps, 100 * T):
        targets = np.linspace(lam[T], lam[1], m)
        # np.interp needs rising x: log-SNR rises from step T to step 1
        ts = np.unique(np.interp(targets, lam[:0:-1], np.arange(T, 0, -1)).round())
        if len(ts) >= steps:
            return ts[::-1].astype(int).tolist() + [0]
    raise ValueError(f'cannot place {steps} steps evenly in log-SNR on this schedule')


def sampler_settings(diffusion, sampler, steps, eta):
    """The (sampler, steps, eta) that sample() runs for these arguments, or a ValueError.

    'ddpm' is Ho et al.'s Algorithm 2: all T steps, each the posterior q(x_t-1 | x_t, x0), which
    is DDIM's step at eta 1; so it runs as 'ddim', and refuses other steps or eta."""
    if sampler not in ('ddpm', 'ddim', 'dpm++'):
        raise ValueError(f'unknown sampler {sampler!r}: use ddpm, ddim or dpm++')
    if not 0 <= eta <= 1:
        raise ValueError(f'eta must be in [0, 1] (0: the ODE, 1: the SDE), got {eta}')
    if sampler == 'ddpm':
        if steps not in (None, diffusion.T) or eta != 1:
            raise ValueError(f'sampler ddpm takes all {diffusion.T} steps at eta 1: '
                             'use ddim for other steps or eta')
        return 'ddim', diffusion.T, 1.0
    if steps is None:
        # on MNIST, 100 steps score FID 1 better than 50, and 200 no better than 100 (RESULTS.md)
        steps = min(100, diffusion.T)
    if not 1 <= steps <= diffusion.T:
        raise ValueError(f'{sampler}, {steps} steps: use steps in 1..{diffusion.T}')
    return sampler, steps, eta


@torch.no_grad()
def sample(model, diffusion, shape, *, sampler='dpm++', steps=None, eta=1.0, labels=None,
           guidance=1.0, guidance_sigmas=(0.28, 2.0), generator=None):
    """Images of `shape` (N, C, H, W) in [-1, 1], in the model's device and dtype.

    The defaults are `python ddpm.py sample`'s: 'dpm++' (DPM-Solver++(2M), Lu et al. 2022) with
    steps=None (100, or T if fewer) at eta 1 (the SDE; 0: the ODE). 'ddim' (Song et al. 2020)
    takes the same steps and eta; 'ddpm' is Ho et al.'s Algorithm 2 (see sampler_settings).
    guidance applies with labels (see Diffusion.predict), and only at the steps whose noise
    sigma = sqrt((1 - abar) / abar) lies in guidance_sigmas = (low, high], as Kynkaanniemi et al.
    2024 advise: at high noise, guidance costs the samples their variety. On MNIST at guidance 1,
    50 steps, seed 0: FID 36.8 guided at every step, 22.6 in their (0.28, 5.42], 8.6 in (0.28, 2];
    all three read at least 99% of each digit as asked."""
    d = diffusion
    sampler, steps, eta = sampler_settings(d, sampler, steps, eta)
    parameter = next(model.parameters())
    device, dtype = parameter.device, parameter.dtype
    ts, lam = sampling_steps(d, steps), d.lam
    x = torch.randn(shape, generator=generator, device=device, dtype=dtype)
    x0_prev = None
    # from step t to step s < t
    for i, (t, s) in enumerate(zip(ts[:-1], ts[1:])):
        # sigma = sqrt((1 - abar) / abar) = e^(-lam), from the CPU table: no device sync
        guided = guidance_sigmas[0] < (-lam[t]).exp() <= guidance_sigmas[1]
        eps, x0 = d.predict(model, x, t, labels, guidance=guidance if guided else 0.0)
        if sampler == 'ddim':
            # Song et al.'s eq. 12; at eta 1 the posterior q(x_s | x_t, x0)
            sigma = eta * ((1 - d.abar[s]) / (1 - d.abar[t]) * (1 - d.abar[t] / d.abar[s])).sqrt()
            x = d.abar[s].sqrt() * x0 + (1 - d.abar[s] - sigma ** 2).sqrt() * eps
            x = x + sigma * torch.randn(shape, generator=generator, device=device, dtype=dtype)
        elif s == 0:
            # no noise left: the step lands on the estimate
            x = x0
        else:
            # dpm++: with h = lam_s - lam_t, alpha = sqrt(abar), sigma = sqrt(1 - abar),
            #   x_s = sigma_s / sigma_t e^(-eta h) x_t + alpha_s (1 - e^(-(1 + eta) h)) D
            #         + sigma_s sqrt(1 - e^(-2 eta h)) z,
            # the exact step for a data prediction D held constant over it: at eta 0 Lu et al.'s
            # Algorithm 2, DPM-Solver++(2M); at eta 1 its SDE form. 2M extrapolates D linearly in
            # lam from the last two steps' x0: D = x0 + (x0 - x0_prev) h / (2 h_prev).
            h = lam[s] - lam[t]
            D = x0
            if x0_prev is not None:
                D = x0 + (x0 - x0_prev) * h / (2 * (lam[t] - lam[ts[i - 1]]))
            sigma_s, sigma_t = (1 - d.abar[s]).sqrt(), (1 - d.abar[t]).sqrt()
            x = sigma_s / sigma_t * (-eta * h).exp() * x
            x = x - d.abar[s].sqrt() * (-(1 + eta) * h).expm1() * D
            if eta:
                noise = torch.randn(shape, generator=generator, device=device, dtype=dtype)
                x = x + sigma_s * (-torch.expm1(-2 * eta * h)).sqrt() * noise
        x0_prev = x0
    return x.clamp(-1, 1)


# --- Data, files and the terminal -----------------------------------------------------------------

def load_mnist(root, train=True, limit=None):
    """MNIST from root (downloaded there if missing): floats (N, 1, 28, 28) in [-1, 1], labels (N,).
    A failed download removes the folders it made."""
    root = Path(root)
    made = [folder for folder in (root, root / 'MNIST', root / 'MNIST' / 'raw')
            if not folder.exists()]
    try:
        dataset = torchvision.datasets.MNIST(root, train=train, download=True)
    except Exception as e:
        # no data and no network, a corrupt download, ...
        if made:
            shutil.rmtree(made[0], ignore_errors=True)
        raise DDPMError(f'cannot load MNIST from {str(root)!r}: {one_line(e)}')
    images = dataset.data[:limit, None].float() / 127.5 - 1
    return images, dataset.targets[:limit]


def to_uint8(x):
    """Floats (N, C, H, W) in [-1, 1] as uint8 arrays (N, H, W), or (N, H, W, C) for color."""
    x = ((x + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return x[..., 0] if x.shape[-1] == 1 else x


def temporary_twin(path):
    """The name that write_atomic writes path's new content under, before renaming it to path."""
    return Path(f'{path}.{os.getpid()}.tmp')


def write_atomic(path, write):
    """write(f) to a temporary file, then rename it: a crash leaves the old file or the new one."""
    tmp = temporary_twin(path)
    try:
        with open(tmp, 'wb') as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def check_writable(path):
    """Make path's folder, then write and remove path's temporary twin there: a folder we may not
    write, or a name too long for the twin, fails now rather than after the work."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    twin = temporary_twin(path)
    twin.open('wb').close()
    twin.unlink()


def shell_word(path):
    """path quoted for a shell, and with ./ before a leading '-', so that no parser reads a flag."""
    text = str(path)
    return shlex.quote('./' + text if text.startswith('-') else text)


def say(line, file=None):
    """Print a progress line; a closed or broken stdout (`| head`) then goes to /dev/null."""
    file = file or sys.stdout
    try:
        print(line, file=file, flush=True)
    except (OSError, ValueError):
        os.dup2(os.open(os.devnull, os.O_WRONLY), file.fileno())


# --- Checkpoints: one file with everything needed to sample, or to resume exactly -----------------

FORMAT = 'ddpm.py checkpoint v1'
MODEL_FLAGS = ('widths', 'depth', 'cond', 'T', 'schedule', 'beta_start', 'beta_end', 'target')
# train --resume takes these from the run unless typed
RUN_FLAGS = (*MODEL_FLAGS, 'data', 'epochs', 'minutes', 'batch', 'lr', 'ema', 'weight_max', 'limit',
             'seed')
# typed on --resume, these must be the run's: they fix the model, and what a step is
FIXED_FLAGS = (*MODEL_FLAGS, 'batch', 'limit')
# what a checkpoint must hold to resume
RESUME_PARTS = ('config', 'args', 'ema', 'model', 'optimizer', 'step', 'rng')


def load_checkpoint(path, parts=('config', 'ema')):
    """The checkpoint at `path`, which must hold `parts`; weights_only refuses code in pickles.
    NaN or infinite weights are refused too: they would sample black images, or train nothing."""
    if not Path(path).is_file():
        raise DDPMError(f'checkpoint {str(path)!r} not found')
    try:
        ckpt = torch.load(path, map_location='cpu', weights_only=True)
    except Exception as e:
        raise DDPMError(f'{path} is not a readable ddpm.py checkpoint: {one_line(e)}')
    if not isinstance(ckpt, dict) or ckpt.get('format') != FORMAT:
        raise DDPMError(f'{path} is not a ddpm.py checkpoint')
    if not set(parts) <= ckpt.keys():
        raise DDPMError(f'{path} is incomplete: it lacks {sorted(set(parts) - ckpt.keys())}')
    for part in ('model', 'ema'):
        for name, value in ckpt.get(part, {}).items():
            if value.is_floating_point() and not value.isfinite().all():
                raise DDPMError(f'{path} holds NaN or infinite weights ({part} {name})')
    return ckpt


def build(config, device, weights=None):
    """The diffusion and the model of a checkpoint's config, with `weights`, which must fit it.
    Every size is bounded before anything is built: a file cannot make us build a huge model."""
    widths = config['widths']
    sizes = (*widths, *config['shape'])
    in_range = 1 <= config['T'] <= 10_000 and 1 <= config['depth'] <= 8
    if not (in_range and 2 <= len(widths) <= 13 and all(1 <= n <= 4096 for n in sizes)):
        raise DDPMError(f"the config's T {config['T']}, depth {config['depth']}, widths {widths} "
                        f"or shape {config['shape']} is out of range")
    min_size = 2 ** (len(widths) - 1)
    if min(config['shape'][1:]) < min_size:
        raise DDPMError(f'{len(widths)} U-Net levels need images of {min_size} px or more: these '
                        f"are {config['shape'][1]}x{config['shape'][2]}")
    diffusion = Diffusion(config['T'], config['schedule'], config['beta_start'], config['beta_end'],
                          config['target'])
    # with --cond, MNIST's ten digits
    net_args = dict(channels=config['shape'][0], widths=widths, depth=config['depth'],
                    num_classes=10 if config['cond'] else 0)
    if weights is not None:
        # shapes only, on no memory: the weights must fill the model before we build it
        with torch.device('meta'):
            for name, value in ScoreNet(**net_args).state_dict().items():
                if name not in weights or weights[name].shape != value.shape:
                    raise DDPMError(f'the weights do not fit the config at {name}')
    model = ScoreNet(**net_args).to(device)
    if weights is not None:
        model.load_state_dict(weights)
    return diffusion, model


# --- Training -------------------------------------------------------------------------------------

@torch.no_grad()
def ema_update(ema, model, step, decay):
    """After step `step` (an int: no sync); the decay warms up as (1 + step) / (10 + step)."""
    weight = 1 - min(decay, (1 + step) / (10 + step)) if step > 0 else 1.0
    torch._foreach_lerp_(list(ema.parameters()), list(model.parameters()), weight)


def learning_rate(step, total, peak):
    """A linear warm-up over min(500, total / 10) steps, then a cosine decay to 0 at `total`."""
    warmup = min(500, max(1, total // 10))
    cosine = 0.5 * (1 + math.cos(math.pi * min(step / total, 1)))
    return peak * (min(1, (step + 1) / warmup) * cosine)


def cuda_graphed(model, x, y):
    """model, its forward and backward recorded as CUDA graphs for batches like x, labels y; or
    model itself where they cannot be recorded. A replay launches hundreds of small kernels at once.

    It shares model's weights, but the gradients that backward installs are the graphs' own
    buffers, overwritten by each replay: two backwards before a step (gradient accumulation) would
    silently keep only the last one (pytorch/pytorch#181723)."""
    try:
        # the graphs' streams are the current device's
        torch.cuda.set_device(x.device)
        example = (x.clone(), x.new_zeros(len(x)), y.clone())
        return torch.cuda.make_graphed_callables(model, example)
    except Exception as e:
        # an old GPU or driver, an op that cannot be recorded
        say(f'training without CUDA graphs: {one_line(e)}')
        return model


def refuse_other_runs(out, resume):
    """Refuse an --out that holds another run than the one resumed (a checkpoint, or the log of a
    run that saved none): runs never mix. Run before any work, and writes nothing."""
    log_path = out / 'log.csv'
    ckpt_path = out / 'ckpt.pt'
    if resume is not None and Path(resume).resolve() == ckpt_path.resolve():
        return
    if ckpt_path.exists():
        raise DDPMError(f'{out} holds another run: continue it with --resume '
                        f'{shell_word(ckpt_path)}, or pick another --out')
    if log_path.is_file() and log_path.stat().st_size > 0:
        raise DDPMError(f'{out} holds the log of a run that saved no checkpoint: delete '
                        f'{shell_word(log_path)} to reuse it, or pick another --out')


def open_run(out):
    """OUT/log.csv to append to, locked while we live (even kill -9 drops the lock); and OUT/ckpt.pt
    checked writable, so that its first save cannot fail."""
    out.mkdir(parents=True, exist_ok=True)
    # fails where the folder is not writable
    log_file = open(out / 'log.csv', 'a', buffering=1)
    try:
        if fcntl:
            fcntl.flock(log_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        check_writable(out / 'ckpt.pt')
    except OSError as e:
        log_file.close()
        if isinstance(e, BlockingIOError):
            raise DDPMError(f'another train is running in {out}')
        raise
    return log_file


def restore(ckpt, ema, opt):
    """Continue a run from `ckpt`: its EMA, its optimizer (fused or not, as this machine chose) and
    its RNG state. Returns its step and the seconds it has trained."""
    ema.load_state_dict(ckpt['ema'])
    for group in ckpt['optimizer']['param_groups']:
        group['fused'] = opt.defaults['fused']
    opt.load_state_dict(ckpt['optimizer'])
    torch.set_rng_state(ckpt['rng'][0])
    # no-op without CUDA
    torch.cuda.set_rng_state_all(ckpt['rng'][1:])
    return ckpt['step'], ckpt.get('seconds', 0.0)


# SIGHUP: a closed terminal or a dropped ssh (not on Windows)
STOP_SIGNALS = [signal.SIGINT, signal.SIGTERM]
if hasattr(signal, 'SIGHUP'):
    STOP_SIGNALS.append(signal.SIGHUP)


def catch_stop_signals(stop):
    """A stop signal appends its name to `stop` (the loop saves, then ends); a second quits now.
    Returns the handlers it replaced."""
    def handle(signum, frame):
        if stop:
            os._exit(130)
        stop.append(signal.Signals(signum).name)
        say(f'\n{stop[0]}: finishing this step, then saving (Ctrl-C again quits now)', sys.stderr)

    return {signum: signal.signal(signum, handle) for signum in STOP_SIGNALS}


class Progress:
    """The run's clock and its progress lines: every 5 s and at each epoch's end, a line on stdout
    and a row of OUT/log.csv (step, epoch, loss, lr, seconds of the whole run)."""

    def __init__(self, log_file, batch, steps_per_epoch, seconds_before):
        self.log_file = log_file
        self.batch = batch
        self.steps_per_epoch = steps_per_epoch
        self.seconds_before = seconds_before
        self.started = self.last_line = time.time()
        self.losses = []

    def seconds(self):
        """The seconds the run has trained, earlier legs included."""
        return self.seconds_before + time.time() - self.started

    def due(self):
        return time.time() - self.last_line >= 5

    def report(self, step, total, lr):
        """Write a line of the mean loss since the last, and return it. Only here is the loss read,
        as reading it waits for the device."""
        now = time.time()
        mean_loss = torch.stack(self.losses).mean().item()
        epochs_done = step / self.steps_per_epoch
        pace = len(self.losses) * self.batch / max(now - self.last_line, 1e-3)
        minutes = (now - self.started) / 60
        eta = (total - step) * self.batch / pace / 60
        row = f'{step},{epochs_done:.3f},{mean_loss:.5f},{lr:.3e},{self.seconds():.1f}'
        print(row, file=self.log_file)
        say(f'epoch {math.ceil(epochs_done)} step {step}/{total} loss {mean_loss:.4f} lr {lr:.2e} '
            f'{pace:.0f} img/s {minutes:.1f}m eta {eta:.1f}m')
        self.last_line = now
        self.losses = []
        return mean_loss


def train(args, ckpt=None):
    """The train command: train on MNIST (continuing `ckpt`), saving OUT/ckpt.pt every epoch."""
    device = torch.device(args.device)
    out = Path(args.out or 'runs/mnist')
    ckpt_path = out / 'ckpt.pt'
    refuse_other_runs(out, args.resume)

    # The data, the model, its EMA and the optimizer; a checkpoint's step, seconds and RNG state.
    torch.manual_seed(args.seed)
    images, labels = (tensor.to(device) for tensor in load_mnist(args.data, limit=args.limit))
    config = {name: getattr(args, name) for name in MODEL_FLAGS}
    config['shape'] = tuple(images.shape[1:])
    diffusion, model = build(config, device, weights=ckpt['model'] if ckpt else None)
    ema = copy.deepcopy(model).requires_grad_(False)
    batch = min(args.batch, len(images))
    # Left out, the lr follows Adam's usual square-root rule, and the decay keeps its half-life
    # in images, as the batch changes.
    peak_lr = 3e-3 * math.sqrt(batch / 32) if args.lr is None else args.lr
    decay = 0.999 ** (batch / 32) if args.ema is None else args.ema
    opt = torch.optim.Adam(model.parameters(), lr=peak_lr, fused=device.type == 'cuda' or None)
    steps_per_epoch = len(images) // batch
    max_steps = args.epochs * steps_per_epoch
    step, seconds_before = 0, 0.0
    if ckpt:
        step, seconds_before = restore(ckpt, ema, opt)
        if args.minutes and seconds_before >= 60 * args.minutes:
            raise DDPMError(f'{args.resume} has used its {args.minutes:g} minutes: raise --minutes')
        if step >= max_steps:
            raise DDPMError(f'{args.resume} has finished its {step} steps: raise --epochs')
    # The step where the schedule ends: with --minutes, re-planned at every step.
    total = max_steps

    # From here on the run has a folder; a stop signal saves it.
    log_file = open_run(out)
    stop = []
    handlers = catch_stop_signals(stop)
    progress = Progress(log_file, batch, steps_per_epoch, seconds_before)

    def save():
        state = {'format': FORMAT, 'config': config, 'model': model.state_dict(),
                 'ema': ema.state_dict(), 'optimizer': opt.state_dict(), 'step': step,
                 'total': total, 'seconds': progress.seconds(),
                 'args': vars(args) | {'data': os.path.abspath(args.data)},
                 'rng': [torch.get_rng_state(), *torch.cuda.get_rng_state_all()]}
        write_atomic(ckpt_path, lambda f: torch.save(state, f))

    budget = f', at most {args.minutes:g} minutes' if args.minutes else ''
    say(f'training on {len(images)} images: steps {step} to {total}, of {batch}, on {device}'
        + budget)
    # On CUDA, the loss runs model's forward and backward as CUDA graphs; the graphed callable
    # shares model's weights, which Adam, the EMA and save() use.
    loss_model = model
    if device.type == 'cuda':
        loss_model = cuda_graphed(model, images[:batch], labels[:batch])
    start_step = step
    order = None
    try:
        while step < total and not stop:
            # Batch: a fixed shuffle per epoch, so that a resumed run sees the same batches.
            epoch, i = divmod(step, steps_per_epoch)
            if order is None or i == 0:
                shuffle = torch.Generator().manual_seed((args.seed * 100_003 + epoch) % 2**64)
                order = torch.randperm(len(images), generator=shuffle).to(device)
            index = order[i * batch:(i + 1) * batch]
            # an unconditional net ignores the labels
            x0, y = images[index], labels[index]
            if args.cond:
                y = drop_labels(y, model.num_classes)
            # Step.
            for group in opt.param_groups:
                group['lr'] = learning_rate(step, total, peak_lr)
            loss = diffusion.loss(loss_model, x0, y, weight_max=args.weight_max)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            ema_update(ema, model, step, decay)
            step += 1
            progress.losses.append(loss.detach())
            # Plan: with --minutes, the schedule ends when the budget does, at the pace so far;
            # the learning rate and save() read this total.
            if args.minutes:
                seconds = progress.seconds()
                left = round((args.minutes * 60 - seconds) * step / seconds)
                total = min(max_steps, step + max(0, left))
            # Log, and save at each epoch's end: sample from OUT/ckpt.pt meanwhile to see how the
            # run does.
            saving = step == total or step % steps_per_epoch == 0
            if saving or progress.due():
                mean_loss = progress.report(step, total, learning_rate(step, total, peak_lr))
                if not math.isfinite(mean_loss):
                    kept = f'{ckpt_path} is kept' if ckpt_path.exists() else 'none was saved'
                    raise DDPMError(f'loss became {mean_loss} by step {step}; try a lower --lr '
                                    f'than {peak_lr:g} ({kept})')
            if saving:
                save()
    finally:
        for signum, handler in handlers.items():
            signal.signal(signum, handler)
        log_file.close()
    if stop:
        save()
        sys.exit(f'{stop[0]} at step {step}: saved {ckpt_path}; continue: python ddpm.py train '
                 f'--resume {shell_word(ckpt_path)}')
    steps = step - start_step
    wall = time.time() - progress.started
    say(f'done: {steps} steps in {wall / 60:.1f}m, {steps * batch / wall:.0f} img/s; {ckpt_path}')


# --- Sampling -------------------------------------------------------------------------------------

def default_checkpoint(digit):
    """sample's checkpoint when none is named: the trained run (runs/mnist, or runs/cond for a
    --digit), else the model that comes with ddpm.py in assets/."""
    trained = Path('runs', 'mnist' if digit is None else 'cond', 'ckpt.pt')
    shipped = Path(__file__).parent / 'assets' / ('mnist.pt' if digit is None else 'mnist_cond.pt')
    return trained if trained.exists() else shipped


def check_outputs(args):
    """Refuse, before any work and writing nothing: no output, a grid type that Pillow does not
    write, an output that is a folder, a device or any other file that is not a regular one, or a
    file named twice (the checkpoint read included). Returns the grid's image type."""
    if not (args.out or args.npz):
        raise DDPMError("nothing to write: --out '' and no --npz")
    image_type = Image.registered_extensions().get(Path(args.out).suffix.lower())
    try:
        # Pillow reads more types than it writes, and some of its writers need a plugin or a mode
        if args.out:
            Image.new('RGB', (2, 2)).save(io.BytesIO(), format=image_type)
    except Exception:
        raise DDPMError(f'{args.out}: the grid needs a type Pillow writes, such as .png or .jpg')
    named = {Path(args.ckpt).resolve(): '--ckpt'}
    for flag, path in (('--npz', args.npz), ('--out', args.out)):
        if not path:
            continue
        if Path(path).exists() and not Path(path).is_file():
            raise DDPMError(f'{flag} {path} is a folder or a device: name a new or a regular file')
        resolved = Path(path).resolve()
        if resolved in named:
            raise DDPMError(f'{flag} {path} is also {named[resolved]}: name another file')
        named[resolved] = flag
    return image_type


def sample_command(args):
    """The sample command: samples from a checkpoint's EMA weights, as an .npz and a grid."""
    if args.ckpt is None:
        args.ckpt = default_checkpoint(args.digit)
        say(f'no --ckpt: sampling {args.ckpt}')
    image_type = check_outputs(args)
    if not Path(args.ckpt).is_file():
        command = 'python ddpm.py train'
        if args.digit is not None:
            command += ' --cond --out runs/cond'
        raise DDPMError(f'checkpoint {args.ckpt} not found (train one with: {command})')
    device = torch.device(args.device)
    ckpt = load_checkpoint(args.ckpt)
    diffusion, model = build(ckpt['config'], device, weights=ckpt['ema'])
    if args.digit is not None and not ckpt['config']['cond']:
        raise DDPMError(f'{args.ckpt} was trained without --cond: it cannot draw a chosen --digit')
    _, steps, _ = sampler_settings(diffusion, args.sampler, args.steps, args.eta)
    outputs = [path for path in (args.npz, args.out) if path]
    for path in outputs:
        check_writable(path)
    n = args.n
    labels = None
    if args.digit is not None:
        # --digit all: the ten digits in turn
        labels = torch.arange(n) % 10 if args.digit == 'all' else torch.full((n,), int(args.digit))
    generator = torch.Generator(device).manual_seed(args.seed)
    chunks = []
    started = time.time()
    # on the CPU, batches larger than 100 spill out of its caches: 500 ran 1.4x slower
    batch = args.batch or (100 if device.type == 'cpu' else 500)
    for start in range(0, n, batch):
        size = min(batch, n - start)
        chunk_labels = None if labels is None else labels[start:start + size].to(device)
        x = sample(model, diffusion, (size, *ckpt['config']['shape']), sampler=args.sampler,
                   steps=args.steps, eta=args.eta, labels=chunk_labels, guidance=args.guidance,
                   generator=generator)
        chunks.append(x.cpu())
        say(f'{start + size}/{n} samples, {(start + size) / (time.time() - started):.1f} samples/s')
    x = torch.cat(chunks)
    seconds = time.time() - started
    # Write the .npz, then the grid of the first 400 (with --digit all, a column per digit).
    if args.npz:
        write_atomic(args.npz, lambda f: np.savez_compressed(f, samples=to_uint8(x)))
    if args.out:
        nrow = 10 if args.digit == 'all' else math.ceil(math.sqrt(min(n, 400)))
        grid = (x[:400] + 1) / 2
        write_atomic(args.out, lambda f: torchvision.utils.save_image(grid, f, nrow=nrow,
                                                                      format=image_type))
    # steps, not network evaluations: a guided step evaluates the net twice
    say(f'done: {n} samples in {seconds:.1f}s, {n / seconds:.1f} samples/s, {args.sampler} with '
        f'{steps} steps; wrote {", ".join(outputs)}')


# --- The command line -----------------------------------------------------------------------------

class Parser(argparse.ArgumentParser):
    def error(self, message):
        """One line, not the usage block."""
        self.exit(2, f'{self.prog}: error: {message}\n')


def bounded(kind, lo, hi=math.inf):
    """An argparse type: a finite number of `kind` in [lo, hi]."""
    def parse(text):
        # argparse reports a ValueError as "invalid <kind> value"
        value = kind(text)
        # an int can be too large for a float, but is never inf or NaN
        finite = kind is int or math.isfinite(value)
        if not (finite and lo <= value <= hi):
            raise argparse.ArgumentTypeError(f'{text} is out of range [{lo}, {hi}]')
        return value

    parse.__name__ = kind.__name__
    return parse


def parse_widths(text):
    """An argparse type: channels per U-Net level, like 32,64,128."""
    widths = tuple(bounded(int, 1, 4096)(width) for width in text.split(','))
    if len(widths) < 2:
        raise argparse.ArgumentTypeError(f'--widths needs two or more levels, got {text!r}')
    return widths


def build_parser():
    """The parser, and its train subparser (whose defaults a resumed run replaces)."""
    best = 'mps' if torch.backends.mps.is_available() else 'cpu'
    best = 'cuda' if torch.cuda.is_available() else best
    parser = Parser(description='Denoising diffusion (DDPM) on MNIST: train, then sample digits.')
    commands = parser.add_subparsers(dest='command', required=True)
    formats = argparse.ArgumentDefaultsHelpFormatter
    trainer = commands.add_parser('train', formatter_class=formats,
                                  help='train a model (OUT/ckpt.pt)')
    add = trainer.add_argument
    add('--data', default=os.environ.get('DDPM_DATA') or './data', help='MNIST folder')
    add('--out', help="ckpt.pt and log.csv's folder (none: runs/mnist or --resume's)")
    add('--epochs', type=bounded(int, 1), default=60, help='passes over the data')
    add('--minutes', type=bounded(float, 0.01), help='budget: the schedule ends on time')
    add('--batch', type=bounded(int, 1), default=32, help='images per step')
    add('--lr', type=bounded(float, 1e-8, 1), help='peak, none: 3e-3*sqrt(batch/32)')
    add('--ema', type=bounded(float, 0, 0.99999), help='decay, none: 0.999**(batch/32)')
    add('--T', type=bounded(int, 1, 10_000), default=200, help='diffusion steps')
    add('--schedule', choices=('linear', 'cosine'), default='cosine', help='noise')
    add('--target', choices=('eps', 'v'), default='eps', help='what the net predicts')
    add('--weight-max', type=bounded(float, 1), default=5.0, help='min(1/abar_t, this)')
    add('--beta-start', type=bounded(float, 1e-8, 0.999), default=1e-4, help='linear')
    add('--beta-end', type=bounded(float, 1e-8, 0.999), default=0.1, help='linear')
    add('--widths', type=parse_widths, default='32,64,128,256', help='U-Net channels')
    add('--depth', type=bounded(int, 1, 8), default=2, help='3x3 convs per U-Net block')
    add('--cond', action='store_true', help='class-conditional, for sample --digit')
    add('--limit', type=bounded(int, 1), help='train on the first N images (smoke runs)')
    add('--resume', metavar='CKPT', help='continue a run: flags left out keep its own')
    sampler = commands.add_parser('sample', formatter_class=formats,
                                  help='samples from a checkpoint')
    add = sampler.add_argument
    add('--ckpt', help='none: runs/mnist/ckpt.pt, else assets/mnist.pt; with --digit, '
        'runs/cond/ckpt.pt, else assets/mnist_cond.pt')
    add('--out', default='grid.png', help="grid of the first 400 samples ('': none)")
    add('--npz', help='also write the samples as uint8 (N, H, W[, C]) for fid.py')
    add('--n', type=bounded(int, 1, 10**6), default=64, help='number of samples')
    add('--sampler', choices=('ddpm', 'ddim', 'dpm++'), default='dpm++', help='method')
    add('--steps', type=bounded(int, 1), help='ddim, dpm++ steps (none: 100, or T; ddpm: T)')
    add('--eta', type=bounded(float, 0, 1), default=1.0, help='noise: 1 SDE, 0 ODE (ddpm: 1)')
    add('--digit', choices=[*map(str, range(10)), 'all'], help='for --cond models')
    add('--guidance', type=bounded(float, 0, 100), default=1.0,
        help='classifier-free, at middle noise (see sample())')
    add('--batch', type=bounded(int, 1), help='samples per forward pass (none: 100 on the CPU, '
        'else 500)')
    for command in (trainer, sampler):
        command.add_argument('--seed', type=bounded(int, 0, 2**63 - 1), default=0,
                             help='same seed, same result')
        command.add_argument('--device', default=best, help='cpu, cuda, cuda:1 or mps')
    return parser, trainer


def resumed_args(parser, trainer, argv, ckpt, path):
    """The flags of a resumed run: those left out take the run's values, as text that argparse
    checks as it checks typed flags; typed ones must agree with the run's FIXED_FLAGS."""
    defaults = {}
    for name in RUN_FLAGS:
        if name not in ckpt['args']:
            raise DDPMError(f'{path}: from an older ddpm.py, without {name}')
        value = ckpt['args'][name]
        default = trainer.get_default(name)
        if value is None or isinstance(value, bool) or isinstance(default, bool):
            # a flag left out, or a switch (--cond): no text, so it must be of the default's type
            if type(value) is not type(default):
                raise DDPMError(f'{path}: its {name} cannot be {value!r}')
            defaults[name] = value
        else:
            defaults[name] = ','.join(map(str, value)) if isinstance(value, tuple) else str(value)
    trainer.set_defaults(**defaults)
    args = parser.parse_args(argv)
    # the run stays in its folder unless --out is typed
    args.out = args.out or str(Path(path).parent)
    for name in FIXED_FLAGS:
        typed = getattr(args, name)
        saved = ckpt['args'][name]
        if typed != saved:
            flag = '--' + name.replace('_', '-')
            raise DDPMError(f'{flag} {typed} contradicts the checkpoint ({saved})')
    mnist = Path(args.data) / 'MNIST' / 'raw'
    if args.data == ckpt['args']['data'] and not mnist.is_dir():
        raise DDPMError(f'the run trained on {args.data}, which is not here: pass --data')
    return args


def main(argv=None):
    parser, trainer = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.command == 'sample':
            return sample_command(args)
        ckpt = None
        if args.resume is not None:
            ckpt = load_checkpoint(args.resume, RESUME_PARTS)
            args = resumed_args(parser, trainer, argv, ckpt, args.resume)
        train(args, ckpt)
    except Exception as e:
        # bad input, a missing or damaged file, a full disk, out of memory
        sys.exit(f'error: {one_line(e)}')


if __name__ == '__main__':
    try:
        main()
    finally:
        # a Ctrl-C as the interpreter exits would print "Exception ignored in atexit callback"
        signal.signal(signal.SIGINT, signal.SIG_IGN)
