"""Denoising diffusion (Ho et al. 2020) in one file: the noise schedule, a ScoreNet U-Net, training,
three samplers (DDPM, DDIM, DPM-Solver++) behind `python ddpm.py train` and `python ddpm.py sample`.
Copied into another project, its pieces work on any (N, C, H, W) images in [-1, 1]."""
import signal, sys
if __name__ == '__main__':  # Ctrl-C from here on, even while torch loads, quits in one line
    signal.signal(signal.SIGINT, lambda signum, frame: sys.exit('interrupted'))
import argparse, copy, io, math, os, shlex, tempfile, time
from pathlib import Path
import numpy as np, torch, torchvision
import torch.nn as nn, torch.nn.functional as F
from PIL import Image
try:  # file locks, where the platform has them (not on Windows)
    import fcntl
except ImportError:
    fcntl = None

class DDPMError(Exception):
    """A user-facing problem (bad input, a missing file): the command line prints it as one line."""
def one_line(error):
    """An exception in one line, with its type unless its message was written for users."""
    message = ' '.join(str(error).split())[:300]
    user_facing = isinstance(error, (DDPMError, ValueError, OSError))
    return message if user_facing else f'{type(error).__name__} {message}'

# --- The noise schedule and the forward process ---------------------------------------------------
class Diffusion:
    """A noise schedule: steps 1..T, and 0 for the clean image; tables on the CPU, used anywhere."""
    def __init__(self, T=200, schedule='cosine', beta_start=1e-4, beta_end=0.1, target='eps'):
        if schedule not in ('linear', 'cosine') or target not in ('eps', 'v'):
            raise ValueError(f'unknown schedule {schedule!r} or target {target!r}')
        self.T, self.target = T, target
        if schedule == 'linear':  # Ho et al.'s schedule, with the original project's beta_end
            betas = torch.linspace(beta_start, beta_end, T, dtype=torch.float64)
        else:  # cosine: Nichol & Dhariwal 2021, eq. 17, betas clipped at 0.999
            fraction = torch.arange(T + 1, dtype=torch.float64) / T
            f = torch.cos((fraction + 0.008) / 1.008 * math.pi / 2) ** 2
            betas = (1 - f[1:] / f[:-1]).clamp(max=0.999)
        betas = torch.cat([torch.zeros(1, dtype=torch.float64), betas])
        self.betas, self.abar = betas.float(), torch.cumprod(1 - betas, 0).float()
        self.lam = 0.5 * torch.log(self.abar / (1 - self.abar))  # log-SNR: the samplers' steps
        if not (self.lam[1:].isfinite().all() and (self.lam[2:] < self.lam[1:-1]).all()):
            raise ValueError(f'{schedule} schedule, T={T}: abar must fall step by step '
                             'from 1 to above 0 in float32')
    def abar_of(self, t, x):
        """abar at steps t (N,), shaped to scale a batch x. The table moves to x's device, once."""
        self.abar = self.abar.to(x.device)
        return self.abar[t].view(-1, *[1] * (x.dim() - 1))
    def q_sample(self, x0, t, noise):
        """x_t ~ q(x_t | x_0) = N(sqrt(abar_t) x_0, (1 - abar_t) I), for a batch of steps t."""
        abar = self.abar_of(t, x0)
        return abar.sqrt() * x0 + (1 - abar).sqrt() * noise
    def loss(self, model, x0, labels=None, *, t=None, noise=None, weight_max=5.0):
        """The loss of a batch x0 (t uniform, noise normal): eps's squared error weighted by
        min(1 / abar_t, weight_max), the v loss's weight capped near T; or v's plain error."""
        t = torch.randint(1, self.T + 1, (len(x0),), device=x0.device) if t is None else t
        noise = torch.randn_like(x0) if noise is None else noise
        abar = self.abar_of(t, x0)
        if self.target == 'eps':
            target, weight = noise, (1 / abar).clamp(max=weight_max)
        else:
            target, weight = abar.sqrt() * noise - (1 - abar).sqrt() * x0, 1.0
        prediction = model(self.q_sample(x0, t, noise), t / self.T, labels)
        return (weight * (prediction - target) ** 2).mean()
    def predict(self, model, x, t, labels=None, *, guidance=0.0, clip=False):
        """The model's (eps, x0) for images x at step t, an int; with labels, classifier-free
        guidance: (1 + w) out(label) - w out(no label). clip: x0 clipped to [-1, 1] (see README)."""
        tt = torch.full((x.shape[0],), t / self.T, device=x.device)
        if labels is None or guidance == 0:
            out = model(x, tt, labels)
        else:  # one forward pass of 2N: conditional, then unconditional; eps and v mix alike
            no_label = torch.full_like(labels, model.num_classes)
            out = model(torch.cat([x, x]), torch.cat([tt, tt]), torch.cat([labels, no_label]))
            out = (1 + guidance) * out[:len(x)] - guidance * out[len(x):]
        abar = self.abar[t]
        if self.target == 'eps':
            x0 = (x - (1 - abar).sqrt() * out) / abar.sqrt()
        else:
            x0 = abar.sqrt() * x - (1 - abar).sqrt() * out
        x0 = x0.clamp(-1, 1) if clip else x0
        return (x - abar.sqrt() * x0) / (1 - abar).sqrt(), x0

# --- The ScoreNet: a time-dependent U-Net that predicts the noise eps(x_t, t), or v ---------------
class Block(nn.Module):
    """A 3x3 conv (stride 2 halves the size; `up` doubles it to the skip's `size`, else ambiguous),
    time embedding, GroupNorm, SiLU; then depth - 1 residual convs, h + SiLU(GroupNorm(conv(h)))."""
    def __init__(self, c_in, c_out, emb_dim, *, stride=1, up=False, depth=1):
        super().__init__()
        conv = nn.ConvTranspose2d if up else nn.Conv2d
        self.conv = conv(c_in, c_out, 3, stride=2 if up else stride, padding=1)
        groups = math.gcd(c_out, 8)  # at most 8 groups, and a divisor of any width
        self.time, self.norm = nn.Linear(emb_dim, c_out), nn.GroupNorm(groups, c_out)
        self.extra = nn.ModuleList(  # depth - 1 more convs at the output size
            nn.Sequential(nn.Conv2d(c_out, c_out, 3, padding=1), nn.GroupNorm(groups, c_out),
                          nn.SiLU()) for _ in range(depth - 1))
    def forward(self, x, emb, size=None):
        h = self.conv(x) if size is None else self.conv(x, output_size=size)
        h = F.silu(self.norm(h + self.time(emb)[:, :, None, None]))
        for layer in self.extra:  # residual, so that the gradient keeps a short path
            h = h + layer(h)
        return h

class ScoreNet(nn.Module):
    """A U-Net of Blocks with skips, and a last conv that also sees x_t (a short path for the last
    steps' small noise); any H, W >= 2 ** (levels - 1). Label num_classes means "no label"."""
    def __init__(self, channels=1, widths=(32, 64, 128, 256), emb_dim=256, num_classes=0, depth=2):
        super().__init__()
        self.channels, self.num_classes = channels, num_classes
        self.min_size = 2 ** (len(widths) - 1)
        self.register_buffer('freqs', torch.randn(emb_dim // 2) * 30)  # Gaussian Fourier features
        self.embed = nn.Sequential(nn.Linear(emb_dim, emb_dim), nn.SiLU())
        self.label_embed = nn.Embedding(num_classes + 1, emb_dim) if num_classes else None
        ins, top = (channels, *widths[:-1]), len(widths) - 1
        self.down = nn.ModuleList(Block(c_in, c_out, emb_dim, stride=2 if j else 1, depth=depth)
                                  for j, (c_in, c_out) in enumerate(zip(ins, widths)))
        # up block j maps level j to j - 1; below the top it also gets level j's skip
        self.up = nn.ModuleList(Block(widths[j] * (1 if j == top else 2), widths[j - 1], emb_dim,
                                      up=True, depth=depth) for j in range(top, 0, -1))
        self.out = nn.Conv2d(2 * widths[0] + channels, channels, 3, padding=1)
    def forward(self, x, t, labels=None):
        """x: (N, C, H, W) noisy images; t: (N,) times in [0, 1]; labels: (N,) ints or None."""
        if x.dim() != 4 or x.shape[1] != self.channels or min(x.shape[2:]) < self.min_size:
            raise ValueError(f'ScoreNet takes (N, {self.channels}, H, W), H and W >= '
                             f'{self.min_size}: {tuple(x.shape)}')
        angles = 2 * math.pi * t[:, None] * self.freqs
        emb = self.embed(torch.cat([angles.sin(), angles.cos()], dim=1))
        if self.num_classes:  # no labels at all means "no label" for every image
            no_label = torch.full_like(t, self.num_classes, dtype=torch.long)
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
    """The steps, T first and 0 last, nearest to m targets even in log-SNR (DPM-Solver's advice)."""
    T, lam = diffusion.T, diffusion.lam.double().numpy()
    for m in range(steps, 100 * T):  # a target's nearest step: interpolated along log-SNR, rounded
        targets = np.linspace(lam[T], lam[1], m)
        ts = np.unique(np.interp(targets, lam[:0:-1], np.arange(T, 0, -1)).round())
        if len(ts) >= steps:
            return ts[::-1].astype(int).tolist() + [0]
    raise ValueError(f'cannot place {steps} steps evenly in log-SNR on this schedule')
@torch.inference_mode()
def sample(model, diffusion, shape, *, sampler='ddpm', steps=None, eta=0.0, labels=None,
           guidance=0.0, generator=None, clip=False):
    """Images of `shape` (N, C, H, W) in [-1, 1]. 'ddpm' is Ho et al.'s Algorithm 2 on all T steps;
    'ddim' (Song et al. 2020) and 'dpm++' (DPM-Solver++(2M), Lu et al. 2022) take `steps` steps
    (see sampling_steps), with noise eta (0: the ODE; 1: the SDE). The rest: Diffusion.predict."""
    d, device = diffusion, next(model.parameters()).device
    steps = d.T if steps is None or sampler == 'ddpm' else steps
    if sampler == 'ddpm':  # Algorithm 2's step, the posterior q(x_t-1 | x_t, x0), is DDIM's, eta 1
        sampler, eta = 'ddim', 1.0
    if sampler not in ('ddim', 'dpm++') or not 1 <= steps <= d.T:
        raise ValueError(f'{sampler}, {steps} steps: use ddpm, ddim or dpm++, steps in 1..{d.T}')
    ts, lam = sampling_steps(d, steps), d.lam
    x, x0_prev = torch.randn(shape, generator=generator, device=device), None
    for i, (t, s) in enumerate(zip(ts[:-1], ts[1:])):  # from step t to step s < t
        eps, x0 = d.predict(model, x, t, labels, guidance=guidance, clip=clip)
        if sampler == 'ddim':  # Song et al.'s eq. 12; at eta 1 the posterior q(x_s | x_t, x0)
            sigma = eta * ((1 - d.abar[s]) / (1 - d.abar[t]) * (1 - d.abar[t] / d.abar[s])).sqrt()
            x = d.abar[s].sqrt() * x0 + (1 - d.abar[s] - sigma ** 2).sqrt() * eps
            x = x + sigma * torch.randn(shape, generator=generator, device=device)
        elif s == 0:  # dpm++ with no noise left: the step lands on x0
            x = x0
        else:  # dpm++: a step h in log-SNR on the data prediction D (2M extrapolates; eta 1 SDE)
            h, D = lam[s] - lam[t], x0
            if x0_prev is not None:
                D = x0 + (x0 - x0_prev) * h / (2 * (lam[t] - lam[ts[i - 1]]))
            sigma_s, sigma_t = (1 - d.abar[s]).sqrt(), (1 - d.abar[t]).sqrt()
            x = sigma_s / sigma_t * (-eta * h).exp() * x
            x = x - d.abar[s].sqrt() * (-(1 + eta) * h).expm1() * D
            if eta:
                noise = torch.randn(shape, generator=generator, device=device)
                x = x + sigma_s * (-torch.expm1(-2 * eta * h)).sqrt() * noise
        x0_prev = x0
    return x.clamp(-1, 1)

# --- Data, files and the terminal -----------------------------------------------------------------
def load_mnist(root, train=True, limit=None):
    """MNIST (downloaded into root if missing): floats (N, 1, 28, 28) in [-1, 1], labels (N,)."""
    try:
        dataset = torchvision.datasets.MNIST(root, train=train, download=True)
    except Exception as e:  # no data and no network, a corrupt download, ...
        raise DDPMError(f'cannot load MNIST from {root!r}: {one_line(e)}')
    return dataset.data[:limit, None].float() / 127.5 - 1, dataset.targets[:limit]
def to_uint8(x):
    """Floats (N, C, H, W) in [-1, 1] as uint8 arrays (N, H, W), or (N, H, W, C) for color."""
    x = ((x + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return x[..., 0] if x.shape[-1] == 1 else x
def write_atomic(path, write):
    """write(f) to a temporary file, then rename it: a crash leaves the old file or the new one."""
    tmp = Path(f'{path}.{os.getpid()}.tmp')
    try:
        with open(tmp, 'wb') as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
def say(line, file=None):
    """Print a progress line; a closed or broken stdout (`| head`) then goes to /dev/null."""
    try:
        print(line, file=file or sys.stdout, flush=True)
    except (OSError, ValueError):
        os.dup2(os.open(os.devnull, os.O_WRONLY), (file or sys.stdout).fileno())

# --- Checkpoints: one file with everything needed to sample, or to resume exactly -----------------
FORMAT = 'ddpm.py checkpoint v1'
MODEL_FLAGS = ('widths', 'depth', 'cond', 'T', 'schedule', 'beta_start', 'beta_end', 'target')
RUN_FLAGS = (*MODEL_FLAGS, 'data', 'epochs', 'minutes', 'batch', 'lr', 'ema', 'weight_max', 'limit',
             'seed')  # train --resume takes these from the run unless typed
RESUME_PARTS = ('config', 'args', 'ema', 'model', 'optimizer', 'step', 'rng')  # what it must hold
def load_checkpoint(path, parts=('config', 'ema')):
    """The checkpoint at `path`, which must hold `parts`; weights_only refuses code in pickles."""
    if not Path(path).is_file():
        raise DDPMError(f'checkpoint {path} not found (train one with: python ddpm.py train)')
    try:
        ckpt = torch.load(path, map_location='cpu', weights_only=True)
    except Exception as e:
        raise DDPMError(f'{path} is not a readable ddpm.py checkpoint: {one_line(e)}')
    if not isinstance(ckpt, dict) or ckpt.get('format') != FORMAT:
        raise DDPMError(f'{path} is not a ddpm.py checkpoint')
    if not set(parts) <= ckpt.keys():
        raise DDPMError(f'{path} is incomplete: it lacks {sorted(set(parts) - ckpt.keys())}')
    return ckpt
def build(config, device, weights=None):
    """The diffusion and the model of a checkpoint's config, with `weights`, which must fit it."""
    if not (1 <= config['T'] <= 10_000 and all(1 <= size <= 4096 for size in config['shape'])):
        raise DDPMError(f"the config's T {config['T']} or shape {config['shape']} is out of range")
    diffusion = Diffusion(config['T'], config['schedule'], config['beta_start'], config['beta_end'],
                          config['target'])
    net = dict(channels=config['shape'][0], widths=config['widths'], depth=config['depth'],
               num_classes=10 if config['cond'] else 0)  # MNIST's digits, with --cond
    if weights is not None:
        with torch.device('meta'):  # shapes only: a file cannot make us build what it cannot fill
            for name, value in ScoreNet(**net).state_dict().items():
                if name not in weights or weights[name].shape != value.shape:
                    raise DDPMError(f'the weights do not fit the config at {name}')
    model = ScoreNet(**net).to(device)
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
    """model, its forward and backward as CUDA graphs for batches like x, labels y (else model)."""
    try:  # a replay launches hundreds of small kernels at once, reading inputs copied into these
        torch.cuda.set_device(x.device)  # the graphs' streams are the current device's
        return torch.cuda.make_graphed_callables(model, (x.clone(), x.new_zeros(len(x)), y.clone()))
    except Exception as e:  # an old GPU or driver, an op that cannot be recorded
        say(f'training without CUDA graphs: {one_line(e)}')
        return model
def open_run(out, resume):
    """OUT/log.csv to append to, locked while we live; another run's folder is left as it is."""
    log_path, ckpt_path = out / 'log.csv', out / 'ckpt.pt'
    if resume is None or Path(resume).resolve() != ckpt_path.resolve():  # never mix two runs
        if ckpt_path.exists():
            raise DDPMError(f'{out} holds another run: continue it with --resume '
                            f'{shlex.quote(str(ckpt_path))}, or pick another --out')
        if log_path.is_file() and log_path.stat().st_size > 0:
            raise DDPMError(f'{out} holds the log of a run that saved no checkpoint: delete '
                            f'{shlex.quote(str(log_path))} to reuse it, or pick another --out')
    out.mkdir(parents=True, exist_ok=True)
    log_file = open(log_path, 'a', buffering=1)  # fails where the folder is not writable
    try:
        if fcntl:  # even kill -9 drops the lock
            fcntl.flock(log_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        log_file.close()
        raise DDPMError(f'another train is running in {out}')
    return log_file
def catch_stop_signals(stop):
    """SIGINT or SIGTERM appends its name to `stop` (the loop saves, ends); a second quits now."""
    def handle(signum, frame):
        if stop:
            os._exit(130)
        stop.append(signal.Signals(signum).name)
        say(f'\n{stop[0]}: finishing this step, then saving (Ctrl-C again quits now)', sys.stderr)
    return {signum: signal.signal(signum, handle) for signum in (signal.SIGINT, signal.SIGTERM)}
def train(args, ckpt=None):
    """The train command: train on MNIST (continuing `ckpt`), saving OUT/ckpt.pt every epoch."""
    device = torch.device(args.device)
    out = Path(args.out or (Path(args.resume).parent if args.resume else 'runs/mnist'))
    ckpt_path = out / 'ckpt.pt'
    # The data, the model, its EMA and the optimizer; a checkpoint's step, seconds and RNG state.
    torch.manual_seed(args.seed)
    images, labels = (tensor.to(device) for tensor in load_mnist(args.data, limit=args.limit))
    config = {k: getattr(args, k) for k in MODEL_FLAGS} | {'shape': tuple(images.shape[1:])}
    diffusion, model = build(config, device, weights=ckpt['model'] if ckpt else None)
    ema = copy.deepcopy(model).requires_grad_(False)
    batch = min(args.batch, len(images))
    peak_lr = 3e-3 * math.sqrt(batch / 32) if args.lr is None else args.lr  # Adam's usual rule
    decay = 0.999 ** (batch / 32) if args.ema is None else args.ema  # its half-life in images kept
    opt = torch.optim.Adam(model.parameters(), lr=peak_lr, fused=device.type == 'cuda' or None)
    steps_per_epoch = len(images) // batch
    total = max_steps = args.epochs * steps_per_epoch  # --minutes re-plans total at every step
    step, seconds_before = (ckpt['step'], ckpt.get('seconds', 0.0)) if ckpt else (0, 0.0)
    if ckpt:
        ema.load_state_dict(ckpt['ema'])
        for group in ckpt['optimizer']['param_groups']:  # fused or not, as this run chose
            group['fused'] = opt.defaults['fused']
        opt.load_state_dict(ckpt['optimizer'])
        torch.set_rng_state(ckpt['rng'][0])
        torch.cuda.set_rng_state_all(ckpt['rng'][1:])  # no-op without CUDA
        if args.minutes and seconds_before >= 60 * args.minutes:
            raise DDPMError(f'{args.resume} has used its {args.minutes:g} minutes: raise --minutes')
        if step >= total:
            raise DDPMError(f'{args.resume} has finished its {step} steps: raise --epochs')
    log_file = open_run(out, args.resume)
    t0 = last_log = time.time()
    def save():
        state = {'format': FORMAT, 'config': config, 'model': model.state_dict(),
                 'ema': ema.state_dict(), 'optimizer': opt.state_dict(), 'step': step,
                 'total': total, 'seconds': seconds_before + time.time() - t0,
                 'args': vars(args) | {'data': os.path.abspath(args.data)},
                 'rng': [torch.get_rng_state(), *torch.cuda.get_rng_state_all()]}
        write_atomic(ckpt_path, lambda f: torch.save(state, f))
    say(f'training on {len(images)} images: steps {step} to {total}, of {batch}, on {device}'
        + (f', at most {args.minutes:g} minutes' if args.minutes else ''))
    net = cuda_graphed(model, images[:batch], labels[:batch]) if device.type == 'cuda' else model
    start_step, order = step, None
    stop, losses = [], []
    handlers = catch_stop_signals(stop)
    try:
        while step < total and not stop:
            # Batch: a fixed shuffle per epoch, so that a resumed run sees the same batches.
            epoch, i = divmod(step, steps_per_epoch)
            if order is None or i == 0:
                shuffle = torch.Generator().manual_seed(args.seed * 100_003 + epoch)
                order = torch.randperm(len(images), generator=shuffle).to(device)
            index = order[i * batch:(i + 1) * batch]
            x0, y = images[index], labels[index]  # an unconditional net ignores y
            if args.cond:  # a tenth of the labels drop to "no label": one model, both modes
                no_label = torch.rand(batch, device=device) < 0.1
                y = torch.where(no_label, model.num_classes, y)
            # Step.
            for group in opt.param_groups:
                group['lr'] = learning_rate(step, total, peak_lr)
            loss = diffusion.loss(net, x0, y, weight_max=args.weight_max)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            ema_update(ema, model, step, decay)
            step += 1
            losses.append(loss.detach())
            # Plan: with --minutes, end the schedule when the budget ends, at the pace so far.
            if args.minutes:
                seconds = seconds_before + time.time() - t0
                left = round((args.minutes * 60 - seconds) * step / seconds)
                total = min(max_steps, step + max(0, left))
            # Log every 5 s and at each epoch's end, to stdout and to OUT/log.csv (step, epoch,
            # loss, lr, seconds); only here is the loss read, as that waits for the device. Save.
            saving = step == total or step % steps_per_epoch == 0
            if saving or time.time() - last_log >= 5:
                now, mean_loss = time.time(), torch.stack(losses).mean().item()
                lr, epoch = learning_rate(step, total, peak_lr), step / steps_per_epoch
                rate, spent = len(losses) * batch / max(now - last_log, 1e-3), (now - t0) / 60
                print(f'{step},{epoch:.3f},{mean_loss:.5f},{lr:.3e},{now - t0:.1f}', file=log_file)
                say(f'epoch {math.ceil(epoch)} step {step}/{total} loss {mean_loss:.4f} lr {lr:.2e}'
                    f' {rate:.0f} img/s {spent:.1f}m eta {(total - step) * batch / rate / 60:.1f}m')
                last_log, losses = now, []
                if not math.isfinite(mean_loss):
                    kept = f'{ckpt_path} is kept' if ckpt_path.exists() else 'none was saved'
                    raise DDPMError(f'loss became {mean_loss} by step {step}; try a lower --lr '
                                    f'than {peak_lr:g} ({kept})')
            if saving:  # sample from OUT/ckpt.pt meanwhile to see how the run does
                save()
    finally:
        for signum, handler in handlers.items():
            signal.signal(signum, handler)
        log_file.close()
    if stop:
        save()
        sys.exit(f'{stop[0]} at step {step}: saved {ckpt_path}; continue: python ddpm.py train '
                 f'--resume {shlex.quote(str(ckpt_path))}')
    steps, wall = step - start_step, time.time() - t0
    say(f'done: {steps} steps in {wall / 60:.1f}m, {steps * batch / wall:.0f} img/s; {ckpt_path}')

# --- Sampling -------------------------------------------------------------------------------------
def check_outputs(args):
    """Before any work: some output, no folders, a grid type that Pillow can write (returned)."""
    if not (args.out or args.npz):
        raise DDPMError("nothing to write: --out '' and no --npz")
    image_type = Image.registered_extensions().get(Path(args.out).suffix.lower())
    try:  # Pillow reads more types than it writes, and some of its writers need a plugin or a mode
        if args.out:
            Image.new('RGB', (2, 2)).save(io.BytesIO(), format=image_type)
    except Exception:
        raise DDPMError(f'{args.out}: the grid needs a type Pillow writes, such as .png or .jpg')
    for path in filter(None, (args.out, args.npz)):
        if Path(path).is_dir():
            raise DDPMError(f'{path} is a folder: name a file')
    return image_type
def sample_command(args):
    """The sample command: samples from a checkpoint's EMA weights, as an .npz and a grid."""
    image_type = check_outputs(args)
    if args.ckpt is None:  # the trained run, or else the model that comes with ddpm.py
        shipped = Path(__file__).parent / 'assets' / ('mnist_cond.pt' if args.digit else 'mnist.pt')
        args.ckpt = 'runs/mnist/ckpt.pt' if Path('runs/mnist/ckpt.pt').exists() else shipped
        say(f'no --ckpt: sampling {args.ckpt}')
    device, ckpt = torch.device(args.device), load_checkpoint(args.ckpt)
    diffusion, model = build(ckpt['config'], device, weights=ckpt['ema'])
    if args.digit is not None and not ckpt['config']['cond']:
        raise DDPMError(f'{args.ckpt} was trained without --cond: it cannot draw a chosen --digit')
    for path in filter(None, (args.out, args.npz)):  # fail now, not after the work, if unwritable
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=Path(path).parent).close()
    n, steps = args.n, args.steps or min(50, diffusion.T)  # ddim, dpm++: 50 steps, or T if fewer
    labels = None  # --digit all: the ten digits in turn
    if args.digit is not None:
        labels = torch.arange(n) % 10 if args.digit == 'all' else torch.full((n,), int(args.digit))
    generator = torch.Generator(device).manual_seed(args.seed)
    chunks, t0 = [], time.time()
    for start in range(0, n, args.batch):
        size = min(args.batch, n - start)
        chunk_labels = None if labels is None else labels[start:start + size].to(device)
        x = sample(model, diffusion, (size, *ckpt['config']['shape']), sampler=args.sampler,
                   steps=steps, eta=args.eta, labels=chunk_labels, guidance=args.guidance,
                   generator=generator, clip=args.clip)
        chunks.append(x.cpu())
        say(f'{start + size}/{n} samples, {(start + size) / (time.time() - t0):.1f} samples/s')
    x, seconds = torch.cat(chunks), time.time() - t0
    # Write the .npz, then the grid of the first 400 (with --digit all, a column per digit).
    if args.npz:
        write_atomic(args.npz, lambda f: np.savez_compressed(f, samples=to_uint8(x)))
    if args.out:
        nrow = 10 if args.digit == 'all' else math.ceil(math.sqrt(min(n, 400)))
        write_atomic(args.out, lambda f: torchvision.utils.save_image((x[:400] + 1) / 2, f,
                                                                      nrow=nrow, format=image_type))
    evaluations, written = diffusion.T if args.sampler == 'ddpm' else steps, [args.npz, args.out]
    say(f'done: {n} samples in {seconds:.1f}s, {n / seconds:.1f} samples/s, {args.sampler} with '
        f'{evaluations} network evaluations each; wrote {", ".join(filter(None, written))}')

# --- The command line -----------------------------------------------------------------------------
class Parser(argparse.ArgumentParser):
    def error(self, message):
        """One line, not the usage block."""
        self.exit(2, f'{self.prog}: error: {message}\n')
def bounded(kind, lo, hi=math.inf):
    """An argparse type: a finite number of `kind` in [lo, hi]."""
    def parse(text):
        value = kind(text)  # argparse reports a ValueError as "invalid <kind> value"
        if not (math.isfinite(value) and lo <= value <= hi):
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
    t = commands.add_parser('train', formatter_class=formats, help='train a model (OUT/ckpt.pt)')
    t.add_argument('--data', default=os.environ.get('DDPM_DATA', './data'), help='MNIST folder')
    t.add_argument('--out', help="ckpt.pt and log.csv's folder (none: runs/mnist or --resume's)")
    t.add_argument('--epochs', type=bounded(int, 1), default=60, help='passes over the data')
    t.add_argument('--minutes', type=bounded(float, 0.01), help='budget: the schedule ends on time')
    t.add_argument('--batch', type=bounded(int, 1), default=32, help='images per step')
    t.add_argument('--lr', type=bounded(float, 1e-8, 1), help='peak, none: 3e-3*sqrt(batch/32)')
    t.add_argument('--ema', type=bounded(float, 0, 0.99999), help='decay, none: 0.999**(batch/32)')
    t.add_argument('--T', type=bounded(int, 1, 10_000), default=200, help='diffusion steps')
    t.add_argument('--schedule', choices=('linear', 'cosine'), default='cosine', help='noise')
    t.add_argument('--target', choices=('eps', 'v'), default='eps', help='what the net predicts')
    t.add_argument('--weight-max', type=bounded(float, 1), default=5.0, help='min(1/abar_t, this)')
    t.add_argument('--beta-start', type=bounded(float, 1e-8, 0.999), default=1e-4, help='linear')
    t.add_argument('--beta-end', type=bounded(float, 1e-8, 0.999), default=0.1, help='linear')
    t.add_argument('--widths', type=parse_widths, default='32,64,128,256', help='U-Net channels')
    t.add_argument('--depth', type=bounded(int, 1, 8), default=2, help='3x3 convs per U-Net block')
    t.add_argument('--cond', action='store_true', help='class-conditional, for sample --digit')
    t.add_argument('--limit', type=bounded(int, 1), help='train on the first N images (smoke runs)')
    t.add_argument('--resume', metavar='CKPT', help='continue a run: flags left out keep its own')
    s = commands.add_parser('sample', formatter_class=formats, help='samples from a checkpoint')
    s.add_argument('--ckpt', help='none: runs/mnist/ckpt.pt if there, else assets/mnist.pt')
    s.add_argument('--out', default='grid.png', help="grid of the first 400 samples ('': none)")
    s.add_argument('--npz', help='also write the samples as uint8 (N, H, W[, C]) for fid.py')
    s.add_argument('--n', type=bounded(int, 1, 10**6), default=64, help='number of samples')
    s.add_argument('--sampler', choices=('ddpm', 'ddim', 'dpm++'), default='dpm++', help='method')
    s.add_argument('--steps', type=bounded(int, 1), help='ddim, dpm++ steps (none: 50, or T)')
    s.add_argument('--eta', type=bounded(float, 0, 1), default=1.0, help='noise: 1 SDE, 0 ODE')
    s.add_argument('--digit', choices=[*map(str, range(10)), 'all'], help='for --cond models')
    s.add_argument('--guidance', type=bounded(float, 0, 100), default=1.0, help='classifier-free')
    s.add_argument('--batch', type=bounded(int, 1), default=500, help='samples per forward pass')
    s.add_argument('--clip', action='store_true', help='clip x0 to [-1, 1] in each step (a haze)')
    for p in (t, s):
        p.add_argument('--seed', type=int, default=0, help='same seed, same result')
        p.add_argument('--device', default=best, help='cpu, cuda, cuda:1 or mps')
    return parser, t
def main(argv=None):
    parser, train_parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.command == 'sample':
            return sample_command(args)
        ckpt = load_checkpoint(args.resume, RESUME_PARTS) if args.resume else None
        if ckpt:  # flags left out take the run's values; typed ones must agree with its model
            defaults = {}
            for name in RUN_FLAGS:  # in text, which argparse checks as it checks typed flags
                if name not in ckpt['args']:
                    raise DDPMError(f'{args.resume}: from an older ddpm.py, without {name}')
                value = ckpt['args'][name]
                text = ','.join(map(str, value)) if isinstance(value, tuple) else str(value)
                defaults[name] = value if value is None or isinstance(value, bool) else text
            train_parser.set_defaults(**defaults)
            args = parser.parse_args(argv)
            for name in MODEL_FLAGS:
                typed, saved = getattr(args, name), ckpt['args'][name]
                if typed != saved:
                    flag = '--' + name.replace('_', '-')
                    raise DDPMError(f'{flag} {typed} contradicts the checkpoint ({saved})')
            if args.data == ckpt['args']['data'] and not Path(args.data).is_dir():
                raise DDPMError(f'the run trained on {args.data}, which is not here: pass --data')
        train(args, ckpt)
    except Exception as e:  # bad input, a missing or damaged file, a full disk, out of memory
        sys.exit(f'error: {one_line(e)}')

if __name__ == '__main__':
    main()
