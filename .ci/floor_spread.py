"""How much the FID floor moves between draws of real digits (RESULTS.md, session 45):

    python .ci/floor_spread.py [--draws 20]

Each draw is fid.py floor's subset at another seed: 10,000 MNIST training digits of default_rng(seed)'s
permutation, scored against the 10,000 test digits with fid.py's MNIST features (all 60,000 extracted once).
It lives beside the CI script to keep the top level as the design card has it; CI does not run it.
"""
import argparse
import os
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import fid  # noqa: E402

parser = argparse.ArgumentParser()
parser.add_argument('--draws', type=int, default=20)
parser.add_argument('--data', default=os.environ.get('DDPM_DATA', 'data'))
args = parser.parse_args()
extractor = fid.Extractor('mnist')
reference = fid.reference_stats(extractor, args.data)
train, _ = fid.load_mnist(args.data, train=True)
features = extractor(train)
scores = []
for seed in range(args.draws):
    draw = np.random.default_rng(seed).permutation(len(train))[:10000]
    scores.append(fid.frechet_distance(*fid.statistics(features[draw]), *reference))
    print(f'seed {seed}: {scores[-1]:.3f}', flush=True)
print(f'mean {np.mean(scores):.3f}, sd {np.std(scores, ddof=1):.3f}, '
      f'{min(scores):.3f} to {max(scores):.3f}')
print(f'all {len(train):,}: {fid.frechet_distance(*fid.statistics(features), *reference):.3f}')
