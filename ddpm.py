"""Denoising diffusion probabilistic models (Ho et al. 2020) in one file: noise schedule, ScoreNet U-Net, training
loop and samplers (DDPM, DDIM, DPM-Solver++), behind `python ddpm.py train|sample`. Copy this file into another
project and use its pieces on any (N, C, H, W) images in [-1, 1]:
    diffusion = Diffusion(T=200); model = ScoreNet(channels=3)
    loss = diffusion.loss(model, images); images = sample(model, diffusion, (16, 3, 32, 32))"""
import argparse, itertools, math, os, resource, signal, sys, tempfile, time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from PIL import Image
from torch.optim.swa_utils import AveragedModel
from torchvision.utils import make_grid, save_image

class DDPMError(Exception):
    """A user-facing problem (bad input, a missing file): the command line prints it as one line."""

# --- noise schedule and forward process ---------------------------------------------------------------------
class Diffusion:
    """A noise schedule and what derives from it. Steps run 1..T; index 0 is the clean image (abar 1)."""
    def __init__(self, T=200, schedule='linear', beta_start=1e-4, beta_end=0.1, device='cpu', target='eps'):
        if schedule not in ('linear', 'cosine') or target not in ('eps', 'v'):
            raise ValueError(f'unknown schedule {schedule!r} or target {target!r}')
        self.T, self.target = T, target
        if schedule == 'linear':
            betas = torch.linspace(beta_start, beta_end, T, dtype=torch.float64)
        else:  # cosine: Nichol & Dhariwal 2021, eq. 17, betas clipped at 0.999
            f = torch.cos((torch.arange(T + 1, dtype=torch.float64) / T + 0.008) / 1.008 * math.pi / 2) ** 2
            betas = (1 - f[1:] / f[:-1]).clamp(max=0.999)
        betas = torch.cat([torch.zeros(1, dtype=torch.float64), betas])
        abar = torch.cumprod(1 - betas, 0)
        abar_prev = torch.cat([abar[:1], abar[:-1]])  # abar[0] = 1
        one_minus = (1 - abar).clamp(min=1e-300)  # so that index 0 (no noise) gives 0, not 0 / 0
        # q(x_{t-1} | x_t, x_0) = N(post_c0 x_0 + post_ct x_t, post_var)   (Ho et al. eq. 6-7)
        post_c0, post_ct = betas * abar_prev.sqrt() / one_minus, (1 - abar_prev) * (1 - betas).sqrt() / one_minus
        self.betas, self.abar, self.post_c0, self.post_ct, self.post_var = (a.float().to(device) for a in (
            betas, abar, post_c0, post_ct, betas * (1 - abar_prev) / one_minus))
    def q_sample(self, x0, t, noise):
        """x_t ~ q(x_t | x_0) = N(sqrt(abar_t) x_0, (1 - abar_t) I), for a batch of steps t."""
        abar = self.abar[t].view(-1, *[1] * (x0.dim() - 1))
        return abar.sqrt() * x0 + (1 - abar).sqrt() * noise
    def loss(self, model, x0, labels=None, t=None, noise=None):
        """Mean squared error of the model's output, t uniform over 1..T unless given. The target is the noise
        eps, or for target 'v', v = sqrt(abar) eps - sqrt(1 - abar) x0 (Salimans & Ho 2022): at the noisiest steps
        eps says almost nothing about x0, so an eps model learns the shapes of digits slowly; v weighs x0 there."""
        t = torch.randint(1, self.T + 1, (x0.shape[0],), device=x0.device) if t is None else t
        noise = torch.randn_like(x0) if noise is None else noise
        abar = self.abar[t].view(-1, *[1] * (x0.dim() - 1))
        target = noise if self.target == 'eps' else abar.sqrt() * noise - (1 - abar).sqrt() * x0
        return F.mse_loss(model(self.q_sample(x0, t, noise), t / self.T, labels), target)
    def predict(self, model, x, t, labels=None, guidance=0.0):
        """(eps, x0) at step t (an int), x0 clipped to [-1, 1]; classifier-free guidance when labels are given."""
        tt = torch.full((x.shape[0],), t / self.T, device=x.device)
        if labels is None or guidance == 0:
            out = model(x, tt, labels)
        else:  # one forward pass of 2N: conditional, then unconditional ("no label" = num_classes)
            null = torch.full_like(labels, model.num_classes)
            out_c, out_u = model(torch.cat([x, x]), torch.cat([tt, tt]), torch.cat([labels, null])).chunk(2)
            out = (1 + guidance) * out_c - guidance * out_u  # eps or v: either is linear in the other at fixed x
        abar = self.abar[t]
        x0 = ((x - (1 - abar).sqrt() * out) / abar.sqrt() if self.target == 'eps' else
              abar.sqrt() * x - (1 - abar).sqrt() * out).clamp(-1, 1)
        return (x - abar.sqrt() * x0) / (1 - abar).sqrt(), x0

# --- the ScoreNet: a time-dependent U-Net that predicts the noise eps(x_t, t) -------------------------------
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
    """U-Net: a full-resolution block, strided-conv downsampling, transposed-conv upsampling with skips, and
    a last conv that also sees x_t, so that the small noise of the last steps is removed along a short path.
    Padding keeps every size: any H, W >= 2 ** (levels - 1) works (28x28, 32x32, ...)."""
    def __init__(self, channels=1, widths=(32, 64, 128, 256), emb_dim=256, num_classes=0, depth=1):
        super().__init__()
        self.channels, self.num_classes, self.min_size = channels, num_classes, 2 ** (len(widths) - 1)
        self.register_buffer('freqs', torch.randn(emb_dim // 2) * 30)  # Gaussian Fourier features of t
        self.embed = nn.Sequential(nn.Linear(emb_dim, emb_dim), nn.SiLU())
        # one extra label index means "no label", for classifier-free guidance (Ho & Salimans 2022)
        self.label_embed = nn.Embedding(num_classes + 1, emb_dim) if num_classes else None
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
            raise ValueError(f'ScoreNet expects (N, {self.channels}, H, W) with H, W >= {self.min_size}, '
                             f'got {tuple(x.shape)}')
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
@torch.inference_mode()
def sample(model, diffusion, shape, sampler='ddpm', steps=None, eta=0.0, labels=None, guidance=0.0,
           generator=None, frames=None, spacing='logsnr'):
    """Images of `shape` (N, C, H, W) in [-1, 1]: 'ddpm' is Ho et al.'s Algorithm 2 on all T steps; 'ddim' (Song
    et al. 2020) and 'dpm++' (DPM-Solver++(2M), Lu et al. 2022) take `steps` steps, even in log-SNR ('logsnr':
    short steps at both ends) or in t ('uniform'). `frames` (a list) collects every step's x, for animations."""
    d, device = diffusion, next(model.parameters()).device
    steps = d.T if sampler == 'ddpm' or steps is None else steps
    if sampler not in ('ddpm', 'ddim', 'dpm++') or spacing not in ('logsnr', 'uniform') or not 1 <= steps <= d.T:
        raise ValueError(f'{sampler} {spacing} {steps}: use ddpm, ddim or dpm++; logsnr or uniform; steps in 1..{d.T}')
    ts = torch.linspace(d.T, 0, steps + 1).round().long().tolist()
    lam = 0.5 * torch.log(d.abar / (1 - d.abar)).cpu()  # log signal-to-noise ratio (inf at step 0)
    for m in itertools.count(steps) if spacing == 'logsnr' and steps < d.T else ():  # m targets even in lam, each
        ts = (lam[1:, None] - torch.linspace(lam[d.T], lam[1], m)).abs().argmin(0).add(1).unique().flip(0).tolist()
        if len(ts := ts + [0]) > steps:  # to its nearest step; close targets merge, so m grows until `steps` remain
            break
    x, x0_prev = torch.randn(shape, generator=generator, device=device), None
    noise = lambda: torch.randn(shape, generator=generator, device=device)
    for i, (t, s) in enumerate(zip(ts[:-1], ts[1:])):
        eps, x0 = d.predict(model, x, t, labels, guidance)
        if sampler == 'ddpm':  # the posterior q(x_{t-1} | x_t, x0) with the predicted x0
            x = d.post_c0[t] * x0 + d.post_ct[t] * x + d.post_var[t].sqrt() * noise()
        elif sampler == 'ddim':  # eq. 12 of Song et al.; eta = 1 on all steps is the DDPM posterior
            sigma = eta * ((1 - d.abar[s]) / (1 - d.abar[t]) * (1 - d.abar[t] / d.abar[s])).sqrt()
            x = d.abar[s].sqrt() * x0 + (1 - d.abar[s] - sigma ** 2).sqrt() * eps + sigma * noise()
        elif s == 0:  # dpm++ with no noise left: the step lands on x0
            x = x0
        else:  # dpm++: multistep, data-prediction form, first step first order; eta > 0: the SDE form (eta 1)
            h, sigma = lam[s] - lam[t], (1 - d.abar[s]).sqrt()
            D = x0 if x0_prev is None else x0 + (x0 - x0_prev) * h / (2 * (lam[t] - lam[ts[i - 1]]))
            x = sigma / (1 - d.abar[t]).sqrt() * (-eta * h).exp() * x - d.abar[s].sqrt() * (-(1 + eta) * h).expm1() * D
            x = x + sigma * (-torch.expm1(-2 * eta * h)).sqrt() * noise() if eta else x
        x0_prev = x0
        if frames is not None:
            frames.append(x.clamp(-1, 1).cpu())
    return x.clamp(-1, 1)

# --- data and images ----------------------------------------------------------------------------------------
DATASETS = {'mnist': 'MNIST', 'fashion': 'FashionMNIST', 'cifar10': 'CIFAR10'}

def load_images(dataset, root, train=True, limit=None):
    """A torchvision dataset as one float tensor (N, C, H, W) in [-1, 1] and its labels (N,)."""
    try:
        ds = getattr(torchvision.datasets, DATASETS[dataset])(root, train=train, download=True)
    except Exception as e:  # no data and no network, a corrupt download, ...
        raise DDPMError(f'cannot load {dataset} from {root!r}: {str(e).splitlines()[0]}')
    x = torch.as_tensor(ds.data)[:limit]
    x = x[:, None] if x.dim() == 3 else x.permute(0, 3, 1, 2)  # gray (N, H, W) or color (N, H, W, C)
    return x.float() / 127.5 - 1, torch.as_tensor(ds.targets)[:limit]

def to_uint8(x):  # [-1, 1] floats (N, C, H, W) to uint8 arrays (N, H, W), or (N, H, W, C) for color
    x = ((x + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return x[..., 0] if x.shape[-1] == 1 else x

# --- checkpoints: one file with everything needed to sample or to resume exactly ----------------------------
FORMAT, LEGACY = 'ddpm.py checkpoint v1', {'depth': 1, 'target': 'eps'}  # LEGACY: older checkpoints' implied keys
MODEL = ('dataset', 'widths', 'depth', 'cond', 'T', 'schedule', 'beta_start', 'beta_end', 'target')  # fixed by one
RESUMED = (*MODEL, 'epochs', 'minutes', 'batch', 'lr', 'ema', 'p_uncond', 'every', 'limit', 'seed')

def save_checkpoint(path, state):  # a temporary file, fsync, rename: a crash leaves the old or the new file
    tmp = Path(f'{path}.tmp')
    try:
        with open(tmp, 'wb') as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise DDPMError(f'cannot write checkpoint {path}: {e.strerror or e}')

def load_checkpoint(path):  # weights_only refuses pickles that would run code
    if not Path(path).is_file():
        raise DDPMError(f'checkpoint {path} not found (train one with: python ddpm.py train)')
    try:
        ckpt = torch.load(path, map_location='cpu', weights_only=True)
    except Exception as e:
        raise DDPMError(f'{path} is not a readable ddpm.py checkpoint: {str(e).splitlines()[0]}')
    if not isinstance(ckpt, dict) or ckpt.get('format') != FORMAT:
        raise DDPMError(f'{path} is not a ddpm.py checkpoint')
    return ckpt | {part: LEGACY | ckpt[part] for part in ('args', 'config') if part in ckpt}

def build(c, device):  # the diffusion and the model that a checkpoint's config `c` describes
    model = ScoreNet(c['shape'][0], c['widths'], 256, 10 if c['cond'] else 0, c['depth']).to(device)
    return Diffusion(c['T'], c['schedule'], c['beta_start'], c['beta_end'], device, c['target']), model

def pick_device(name):  # 'auto': CUDA (under torchrun, this process's GPU), then MPS, then the CPU
    cuda, mps = torch.cuda.is_available(), torch.backends.mps.is_available()
    if name == 'auto':
        name = f'cuda:{os.environ.get("LOCAL_RANK", 0)}' if cuda else 'mps' if mps else 'cpu'
    if name.startswith('cuda') and not cuda or name == 'mps' and not mps:
        raise DDPMError(f'--device {name} is not available on this machine')
    return torch.device(name)

# --- training -----------------------------------------------------------------------------------------------
def ema_update(decay):  # an EMA whose decay warms up as (1 + n) / (10 + n) to `decay`, so that a short run is
    def update(ema_params, params, n):  # not dragged toward the initialization; decay 0: a copy of the weights
        torch._foreach_lerp_(ema_params, params, 1 - min(decay, (1 + n.item()) / (10 + n.item())))
    return update

def check_writable(folder):  # fail now, not after an epoch of work, if `folder` is not writable
    Path(folder).mkdir(parents=True, exist_ok=True)
    tempfile.TemporaryFile(dir=folder).close()

def train(args):
    rank, world = int(os.environ.get('RANK', 0)), int(os.environ.get('WORLD_SIZE', 1))  # set by torchrun
    device, out, log = pick_device(args.device), Path(args.out), print if rank == 0 else lambda *a, **k: None
    if world > 1:  # DDP: each of the `world` processes takes its share of every batch; rank 0 logs and saves
        dist.init_process_group()  # nccl for CUDA tensors, gloo for CPU ones
    check_writable(out)
    ckpt_path, ckpt = out / 'ckpt.pt', load_checkpoint(args.resume) if args.resume else None
    defaults = vars(build_parser().parse_args(['train']))
    for k in RESUMED if ckpt else ():  # flags left at their defaults continue the checkpoint's run
        saved = ckpt['args'].get(k, defaults[k])
        if k in MODEL and getattr(args, k) not in (defaults[k], saved):
            raise DDPMError(f'--{k.replace("_", "-")} {getattr(args, k)} contradicts the checkpoint ({saved})')
        setattr(args, k, saved if getattr(args, k) == defaults[k] else getattr(args, k))
    torch.manual_seed(args.seed)
    images, labels = (a.to(device) for a in load_images(args.dataset, args.data, train=True, limit=args.limit))
    config = {k: getattr(args, k) for k in MODEL} | {'shape': tuple(images.shape[1:])}
    diffusion, model = build(config, device)
    ema = AveragedModel(model, multi_avg_fn=ema_update(args.ema))
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    batch = min(args.batch, len(images))
    steps_per_epoch = len(images) // batch
    if batch % world:
        raise DDPMError(f'--batch {batch} does not split evenly over {world} processes')
    mine = slice(rank * batch // world, (rank + 1) * batch // world)  # this process's share of each batch
    net = nn.parallel.DistributedDataParallel(model) if world > 1 else model  # averages the gradients
    net = torch.compile(net) if args.compile else net
    total = cap = args.epochs * steps_per_epoch  # with --minutes, re-planned every step from the measured pace
    warmup = lambda: min(500, max(1, total // 10))  # 500 steps; short runs warm up for a tenth of their steps
    scheduler = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1, (s + 1) / warmup()) *  # linear warm-up,
                                                  0.5 * (1 + math.cos(math.pi * min(s / total, 1))))  # cosine to 0
    parts = {'model': model, 'optimizer': opt, 'scheduler': scheduler, 'ema': ema.module}  # saved state_dicts
    step, used = 0, 0.0
    if ckpt:
        for name, part in parts.items():
            part.load_state_dict(ckpt[name])
        ema.n_averaged.fill_(ckpt['ema_n'])
        step, used = ckpt['step'], ckpt.get('seconds', 0.0)
        torch.set_rng_state(ckpt['rng'][0])
        torch.cuda.set_rng_state_all(ckpt['rng'][1:])  # no-op without CUDA
        log(f'resumed {args.resume} at step {step} (epoch {step / steps_per_epoch:.2f})')
    def save():
        save_checkpoint(ckpt_path, {k: p.state_dict() for k, p in parts.items()} | {
            'format': FORMAT, 'config': config, 'args': vars(args), 'step': step, 'total': total, 'seconds': seconds(),
            'ema_n': int(ema.n_averaged), 'rng': [torch.get_rng_state(), *torch.cuda.get_rng_state_all()]})
    seconds = lambda: used + time.time() - t0  # training time of this run, all sessions together
    stop = []  # the name of the signal that asked us to stop
    def on_signal(signum, frame):
        if stop:  # a second Ctrl-C: leave at once
            os._exit(130)
        stop.append(signal.Signals(signum).name)
        log(f'\n{stop[0]}: finishing this step, then saving (Ctrl-C again quits at once)', file=sys.stderr)
    handlers = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    log(f'training {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters on {len(images)} images: '
        f'{total} steps of {batch} on {device}' + (f', at most {args.minutes:g} minutes' if args.minutes else ''))
    start_step, t0 = step, time.time()
    last_log, loss_sum, loss_count, order = t0, 0.0, 0, None
    try:
        while step < total and not stop:
            epoch, i = divmod(step, steps_per_epoch)
            if order is None or i == 0:  # a fixed shuffle per epoch, so a resumed run sees the same batches
                order = torch.randperm(len(images), generator=torch.Generator().manual_seed(
                    args.seed * 100_003 + epoch)).to(device)
            idx = order[i * batch:(i + 1) * batch]
            x0, y = images[idx], None
            if args.cond:  # labels drop to "no label" (10) at rate p_uncond: one model, both modes
                y = torch.where(torch.rand(batch, device=device) < args.p_uncond, 10, labels[idx])[mine]
            # every process draws the whole batch's t and noise and takes its share: K processes draw what one would
            t, noise = torch.randint(1, diffusion.T + 1, (batch,), device=device), torch.randn_like(x0)
            with torch.autocast(device.type, torch.bfloat16, enabled=args.amp):
                loss = diffusion.loss(net, x0[mine], y, t[mine], noise[mine])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            ema.update_parameters(model)
            step, loss_sum, loss_count = step + 1, loss_sum + loss.detach(), loss_count + 1
            if args.minutes:  # end the schedule when the budget ends, at the pace so far
                total = min(cap, step + max(0, round((args.minutes * 60 - seconds()) * step / seconds())))
            if world > 1:  # all processes take the shortest plan and stop if one was asked to, or they would hang
                plan = torch.tensor([-total, len(stop)], device=device)
                dist.all_reduce(plan, dist.ReduceOp.MAX)
                total, stop = -int(plan[0]), stop or ['SIGTERM'] * int(plan[1])
            scheduler.step()
            saving = step == total or step % steps_per_epoch == 0 and step // steps_per_epoch % args.every == 0
            if saving or time.time() - last_log >= 5:  # a progress line every 5 s; only here is the loss read
                now, lr, mean_loss = time.time(), scheduler.get_last_lr()[0], loss_sum.item() / loss_count
                elapsed, rate, last_log = now - t0, loss_count * batch / max(now - last_log, 1e-3), now  # recent pace
                if not math.isfinite(mean_loss):
                    raise DDPMError(f'loss became {mean_loss} by step {step}: training diverged; try a lower '
                                    f'--lr than {args.lr} (the last good checkpoint, {ckpt_path}, is kept)')
                if rank == 0:
                    with open(out / 'log.csv', 'a') as f:  # for loss curves: step, epoch, loss, lr, seconds
                        f.write(f'{step},{step / steps_per_epoch:.3f},{mean_loss:.5f},{lr:.3e},{elapsed:.1f}\n')
                log(f'epoch {epoch + 1} step {step}/{total} loss {mean_loss:.4f} lr {lr:.2e} {rate:.0f} img/s '
                    f'{elapsed / 60:.1f}m eta {(total - step) * batch / rate / 60:.1f}m', flush=True)
                loss_sum, loss_count = 0.0, 0
            if saving and rank == 0:
                save()  # and a grid, in 20 DPM-Solver++ SDE steps: a tenth of the time of all T steps
                n, digits = (100, torch.arange(100, device=device) % 10) if args.cond else (64, None)
                x = sample(ema.module, diffusion, (n, *config['shape']), 'dpm++', min(20, diffusion.T), 1.0, digits,
                           guidance=1.0, generator=torch.Generator(device).manual_seed(0))  # leaves the training RNG
                save_image((x + 1) / 2, out / f'samples_epoch{epoch + 1}.png', nrow=round(math.sqrt(n)))
    finally:
        for s, handler in handlers.items():
            signal.signal(s, handler)
        if world > 1:
            dist.destroy_process_group()
    if stop:
        save() if rank == 0 else sys.exit(1)
        sys.exit(f'{stop[0]} at step {step}: saved {ckpt_path}; continue with: python ddpm.py train '
                 f'--resume {ckpt_path} --out {out}')  # flags left out continue the checkpoint's run
    wall, peak = time.time() - t0, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # MB
    peak = f'{torch.cuda.max_memory_allocated() / 2**20:.0f} MB GPU' if device.type == 'cuda' else f'{peak:.0f} MB RSS'
    log(f'done: {step - start_step} steps in {wall / 60:.1f}m, {(step - start_step) * batch / wall:.0f} '
        f'img/s, peak memory {peak}; checkpoint {ckpt_path}')

# --- sampling command ---------------------------------------------------------------------------------------
def generate(args):
    device, ckpt = pick_device(args.device), load_checkpoint(args.ckpt)
    diffusion, model = build(ckpt['config'], device)
    model.load_state_dict(ckpt['model' if args.no_ema else 'ema'])
    n, nrow, labels, steps = args.n, None, None, args.steps or min(50, diffusion.T)  # ddim, dpm++: 50 or T steps
    if args.digit is not None:
        if not ckpt['config']['cond']:
            raise DDPMError(f'{args.ckpt} was trained without --cond, so it cannot draw a chosen --digit')
        nrow = math.ceil(n / 10) if args.digit == 'all' else None  # 'all': one row per digit
        labels = (torch.arange(n) // nrow if args.digit == 'all' else torch.full((n,), int(args.digit))).to(device)
    for path in (outputs := [p for p in (args.out, args.npz, args.gif) if p]):
        check_writable(Path(path).parent)
    gen, chunks, frames, t0 = torch.Generator(device).manual_seed(args.seed), [], [], time.time()
    for start in range(0, n, args.batch):
        b = min(args.batch, n - start)
        chunks.append(sample(model, diffusion, (b, *ckpt['config']['shape']), args.sampler, steps, args.eta,
                             None if labels is None else labels[start:start + b], args.guidance, gen,
                             frames if start == 0 and args.gif else None, args.spacing).cpu())
        print(f'{start + b}/{n} samples, {(start + b) / (time.time() - t0):.1f} samples/s', flush=True)
    x, seconds, nfe = torch.cat(chunks), time.time() - t0, diffusion.T if args.sampler == 'ddpm' else steps
    if args.out:
        save_image((x[:400] + 1) / 2, args.out, nrow=nrow or math.ceil(math.sqrt(min(n, 400))))
    if args.npz:
        np.savez_compressed(args.npz, samples=to_uint8(x))
    if args.gif:
        save_gif(frames, args.gif)
    print(f'done: {n} samples in {seconds:.1f}s, {n / seconds:.1f} samples/s, {args.sampler} with {nfe} network '
          f'evaluations each; wrote {", ".join(outputs)}')

def save_gif(frames, path, count=40):  # the first 64 images' reverse process in `count` frames, the last held
    count = min(count, len(frames))
    picks = [frames[round(i * (len(frames) - 1) / max(count - 1, 1))][:64] for i in range(count)]
    images = [Image.fromarray(to_uint8(make_grid(f, nrow=8, pad_value=1)[None])[0]) for f in picks]
    images[0].save(path, save_all=True, append_images=images[1:], duration=[80] * (count - 1) + [2000], loop=0)

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
    ws = tuple(number(int, 1)(w) for w in text.split(','))
    if len(ws) < 2:
        raise argparse.ArgumentTypeError(f'--widths needs two or more levels, got {text!r}')
    return ws

def build_parser():
    p = Parser(description='Denoising diffusion (DDPM) on MNIST: train a model, then sample digits.')
    sub, fmt = p.add_subparsers(dest='command', required=True), argparse.ArgumentDefaultsHelpFormatter
    t = sub.add_parser('train', formatter_class=fmt, help='train a model (writes OUT/ckpt.pt and sample grids)')
    t.add_argument('--data', default=os.environ.get('DDPM_DATA', './data'), help='dataset folder (env DDPM_DATA)')
    t.add_argument('--dataset', choices=DATASETS, default='mnist', help='torchvision dataset')
    t.add_argument('--out', default='runs/mnist', help='folder for ckpt.pt, samples_epochE.png and log.csv')
    t.add_argument('--epochs', type=number(int, 1), default=60, help='passes over the training set')
    t.add_argument('--minutes', type=number(float, 0.01), help='wall-clock budget; the schedule ends on time')
    t.add_argument('--batch', type=number(int, 1), default=32, help='images per step')
    t.add_argument('--lr', type=number(float, 1e-8, 1.0), default=3e-3, help='peak Adam learning rate')
    t.add_argument('--ema', type=number(float, 0.0, 0.99999), default=0.999, help='EMA decay (0: no EMA)')
    t.add_argument('--T', type=number(int, 1, 10000), default=200, help='diffusion steps')
    t.add_argument('--schedule', choices=('linear', 'cosine'), default='cosine', help='noise schedule')
    t.add_argument('--target', choices=('eps', 'v'), default='eps', help='what the network predicts')
    t.add_argument('--beta-start', type=number(float, 1e-8, 0.999), default=1e-4, help='linear schedule: first beta')
    t.add_argument('--beta-end', type=number(float, 1e-8, 0.999), default=0.1, help='linear schedule: last beta')
    t.add_argument('--widths', type=widths, default=(32, 64, 128, 256), help='channels per U-Net level')
    t.add_argument('--depth', type=number(int, 1, 8), default=2, help='3x3 convs per U-Net block (extra: residual)')
    t.add_argument('--cond', action='store_true', help='class-conditional, for sample --digit')
    t.add_argument('--p-uncond', type=number(float, 0.0, 1.0), default=0.1, help='label dropout with --cond')
    t.add_argument('--every', type=number(int, 1), default=1, help='checkpoint and grid every N epochs')
    t.add_argument('--limit', type=number(int, 1), help='train on the first N images only (smoke runs)')
    t.add_argument('--compile', action='store_true', help='torch.compile the model (slow start, may run faster)')
    t.add_argument('--amp', action='store_true', help='bfloat16 autocast (for CUDA)')
    t.add_argument('--resume', metavar='CKPT', help='continue this checkpoint (--epochs may extend the run)')
    s = sub.add_parser('sample', formatter_class=fmt, help='draw samples from a checkpoint')
    s.add_argument('--ckpt', default='runs/mnist/ckpt.pt', help="checkpoint (train's default output)")
    s.add_argument('--out', default='grid.png', help="PNG grid of the first 400 samples ('' for none)")
    s.add_argument('--n', type=number(int, 1), default=64, help='number of samples')
    s.add_argument('--npz', help='also write the samples as uint8 (N, H, W[, C]) to this .npz, for fid.py')
    s.add_argument('--gif', help='also write the denoising of the first 64 samples as an animated GIF')
    s.add_argument('--sampler', choices=('ddpm', 'ddim', 'dpm++'), default='dpm++', help='reverse process')
    s.add_argument('--steps', type=number(int, 1), help='ddim, dpm++ steps (none: 50, or T if less; ddpm: all T)')
    s.add_argument('--eta', type=number(float, 0.0, 1.0), default=1.0, help='ddim, dpm++ noise (1: SDE, 0: ODE)')
    s.add_argument('--spacing', choices=('logsnr', 'uniform'), default='logsnr', help='steps even in log-SNR or in t')
    s.add_argument('--digit', choices=[str(d) for d in range(10)] + ['all'], help='digit to draw (--cond models)')
    s.add_argument('--guidance', type=number(float, 0.0, 100.0), default=1.0, help='classifier-free guidance')
    s.add_argument('--batch', type=number(int, 1), default=500, help='samples per forward pass')
    s.add_argument('--no-ema', action='store_true', help='use the raw weights instead of the EMA')
    for q in (t, s):
        q.add_argument('--seed', type=int, default=0, help='seed of every random choice: same seed, same result')
        q.add_argument('--device', default='auto', help='auto (cuda, mps, cpu), cpu, cuda, cuda:1, mps')
    return p

def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        (train if args.command == 'train' else generate)(args)
    except (DDPMError, ValueError, OSError) as e:  # bad input, a missing file, a full disk: one line
        sys.exit(f'error: {e}')

if __name__ == '__main__':
    main()
