"""Training throughput of ddpm.py's ScoreNet beside the reference-shaped ScoreNet, back to back.

    python .ci/bench.py                      # the README's table: three models at batch 100 and 32
    python .ci/bench.py --steps 50 --compile # options apply to every row
    python .ci/bench.py --rows depth2:32,depth2:256 --fast  # on CUDA: ddpm.py train's fast path
    python .ci/bench.py --rows depth2:32,depth2@32-64-160-320:32  # other widths (train --widths)

The reference is the MNIST ScoreNet of Yang Song's score-based tutorial, the model the reference DDPM
used: channels 32-64-128-256, unpadded convs, GroupNorm, Fourier time embedding, predicting the noise
(fp32, eager). Each row runs in its own process so that its peak memory (RSS; GPU memory on CUDA) is its
own; every row times the same training step: ddpm.Diffusion.loss, backward, Adam. It lives beside the CI
script to keep the top level as the design card has it; CI does not run it.
"""
import argparse, json, os, resource, subprocess, sys, time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import ddpm  # noqa: E402


class ReferenceScoreNet(nn.Module):
    """Song's tutorial ScoreNet (1.1M parameters) without the division by the marginal std: it predicts eps."""
    def __init__(self, c=(32, 64, 128, 256), emb=256):
        super().__init__()
        self.register_buffer('W', torch.randn(emb // 2) * 30)
        self.embed = nn.Linear(emb, emb)
        self.down = nn.ModuleList(nn.Conv2d(i, o, 3, stride=1 if k == 0 else 2, bias=False)
                                  for k, (i, o) in enumerate(zip((1,) + c[:-1], c)))
        self.up = nn.ModuleList([nn.ConvTranspose2d(c[3], c[2], 3, stride=2, bias=False),
                                 nn.ConvTranspose2d(2 * c[2], c[1], 3, stride=2, bias=False, output_padding=1),
                                 nn.ConvTranspose2d(2 * c[1], c[0], 3, stride=2, bias=False, output_padding=1)])
        self.dense = nn.ModuleList(nn.Linear(emb, w) for w in c + c[2::-1])
        self.norms = nn.ModuleList(nn.GroupNorm(4 if w == 32 and k == 0 else 32, w) for k, w in enumerate(c + c[2::-1]))
        self.last = nn.ConvTranspose2d(2 * c[0], 1, 3, stride=1)

    def forward(self, x, t, labels=None):
        proj = 2 * torch.pi * t[:, None] * self.W
        emb = F.silu(self.embed(torch.cat([proj.sin(), proj.cos()], 1)))
        layer = lambda k, h: F.silu(self.norms[k](h + self.dense[k](emb)[:, :, None, None]))
        hs, h = [], x
        for k, conv in enumerate(self.down):
            h = layer(k, conv(h))
            hs.append(h)
        for k, conv in enumerate(self.up):
            h = layer(4 + k, conv(h if k == 0 else torch.cat([h, hs[3 - k]], 1)))
        return self.last(torch.cat([h, hs[0]], 1))


def one(args):
    """Time `args.steps` training steps of one model after a warm-up; print one JSON line."""
    torch.manual_seed(0)
    if args.device == 'auto':
        args.device = 'cuda' if torch.cuda.is_available() else 'cpu'
    device = torch.device(args.device)
    if args.model == 'reference':
        model = ReferenceScoreNet()
    else:  # 'depth2': ScoreNet(depth=2); 'depth2@32-64-160-320': with those widths
        depth, _, widths = args.model.removeprefix('depth').partition('@')
        sizes = {'widths': tuple(int(w) for w in widths.split('-'))} if widths else {}
        model = ddpm.ScoreNet(depth=int(depth), **sizes)
    model = model.to(device)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    x = torch.rand(args.batch, 1, 28, 28, device=device) * 2 - 1
    labels = torch.zeros(args.batch, dtype=torch.long, device=device)  # a graphed net takes them
    net = torch.compile(model) if args.compile else model
    if args.fast:  # what train does on CUDA: the net as CUDA graphs, and fused Adam
        net = ddpm.cuda_graphed(model, x, labels)
    diffusion = ddpm.Diffusion()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, fused=args.fast or None)
    if args.channels_last:
        x = x.to(memory_format=torch.channels_last)
    for step in range(args.warmup + args.steps):
        if step == args.warmup:
            if device.type == 'cuda':
                torch.cuda.synchronize()
            start = time.time()
        with torch.autocast(device.type, torch.bfloat16, enabled=args.amp):
            loss = diffusion.loss(net, x, labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    if device.type == 'cuda':
        torch.cuda.synchronize()
    seconds = time.time() - start
    peak = (torch.cuda.max_memory_allocated() / 2**20 if device.type == 'cuda' else
            resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    print(json.dumps({'model': args.model, 'batch': args.batch, 'params': sum(p.numel() for p in model.parameters()),
                      'img_s': args.steps * args.batch / seconds, 'peak_mb': peak, 'device': str(device)}))


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--steps', type=int, default=100, help='timed steps per row')
    p.add_argument('--warmup', type=int, default=10, help='untimed steps first')
    p.add_argument('--rows', default='reference:100,depth1:100,depth2:100,reference:32,depth1:32,depth2:32',
                   help='model:batch,... (model: reference, or depthN for ddpm.ScoreNet(depth=N), '
                        'depthN@W1-W2-W3-W4 with those widths)')
    p.add_argument('--device', default='auto')
    p.add_argument('--compile', action='store_true')
    p.add_argument('--amp', action='store_true')
    p.add_argument('--fast', action='store_true', help="ddpm.py train's CUDA path: graphs, fused Adam")
    p.add_argument('--channels-last', action='store_true')
    p.add_argument('--model', help=argparse.SUPPRESS)  # set in the child process of one row
    p.add_argument('--batch', type=int, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.model:
        return one(args)
    options = [f'--{k.replace("_", "-")}' for k in ('compile', 'amp', 'channels_last', 'fast') if getattr(args, k)]
    print(f'torch {torch.__version__}, {os.cpu_count()} CPUs, threads {torch.get_num_threads()}, options {options}')
    print('| model | params | batch | images/s | peak memory (MB) | device |\n|---|---|---|---|---|---|')
    for row in args.rows.split(','):
        model, batch = row.split(':')
        r = json.loads(subprocess.run([sys.executable, __file__, '--model', model, '--batch', batch, '--steps',
                                       str(args.steps), '--warmup', str(args.warmup), '--device', args.device,
                                       *options], check=True, capture_output=True, text=True).stdout.splitlines()[-1])
        print(f"| {model} | {r['params'] / 1e6:.2f}M | {batch} | {r['img_s']:.0f} | {r['peak_mb']:.0f} | "
              f"{r['device']} |", flush=True)


if __name__ == '__main__':
    main()
