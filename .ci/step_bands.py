"""Where along the steps two sampling checkpoints differ: per band of steps, the eps error and x0's mean.

    python .ci/step_bands.py assets/mnist.pt OTHER.pt   # MNIST at $DDPM_DATA (default ../shared/data)

1,000 MNIST test digits are noised at uniform steps within each band, the same steps and noise for every
checkpoint; printed per band: the plain mean of (eps' prediction - noise)^2, and the mean of x0's estimate
(x - sqrt(1 - abar) eps) / sqrt(abar), beside the digits' own mean. RESULTS.md (E60) reads it."""
import os
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import ddpm  # noqa: E402

BANDS = [(1, 20), (21, 50), (51, 100), (101, 150), (151, 180), (181, 200)]

data = os.environ.get('DDPM_DATA', str(ROOT.parent / 'shared' / 'data'))
images, _ = ddpm.load_mnist(data, train=False, limit=1000)
for path in sys.argv[1:]:
    ckpt = ddpm.load_checkpoint(path)
    diffusion, model = ddpm.build(ckpt['config'], torch.device('cpu'), weights=ckpt['ema'])
    model = model.float().eval()
    generator = torch.Generator().manual_seed(1)
    print(f'{path}: the digits\' mean {images.mean().item():+.3f}')
    with torch.no_grad():
        for low, high in BANDS:
            t = torch.randint(low, high + 1, (len(images),), generator=generator)
            noise = torch.randn(images.shape, generator=generator)
            xt = diffusion.q_sample(images, t, noise)
            eps = model(xt, t / diffusion.T, None)
            abar = diffusion.abar_at(t, images)
            x0 = (xt - (1 - abar).sqrt() * eps) / abar.sqrt()
            error = ((eps - noise) ** 2).mean().item()
            print(f'  steps {low}-{high}: eps MSE {error:.4f}, x0 mean {x0.mean().item():+.3f}')
