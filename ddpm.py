"""Denoising diffusion probabilistic models (Ho et al. 2020) in one file: noise schedule, ScoreNet U-Net, training
loop and samplers (DDPM, DDIM, DPM-Solver++), behind `python ddpm.py train|sample`. Copy this file into another
project and use its pieces on any (N, C, H, W) images in [-1, 1]; the classes' defaults are the command line's
(T=200 steps, cosine schedule, the network predicts the noise eps, two 3x3 convs per U-Net block):
    diffusion, model = Diffusion(), ScoreNet(channels=3)
    loss = diffusion.loss(model, images); images = sample(model, diffusion, (16, 3, 32, 32), 'dpm++', 50)"""
import argparse, copy, math, os, signal, sys, tempfile, time
from pathlib import Path

if __name__ == '__main__':  # Ctrl-C from here on, even while torch loads, quits in one line (training saves first)
    signal.signal(signal.SIGINT, lambda signum, frame: sys.exit('interrupted'))

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from PIL import Image

try:  # file locks and peak memory, where the platform has them (not on Windows)
    import fcntl, resource
except ImportError:
    fcntl = resource = None

class DDPMError(Exception):
    """A user-facing problem (bad input, a missing file): the command line prints it as one line."""

def brief(error):  # an exception in one line, with its type unless the message is made for users
    message = ' '.join(str(error).split())[:300]
    return message if isinstance(error, (DDPMError, ValueError, OSError)) else f'{type(error).__name__} {message}'

# --- noise schedule and forward process ---------------------------------------------------------------------
class Diffusion:
    """A noise schedule and what derives from it. Steps run 1..T; index 0 is the clean image (abar 1)."""
    def __init__(self, T=200, schedule='cosine', beta_start=1e-4, beta_end=0.1, device='cpu', target='eps'):
        if schedule not in ('linear', 'cosine') or target not in ('eps', 'v'):
            raise ValueError(f'unknown schedule {schedule!r} or target {target!r}')
        self.T, self.target = T, target
        if schedule == 'linear':  # Ho et al.'s schedule, with the original project's beta_end
            betas = torch.linspace(beta_start, beta_end, T, dtype=torch.float64)
        else:  # cosine: Nichol & Dhariwal 2021, eq. 17, betas clipped at 0.999
            f = torch.cos((torch.arange(T + 1, dtype=torch.float64) / T + 0.008) / 1.008 * math.pi / 2) ** 2
            betas = (1 - f[1:] / f[:-1]).clamp(max=0.999)
        betas = torch.cat([torch.zeros(1, dtype=torch.float64), betas])
        self.betas, self.abar = betas.float().to(device), torch.cumprod(1 - betas, 0).float().to(device)
        self.lam = 0.5 * torch.log(self.abar / (1 - self.abar)).cpu()  # log signal-to-noise ratio (inf at step 0)
        if not (self.lam[1:].isfinite().all() and (self.lam[2:] < self.lam[1:-1]).all()):  # the samplers need it
            raise ValueError(f'{schedule} schedule, T={T}: abar must fall step by step from 1 to above 0 in float32')
    def q_sample(self, x0, t, noise):
        """x_t ~ q(x_t | x_0) = N(sqrt(abar_t) x_0, (1 - abar_t) I), for a batch of steps t."""
        abar = self.abar[t].view(-1, *[1] * (x0.dim() - 1))
        return abar.sqrt() * x0 + (1 - abar).sqrt() * noise
    def loss(self, model, x0, labels=None, t=None, noise=None, weight_max=5.0):
        """Mean squared error against the noise eps (weighted) or v (Salimans & Ho 2022), t uniform unless given."""
        t = torch.randint(1, self.T + 1, (x0.shape[0],), device=x0.device) if t is None else t
        noise = torch.randn_like(x0) if noise is None else noise
        abar = self.abar[t].view(-1, *[1] * (x0.dim() - 1))
        target = noise if self.target == 'eps' else abar.sqrt() * noise - (1 - abar).sqrt() * x0
        weight = (1 / abar).clamp(max=weight_max) if self.target == 'eps' else 1.0  # as the v loss, capped near T
        return (weight * (model(self.q_sample(x0, t, noise), t / self.T, labels) - target) ** 2).mean()
    def predict(self, model, x, t, labels=None, guidance=0.0, clip=False):
        """(eps, x0) at step t (an int); classifier-free guidance when labels are given; clip: x0 to [-1, 1]."""
        tt = torch.full((x.shape[0],), t / self.T, device=x.device)
        if labels is None or guidance == 0:
            out = model(x, tt, labels)
        else:  # one forward pass of 2N: conditional, then unconditional ("no label" = num_classes)
            null = torch.full_like(labels, model.num_classes)
            out_c, out_u = model(torch.cat([x, x]), torch.cat([tt, tt]), torch.cat([labels, null])).chunk(2)
            out = (1 + guidance) * out_c - guidance * out_u  # eps or v: either is linear in the other at fixed x
        abar = self.abar[t]
        x0 = ((x - (1 - abar).sqrt() * out) / abar.sqrt() if self.target == 'eps' else
              abar.sqrt() * x - (1 - abar).sqrt() * out)
        x0 = x0.clamp(-1, 1) if clip else x0  # off by default: clipped, x0's scatter at -1 biases it up (a haze)
        return (x - abar.sqrt() * x0) / (1 - abar).sqrt(), x0

# --- the ScoreNet: a time-dependent U-Net that predicts the noise eps(x_t, t), or v -------------------------
class Block(nn.Module):
    """3x3 conv (stride 2 halves, `up` doubles the size), plus the time embedding, GroupNorm, SiLU."""
    def __init__(self, c_in, c_out, emb_dim, stride=1, up=False, depth=1):
        super().__init__()
        self.conv = (nn.ConvTranspose2d if up else nn.Conv2d)(c_in, c_out, 3, stride=2 if up else stride, padding=1)
        self.time, self.norm = nn.Linear(emb_dim, c_out), nn.GroupNorm(math.gcd(c_out, 8), c_out)  # <= 8 groups
        self.extra = nn.ModuleList(  # depth - 1 more convs at the output size, each h + SiLU(GroupNorm(conv(h)))
            nn.Sequential(nn.Conv2d(c_out, c_out, 3, padding=1), nn.GroupNorm(self.norm.num_groups, c_out), nn.SiLU())
            for _ in range(depth - 1))
    def forward(self, x, emb, size=None):
        h = self.conv(x, output_size=size) if size is not None else self.conv(x)
        h = F.silu(self.norm(h + self.time(emb)[:, :, None, None]))
        for layer in self.extra:  # residual, so that the gradient keeps a short path through a deep net
            h = h + layer(h)
        return h

class ScoreNet(nn.Module):
    """U-Net: a full-size block, strided-conv down, transposed-conv up with skips, and a last conv that also sees
    x_t (a short path for the last steps' small noise). Padding keeps sizes: any H, W >= 2 ** (levels - 1) works."""
    def __init__(self, channels=1, widths=(32, 64, 128, 256), emb_dim=256, num_classes=0, depth=2):
        super().__init__()
        self.channels, self.num_classes, self.min_size = channels, num_classes, 2 ** (len(widths) - 1)
        self.register_buffer('freqs', torch.randn(emb_dim // 2) * 30)  # Gaussian Fourier features of t
        self.embed = nn.Sequential(nn.Linear(emb_dim, emb_dim), nn.SiLU())
        self.label_embed = nn.Embedding(num_classes + 1, emb_dim) if num_classes else None  # +1: "no label"
        ins = (channels,) + tuple(widths[:-1])
        self.down = nn.ModuleList(Block(i, o, emb_dim, 1 if k == 0 else 2, depth=depth)
                                  for k, (i, o) in enumerate(zip(ins, widths)))
        top = len(widths) - 1  # up block j maps level j to level j - 1; below the top it also gets the skip
        self.up = nn.ModuleList(Block(widths[j] * (1 if j == top else 2), widths[j - 1], emb_dim, 1, True, depth)
                                for j in range(top, 0, -1))
        self.out = nn.Conv2d(2 * widths[0] + channels, channels, 3, padding=1)
    def forward(self, x, t, labels=None):
        """x: (N, C, H, W) noisy images; t: (N,) times in [0, 1]; labels: (N,) ints or None."""
        if x.dim() != 4 or x.shape[1] != self.channels or min(x.shape[2:]) < self.min_size:
            raise ValueError(f'ScoreNet takes (N, {self.channels}, H, W), H and W >= {self.min_size}: {tuple(x.shape)}')
        angles = 2 * math.pi * t[:, None] * self.freqs
        emb = self.embed(torch.cat([angles.sin(), angles.cos()], dim=1))
        if self.num_classes:  # no labels at all means "no label" for every image
            emb = emb + self.label_embed(torch.full_like(t, self.num_classes, dtype=torch.long)
                                         if labels is None else labels)
        skips, h = [], x
        for block in self.down:
            h = block(h, emb)
            skips.append(h)
        for block, skip in zip(self.up, reversed(skips[:-1])):
            h = torch.cat([block(h, emb, size=skip.shape[-2:]), skip], dim=1)
        return self.out(torch.cat([h, x], dim=1))

# --- samplers: each walks the steps T = t_0 > t_1 > ... > t_n = 0 from pure noise ---------------------------
def sampling_steps(diffusion, steps):
    """The steps a sampler visits, T first and 0 last: the steps nearest to m targets spaced evenly in log-SNR (short
    steps at both ends, as DPM-Solver advises); close targets share a step, so m grows until `steps` remain."""
    T, lam = diffusion.T, diffusion.lam.double().numpy()
    if steps == T:
        return list(range(T, -1, -1))
    for m in range(steps, 100 * T):  # a target's nearest step: its step interpolated along log-SNR, rounded
        ts = np.unique(np.interp(np.linspace(lam[T], lam[1], m), lam[:0:-1], np.arange(T, 0, -1)).round())
        if len(ts) >= steps:
            return ts[::-1].astype(int).tolist() + [0]
    raise ValueError(f'cannot place {steps} steps evenly in log-SNR on this schedule')

@torch.inference_mode()
def sample(model, diffusion, shape, sampler='ddpm', steps=None, eta=0.0, labels=None, guidance=0.0, generator=None,
           clip=False):
    """Images of `shape` (N, C, H, W) in [-1, 1]: 'ddpm' is Ho et al.'s Algorithm 2 on all T steps; 'ddim' (Song
    et al. 2020) and 'dpm++' (DPM-Solver++(2M), Lu et al. 2022) take `steps` steps (see sampling_steps). `eta`:
    the noise of ddim and dpm++ (0: the ODE; 1: the SDE). `clip`: see Diffusion.predict."""
    d, device = diffusion, next(model.parameters()).device
    if sampler == 'ddpm':  # Algorithm 2's step, the posterior q(x_{t-1} | x_t, x0), is DDIM's with eta = 1
        sampler, steps, eta = 'ddim', d.T, 1.0
    steps = d.T if steps is None else steps
    if sampler not in ('ddim', 'dpm++') or not 1 <= steps <= d.T:
        raise ValueError(f'sampler {sampler} with {steps} steps: use ddpm, ddim or dpm++, and steps in 1..{d.T}')
    noise = lambda: torch.randn(shape, generator=generator, device=device)
    ts, lam, x, x0_prev = sampling_steps(d, steps), d.lam, noise(), None
    for i, (t, s) in enumerate(zip(ts[:-1], ts[1:])):  # from step t to step s < t
        eps, x0 = d.predict(model, x, t, labels, guidance, clip)
        if sampler == 'ddim':  # eq. 12 of Song et al.; eta = 1: the posterior q(x_s | x_t, x0) (their eq. 16)
            sigma = eta * ((1 - d.abar[s]) / (1 - d.abar[t]) * (1 - d.abar[t] / d.abar[s])).sqrt()
            x = d.abar[s].sqrt() * x0 + (1 - d.abar[s] - sigma ** 2).sqrt() * eps + sigma * noise()
        elif s == 0:  # dpm++ with no noise left: the step lands on x0
            x = x0
        else:  # dpm++: data prediction, a step of length h in log-SNR; eta 1: the SDE form, as in k-diffusion
            h, D = lam[s] - lam[t], x0
            if x0_prev is not None:  # second order (2M): x0 extrapolated along log-SNR from the previous step
                D = x0 + (x0 - x0_prev) * h / (2 * (lam[t] - lam[ts[i - 1]]))  # h / (2 h_previous)
            sigma_s, sigma_t = (1 - d.abar[s]).sqrt(), (1 - d.abar[t]).sqrt()
            x = sigma_s / sigma_t * (-eta * h).exp() * x - d.abar[s].sqrt() * (-(1 + eta) * h).expm1() * D
            if eta:
                x = x + sigma_s * (-torch.expm1(-2 * eta * h)).sqrt() * noise()
        x0_prev = x0
    return x.clamp(-1, 1)

# --- data and images ----------------------------------------------------------------------------------------
def load_mnist(root, train=True, limit=None):
    """MNIST (downloaded into root if missing) as one float tensor (N, 1, 28, 28) in [-1, 1] and its labels (N,)."""
    try:
        ds = torchvision.datasets.MNIST(root, train=train, download=True)
    except Exception as e:  # no data and no network, a corrupt download, ...
        raise DDPMError(f'cannot load MNIST from {root!r}: {brief(e)}')
    return ds.data[:limit, None].float() / 127.5 - 1, ds.targets[:limit]

def to_uint8(x):  # [-1, 1] floats (N, C, H, W) to uint8 arrays (N, H, W), or (N, H, W, C) for color
    x = ((x + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return x[..., 0] if x.shape[-1] == 1 else x

# --- checkpoints: one file with everything needed to sample or to resume exactly ----------------------------
FORMAT, LEGACY = 'ddpm.py checkpoint v1', {'depth': 1, 'target': 'eps', 'weight_max': 1.0}  # older files' implied
MODEL = ('widths', 'depth', 'cond', 'T', 'schedule', 'beta_start', 'beta_end', 'target')  # fixed by one
RESUMED = (*MODEL, 'epochs', 'minutes', 'batch', 'lr', 'ema', 'weight_max', 'limit', 'seed', 'data')
RESUME_PARTS = ('config', 'ema', 'model', 'optimizer', 'step', 'rng')  # what train --resume reads from a checkpoint

def save_checkpoint(path, state):  # a temporary file, fsync, rename: a crash leaves the old or the new file
    tmp = Path(f'{path}.tmp')
    try:
        with open(tmp, 'wb') as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:  # a failed write (a full disk) leaves no half file behind
        tmp.unlink(missing_ok=True)

def load_checkpoint(path, parts=('config', 'ema')):  # weights_only refuses pickles that would run code
    if not Path(path).is_file():
        raise DDPMError(f'checkpoint {path} not found (train one with: python ddpm.py train)')
    try:
        ckpt = torch.load(path, map_location='cpu', weights_only=True)
    except Exception as e:
        raise DDPMError(f'{path} is not a readable ddpm.py checkpoint: {brief(e)}')
    if not isinstance(ckpt, dict) or ckpt.get('format') != FORMAT:
        raise DDPMError(f'{path} is not a ddpm.py checkpoint')
    if not set(parts) <= ckpt.keys():  # sample needs the config and the EMA; train --resume, all of RESUME_PARTS
        raise DDPMError(f'{path} is incomplete: it lacks {sorted(set(parts) - ckpt.keys())}')
    return ckpt | {part: LEGACY | ckpt[part] for part in ('args', 'config') if part in ckpt}

def build(c, device):  # the diffusion and the model that a checkpoint's config `c` describes
    model = ScoreNet(c['shape'][0], c['widths'], 256, 10 if c['cond'] else 0, c['depth']).to(device)
    return Diffusion(c['T'], c['schedule'], c['beta_start'], c['beta_end'], device, c['target']), model

def check_writable(folder):  # fail now, not after an epoch of work, if `folder` is not writable
    Path(folder).mkdir(parents=True, exist_ok=True)
    tempfile.TemporaryFile(dir=folder).close()

# --- training -----------------------------------------------------------------------------------------------
@torch.no_grad()
def ema_update(ema, model, step, decay):
    """After optimizer step `step` (an int: no device sync). The decay warms up as (1 + step) / (10 + step) to
    `decay`, so that a short run is not dragged toward its start; the first step, and decay 0, copy the weights."""
    weight = 1 - min(decay, (1 + step) / (10 + step)) if step > 0 else 1.0
    torch._foreach_lerp_(list(ema.parameters()), list(model.parameters()), weight)

def learning_rate(step, total, peak):  # a linear warm-up over min(500, total / 10) steps, then a cosine to 0
    warmup = min(500, max(1, total // 10))
    return peak * (min(1, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(step / total, 1))))

def open_run(out, resume):  # OUT/log.csv to append to, locked while this process lives (even kill -9 drops it)
    check_writable(out)
    log_file = open(out / 'log.csv', 'a')
    try:
        if fcntl:
            fcntl.flock(log_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        raise DDPMError(f'another train is running in {out}')
    in_place = resume is not None and Path(resume).resolve() == (out / 'ckpt.pt').resolve()
    if not in_place and (log_file.tell() > 0 or (out / 'ckpt.pt').exists()):  # never mix or overwrite two runs
        log_file.close()
        raise DDPMError(f'{out} holds another run: continue it with --resume {out / "ckpt.pt"}, or pick another --out')
    return log_file

def train(args, given=()):  # given: the flags typed; with --resume, those left out take the checkpoint's values
    device, ckpt = torch.device(args.device), load_checkpoint(args.resume, RESUME_PARTS) if args.resume else None
    out = Path(args.out or (Path(args.resume).parent if args.resume else 'runs/mnist'))
    ckpt_path = out / 'ckpt.pt'
    for k in RESUMED if ckpt else ():
        saved = ckpt.get('args', {}).get(k, getattr(args, k))
        if k not in given:
            setattr(args, k, saved)
        elif k in MODEL and getattr(args, k) != saved:
            raise DDPMError(f'--{k.replace("_", "-")} {getattr(args, k)} contradicts the checkpoint ({saved})')
    torch.manual_seed(args.seed)
    images, labels = (a.to(device) for a in load_mnist(args.data, train=True, limit=args.limit))
    config = {k: getattr(args, k) for k in MODEL} | {'shape': tuple(images.shape[1:])}
    diffusion, model = build(config, device)
    ema = copy.deepcopy(model).requires_grad_(False)
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    batch = min(args.batch, len(images))
    steps_per_epoch = len(images) // batch
    total = cap = args.epochs * steps_per_epoch  # with --minutes, re-planned every step from the measured pace
    step, used = 0, 0.0  # optimizer steps taken and training seconds spent, over all sessions of this run
    if ckpt:
        for name, part in (('model', model), ('ema', ema), ('optimizer', opt)):
            part.load_state_dict(ckpt[name])
        step, used = ckpt['step'], ckpt.get('seconds', 0.0)
        torch.set_rng_state(ckpt['rng'][0])
        torch.cuda.set_rng_state_all(ckpt['rng'][1:])  # no-op without CUDA
        if step >= total or (args.minutes and used >= 60 * args.minutes):
            raise DDPMError(f'{args.resume} has finished its {step} steps: raise --epochs or --minutes to go on')
        print(f'resumed {args.resume} at step {step} (epoch {step / steps_per_epoch:.2f})')
    log_file = open_run(out, args.resume)
    t0 = time.time()
    seconds = lambda: used + time.time() - t0
    def save():
        state = {'model': model.state_dict(), 'ema': ema.state_dict(), 'optimizer': opt.state_dict()}
        save_checkpoint(ckpt_path, state | {'format': FORMAT, 'config': config, 'args': vars(args), 'step': step,
                                            'total': total, 'seconds': seconds(),
                                            'rng': [torch.get_rng_state(), *torch.cuda.get_rng_state_all()]})
    stop = []  # the name of the signal that asked us to stop
    def on_signal(signum, frame):
        if stop:  # a second Ctrl-C: leave at once
            os._exit(130)
        stop.append(signal.Signals(signum).name)
        print(f'\n{stop[0]}: finishing this step, then saving (Ctrl-C again quits at once)', file=sys.stderr)
    handlers = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    print(f'training {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters on {len(images)} images: '
          f'{total} steps of {batch} on {device}' + (f', at most {args.minutes:g} minutes' if args.minutes else ''))
    start_step, last_log, loss_sum, loss_count, order = step, t0, 0.0, 0, None
    try:
        while step < total and not stop:
            epoch, i = divmod(step, steps_per_epoch)
            if order is None or i == 0:  # a fixed shuffle per epoch, so a resumed run sees the same batches
                order = torch.randperm(len(images), generator=torch.Generator().manual_seed(
                    args.seed * 100_003 + epoch)).to(device)
            idx = order[i * batch:(i + 1) * batch]
            x0, y = images[idx], None
            if args.cond:  # a tenth of the labels drop to "no label" (10): one model, both modes (Ho & Salimans)
                y = torch.where(torch.rand(batch, device=device) < 0.1, 10, labels[idx])
            for group in opt.param_groups:
                group['lr'] = learning_rate(step, total, args.lr)
            loss = diffusion.loss(model, x0, y, weight_max=args.weight_max)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            ema_update(ema, model, step, args.ema)
            step, loss_sum, loss_count = step + 1, loss_sum + loss.detach(), loss_count + 1
            if args.minutes:  # end the schedule when the budget ends, at the pace so far
                total = min(cap, step + max(0, round((args.minutes * 60 - seconds()) * step / seconds())))
            saving = step == total or step % steps_per_epoch == 0  # a checkpoint at the end of each epoch
            if saving or time.time() - last_log >= 5:  # a progress line every 5 s; only here is the loss read
                now, lr, mean_loss = time.time(), learning_rate(step, total, args.lr), loss_sum.item() / loss_count
                elapsed, rate, last_log = now - t0, loss_count * batch / max(now - last_log, 1e-3), now  # recent pace
                if not math.isfinite(mean_loss):
                    kept = f'{ckpt_path} is kept' if ckpt_path.exists() else 'no checkpoint was saved'
                    raise DDPMError(f'loss became {mean_loss} by step {step}; try a lower --lr than {args.lr} ({kept})')
                print(f'{step},{step / steps_per_epoch:.3f},{mean_loss:.5f},{lr:.3e},{elapsed:.1f}', file=log_file,
                      flush=True)  # for loss curves: step, epoch, loss, lr, seconds
                print(f'epoch {epoch + 1} step {step}/{total} loss {mean_loss:.4f} lr {lr:.2e} {rate:.0f} img/s '
                      f'{elapsed / 60:.1f}m eta {(total - step) * batch / rate / 60:.1f}m', flush=True)
                loss_sum, loss_count = 0.0, 0
            if saving:  # see how it does meanwhile with: python ddpm.py sample --ckpt OUT/ckpt.pt
                save()
    finally:
        for s, handler in handlers.items():
            signal.signal(s, handler)
        log_file.close()
    if stop:
        save()
        sys.exit(f'{stop[0]} at step {step}: saved {ckpt_path}; continue: python ddpm.py train --resume {ckpt_path}')
    wall = time.time() - t0
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 if resource else math.nan  # kB on Linux
    peak = f'{torch.cuda.max_memory_allocated() / 2**20:.0f} MB GPU' if device.type == 'cuda' else f'{rss:.0f} MB RSS'
    print(f'done: {step - start_step} steps in {wall / 60:.1f}m, {(step - start_step) * batch / wall:.0f} '
          f'img/s, peak memory {peak}; checkpoint {ckpt_path}')

# --- sampling command ---------------------------------------------------------------------------------------
def check_outputs(args):  # before any sampling: something to write, each name of its type, writable folders
    if not (args.out or args.npz):
        raise DDPMError("nothing to write: --out '' and no --npz")
    for path, types in ((args.out, Image.registered_extensions()), (args.npz, ['.npz'])):
        if path and Path(path).suffix.lower() not in types:
            raise DDPMError(f'{path}: a name of the wrong type (the grid: .png or .jpg; --npz: .npz)')
        if path:
            check_writable(Path(path).parent)

def generate(args):
    check_outputs(args)
    device, ckpt = torch.device(args.device), load_checkpoint(args.ckpt)
    diffusion, model = build(ckpt['config'], device)
    model.load_state_dict(ckpt['ema'])  # the EMA weights; a part that does not fit: RuntimeError
    n, labels, steps = args.n, None, args.steps or min(50, diffusion.T)  # ddim, dpm++: 50 steps, or T
    if args.digit is not None:
        if not ckpt['config']['cond']:
            raise DDPMError(f'{args.ckpt} was trained without --cond, so it cannot draw a chosen --digit')
        labels = (torch.arange(n) % 10 if args.digit == 'all' else torch.full((n,), int(args.digit))).to(device)
    gen, chunks, t0 = torch.Generator(device).manual_seed(args.seed), [], time.time()
    for start in range(0, n, args.batch):
        b = min(args.batch, n - start)
        chunk_labels = None if labels is None else labels[start:start + b]
        chunks.append(sample(model, diffusion, (b, *ckpt['config']['shape']), args.sampler, steps, args.eta,
                             chunk_labels, args.guidance, gen, args.clip).cpu())
        print(f'{start + b}/{n} samples, {(start + b) / (time.time() - t0):.1f} samples/s', flush=True)
    x, seconds, nfe = torch.cat(chunks), time.time() - t0, diffusion.T if args.sampler == 'ddpm' else steps
    if args.out:
        nrow = 10 if args.digit == 'all' else math.ceil(math.sqrt(min(n, 400)))  # 'all': a column per digit
        torchvision.utils.save_image((x[:400] + 1) / 2, args.out, nrow=nrow)
    if args.npz:
        np.savez_compressed(args.npz, samples=to_uint8(x))
    print(f'done: {n} samples in {seconds:.1f}s, {n / seconds:.1f} samples/s, {args.sampler} with {nfe} network '
          f'evaluations each; wrote {", ".join(path for path in (args.out, args.npz) if path)}')

# --- command line -------------------------------------------------------------------------------------------
class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, not the usage block
        self.exit(2, f'{self.prog}: error: {message}\n')

def number(kind, lo, hi=math.inf):  # an argparse type: a number of `kind` in [lo, hi]
    def parse(text):
        if not lo <= kind(text) <= hi:  # argparse reports a ValueError as "invalid <kind> value"
            raise argparse.ArgumentTypeError(f'{text} is out of range [{lo}, {hi}]')
        return kind(text)
    parse.__name__ = kind.__name__
    return parse

def widths(text):  # an argparse type: channels per U-Net level, like 32,64,128
    ws = tuple(number(int, 1, 4096)(w) for w in text.split(','))
    if len(ws) < 2:
        raise argparse.ArgumentTypeError(f'--widths needs two or more levels, got {text!r}')
    return ws

def build_parser(given_only=False):
    best = 'cuda' if torch.cuda.is_available() else 'mps' if torch.backends.mps.is_available() else 'cpu'
    p = Parser(description='Denoising diffusion (DDPM) on MNIST: train a model, then sample digits.')
    sub, fmt = p.add_subparsers(dest='command', required=True), argparse.ArgumentDefaultsHelpFormatter
    t = sub.add_parser('train', formatter_class=fmt, help='train a model (writes OUT/ckpt.pt and OUT/log.csv)')
    t.add_argument('--data', default=os.environ.get('DDPM_DATA', './data'), help='MNIST folder (env DDPM_DATA)')
    t.add_argument('--out', help="folder for ckpt.pt and log.csv (none: runs/mnist, or --resume's folder)")
    t.add_argument('--epochs', type=number(int, 1), default=60, help='passes over the training set')
    t.add_argument('--minutes', type=number(float, 0.01), help='wall-clock budget; the schedule ends on time')
    t.add_argument('--batch', type=number(int, 1), default=32, help='images per step')
    t.add_argument('--lr', type=number(float, 1e-8, 1.0), default=3e-3, help='peak Adam learning rate')
    t.add_argument('--ema', type=number(float, 0.0, 0.99999), default=0.999, help='EMA decay (0: no EMA)')
    t.add_argument('--T', type=number(int, 1, 10000), default=200, help='diffusion steps')
    t.add_argument('--schedule', choices=('linear', 'cosine'), default='cosine', help='noise schedule')
    t.add_argument('--target', choices=('eps', 'v'), default='eps', help='what the network predicts')
    t.add_argument('--weight-max', type=number(float, 1.0), default=5.0, help='eps loss: t weighs min(1/abar_t, this)')
    t.add_argument('--beta-start', type=number(float, 1e-8, 0.999), default=1e-4, help='linear schedule: first beta')
    t.add_argument('--beta-end', type=number(float, 1e-8, 0.999), default=0.1, help='linear schedule: last beta')
    t.add_argument('--widths', type=widths, default=(32, 64, 128, 256), help='channels per U-Net level')
    t.add_argument('--depth', type=number(int, 1, 8), default=2, help='3x3 convs per U-Net block (extra: residual)')
    t.add_argument('--cond', action='store_true', help='class-conditional, for sample --digit')
    t.add_argument('--limit', type=number(int, 1), help='train on the first N images only (smoke runs)')
    t.add_argument('--resume', metavar='CKPT', help='continue this checkpoint; flags left out keep its values')
    s = sub.add_parser('sample', formatter_class=fmt, help='draw samples from a checkpoint')
    s.add_argument('--ckpt', default='runs/mnist/ckpt.pt', help="checkpoint (train's default output)")
    s.add_argument('--out', default='grid.png', help="image grid of the first 400 samples ('' for none)")
    s.add_argument('--n', type=number(int, 1, 10**6), default=64, help='number of samples')
    s.add_argument('--npz', help='also write the samples as uint8 (N, H, W[, C]) to this .npz, for fid.py')
    s.add_argument('--sampler', choices=('ddpm', 'ddim', 'dpm++'), default='dpm++', help='reverse process')
    s.add_argument('--steps', type=number(int, 1), help='ddim, dpm++ steps (none: 50, or T if less; ddpm: all T)')
    s.add_argument('--eta', type=number(float, 0.0, 1.0), default=1.0, help='ddim, dpm++ noise (1: SDE, 0: ODE)')
    s.add_argument('--digit', choices=[str(d) for d in range(10)] + ['all'], help='digit to draw (--cond models)')
    s.add_argument('--guidance', type=number(float, 0.0, 100.0), default=1.0, help='classifier-free guidance')
    s.add_argument('--batch', type=number(int, 1), default=500, help='samples per forward pass')
    s.add_argument('--clip', action='store_true', help="clip x0 to [-1, 1] each step, as Ho et al.'s code (a haze)")
    for q in (t, s):
        q.add_argument('--seed', type=int, default=0, help='seed of every random choice: same seed, same result')
        q.add_argument('--device', default=best, help='cpu, cuda, cuda:1 or mps; the default is the fastest here')
    for action in t._actions if given_only else ():  # flags left out stay unset, to tell them from flags typed
        action.default = argparse.SUPPRESS if action.dest in RESUMED else action.default
    return p

def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        if args.command == 'train':
            train(args, given=set(vars(build_parser(given_only=True).parse_args(argv))))
        else:
            generate(args)
    except Exception as e:  # bad input, a missing or damaged file, a full disk, out of memory: one line
        sys.exit(f'error: {brief(e)}')

if __name__ == '__main__':
    main()
