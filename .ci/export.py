"""A run's EMA weights for sampling only, as the shipped assets/mnist.pt and assets/mnist_cond.pt are:

    python .ci/export.py ~/runs/cond/ckpt.pt assets/mnist_cond.pt

The EMA in float16 (the Fourier frequencies, a buffer, stay float32), the config, the step, and the run's flags
without where it ran (data, out, resume) and with the lr and EMA decay it trained with; no model, optimizer or RNG
state. `sample` needs nothing else; `train --resume` refuses it. It lives beside the CI script to keep the top
level as the design card has it; CI does not run it.
"""
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import ddpm  # noqa: E402


def export(source, target):
    """Write the sampling checkpoint of the run checkpoint `source` to `target`."""
    write_sampling_checkpoint(ddpm.load_checkpoint(source, ddpm.RESUME_PARTS), target)


def write_sampling_checkpoint(ckpt, target):
    """Write a loaded run checkpoint's EMA, config, step and flags to `target`."""
    args = {name: value for name, value in ckpt['args'].items()
            if name not in ('data', 'out', 'resume')}
    # left out, they followed the batch: train() resolves them so
    if args['lr'] is None:
        args['lr'] = 3e-3 * math.sqrt(args['batch'] / 32)
    if args['ema'] is None:
        args['ema'] = 0.999 ** (args['batch'] / 32)
    ema = {name: value if name == 'freqs' else value.half() for name, value in ckpt['ema'].items()}
    state = {'format': ddpm.FORMAT, 'config': ckpt['config'], 'args': args, 'step': ckpt['step'],
             'ema': ema}
    ddpm.write_atomic(target, lambda f: torch.save(state, f))
    print(f"wrote {target}: step {ckpt['step']}, {Path(target).stat().st_size:,} bytes")


if __name__ == '__main__':
    export(*sys.argv[1:])
