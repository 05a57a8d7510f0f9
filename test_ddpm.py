"""Tests for ddpm.py and fid.py. Run: python -m pytest -q (MNIST from $DDPM_DATA or ../shared/data)."""
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

import ddpm
import fid

ROOT = Path(__file__).resolve().parent
DATA = os.environ.get('DDPM_DATA', str(ROOT.parent / 'shared' / 'data'))
TINY = ['--data', DATA, '--limit', '200', '--batch', '50', '--T', '20', '--widths', '8,16']  # 4 steps an epoch


def needs_mnist():
    if not (Path(DATA) / 'MNIST' / 'raw').is_dir():
        assert not os.environ.get('CI'), f'MNIST missing from {DATA} in CI'
        pytest.skip(f'MNIST not found in {DATA}')


def run(*args, timeout=300):
    """Run ddpm.py as a user would; returns the finished process."""
    return subprocess.run([sys.executable, str(ROOT / 'ddpm.py'), *args], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT)


def oracle(diffusion, x0):
    """A 'model' that knows the clean images x0 and returns the true noise of any x_t (or v, for target 'v')."""
    def model(x, t, labels=None):
        abar = diffusion.abar[(t * diffusion.T).round().long()].view(-1, 1, 1, 1)
        eps = (x - abar.sqrt() * x0) / (1 - abar).sqrt()
        return eps if diffusion.target == 'eps' else abar.sqrt() * eps - (1 - abar).sqrt() * x0
    model.parameters = lambda: iter([x0])  # sample() reads the device from the parameters
    return model

# --- schedule math against an independent float64 computation ------------------------------------------------


@pytest.mark.parametrize('T,b0,b1', [(200, 1e-4, 0.1), (1000, 1e-4, 0.02), (7, 0.01, 0.5)])
def test_linear_schedule_matches_float64_reference(T, b0, b1):
    d = ddpm.Diffusion(T, 'linear', b0, b1)
    betas = np.linspace(b0, b1, T)
    abar = np.cumprod(1 - betas)
    abar_prev = np.concatenate([[1.0], abar[:-1]])
    np.testing.assert_allclose(d.abar[1:].numpy(), abar, rtol=1e-6)
    assert d.abar[0] == 1 and d.post_var[0] == 0
    np.testing.assert_allclose(d.post_c0[1:].numpy(), betas * np.sqrt(abar_prev) / (1 - abar), rtol=1e-5)
    np.testing.assert_allclose(d.post_ct[1:].numpy(), (1 - abar_prev) * np.sqrt(1 - betas) / (1 - abar), rtol=1e-5)
    np.testing.assert_allclose(d.post_var[1:].numpy(), betas * (1 - abar_prev) / (1 - abar), rtol=1e-5, atol=1e-12)


def test_cosine_schedule_endpoints_and_formula():
    T, s = 200, 0.008
    d = ddpm.Diffusion(T, 'cosine')
    f = np.cos((np.arange(T + 1) / T + s) / (1 + s) * np.pi / 2) ** 2
    np.testing.assert_allclose(d.abar[1:T].numpy(), (f / f[0])[1:T], rtol=1e-5)
    assert d.abar[0] == 1 and d.abar[T] < 1e-6  # all signal at t = 0, essentially none at t = T
    assert (d.betas[1:] <= 0.999).all() and (d.betas[1:] > 0).all()


def test_q_sample_mean_and_variance():
    d = ddpm.Diffusion()
    x0 = torch.full((200_000, 1, 1, 1), 0.7)
    for t in (1, 50, 200):
        xt = d.q_sample(x0, torch.full((len(x0),), t), torch.randn_like(x0))
        abar = d.abar[t].item()
        assert abs(xt.mean().item() - np.sqrt(abar) * 0.7) < 0.01
        assert abs(xt.var().item() - (1 - abar)) < 0.01 * max(1 - abar, 0.1)

# --- the model --------------------------------------------------------------------------------------------


@pytest.mark.parametrize('shape', [(3, 1, 28, 28), (2, 3, 32, 32), (2, 1, 17, 23)])
def test_scorenet_keeps_shape_for_batched_t(shape):
    model = ddpm.ScoreNet(channels=shape[1])
    out = model(torch.randn(shape), torch.rand(shape[0]))
    assert out.shape == shape


def test_scorenet_rejects_bad_sizes_clearly():
    model = ddpm.ScoreNet(channels=1)
    with pytest.raises(ValueError, match=r'expects \(N, 1, H, W\) with H, W >= 8'):
        model(torch.randn(2, 3, 28, 28), torch.rand(2))
    with pytest.raises(ValueError, match='>= 8'):
        model(torch.randn(2, 1, 4, 28), torch.rand(2))


def test_conditional_scorenet_shapes_with_and_without_labels():
    model = ddpm.ScoreNet(channels=1, widths=(8, 16), num_classes=10)
    x, t = torch.randn(4, 1, 28, 28), torch.rand(4)
    with_labels, without = model(x, t, torch.tensor([0, 3, 9, 10])), model(x, t)
    assert with_labels.shape == without.shape == x.shape
    assert not torch.allclose(with_labels, without)  # the label changes the prediction


def test_depth_adds_residual_convs_to_every_block():
    shallow, deep = ddpm.ScoreNet(widths=(8, 16)), ddpm.ScoreNet(widths=(8, 16), depth=3)
    assert not any('extra' in name for name in shallow.state_dict())  # depth 1: old checkpoints still load
    extra = sum(p.numel() for name, p in deep.named_parameters() if '.extra.' in name)
    assert extra == sum(2 * (9 * c * c + c + 2 * c) for c in (8, 16, 8))  # 2 more conv + GroupNorm per block
    missing = deep.load_state_dict(shallow.state_dict(), strict=False).missing_keys
    assert missing and all('.extra.' in name for name in missing)
    x, t = torch.randn(2, 1, 12, 12), torch.rand(2)
    assert not torch.allclose(deep(x, t), shallow(x, t))
    with torch.no_grad():  # an extra conv that outputs 0 adds 0: each one is a residual h + f(h)
        for conv in (m for name, m in deep.named_modules() if '.extra.' in name and isinstance(m, torch.nn.Conv2d)):
            conv.weight.zero_(), conv.bias.zero_()
    torch.testing.assert_close(deep(x, t), shallow(x, t))

# --- samplers, with an oracle that knows x0 ---------------------------------------------------------------


def test_ddpm_step_is_the_closed_form_posterior():
    d, x0 = ddpm.Diffusion(T=50), torch.rand(4, 1, 8, 8) * 2 - 1
    frames = []
    ddpm.sample(oracle(d, x0), d, x0.shape, 'ddpm', generator=torch.Generator().manual_seed(1), frames=frames)
    gen = torch.Generator().manual_seed(1)
    xT, z = torch.randn(x0.shape, generator=gen), torch.randn(x0.shape, generator=gen)
    # float64 reference for q(x_{T-1} | x_T, x0) from the betas alone
    betas = np.linspace(1e-4, 0.1, 50)
    abar = np.cumprod(1 - betas)
    mean = (betas[-1] * np.sqrt(abar[-2]) * x0.double()
            + (1 - abar[-2]) * np.sqrt(1 - betas[-1]) * xT.double()) / (1 - abar[-1])
    std = np.sqrt(betas[-1] * (1 - abar[-2]) / (1 - abar[-1]))
    torch.testing.assert_close(frames[0].double(), (mean + std * z.double()).clamp(-1, 1), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(frames[-1], x0, atol=1e-4, rtol=0)  # and the chain ends on x0


@pytest.mark.parametrize('target', ['eps', 'v'])
@pytest.mark.parametrize('sampler', ['ddim', 'dpm++'])
@pytest.mark.parametrize('steps', [1, 3, 10, 50])
def test_deterministic_samplers_recover_x0_with_an_oracle(sampler, steps, target):
    d, x0 = ddpm.Diffusion(T=50, target=target), torch.rand(4, 1, 8, 8) * 2 - 1
    x = ddpm.sample(oracle(d, x0), d, x0.shape, sampler, steps, eta=0.0, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(x, x0, atol=1e-4, rtol=0)


@pytest.mark.parametrize('target', ['eps', 'v'])
def test_loss_of_an_oracle_is_zero_and_v_is_its_formula(target):
    d, x0 = ddpm.Diffusion(T=50, target=target), torch.rand(6, 3, 8, 8) * 2 - 1
    assert d.loss(oracle(d, x0), x0).item() < 1e-10
    torch.manual_seed(0)  # and a model that outputs the noise scores on v what the v formula says
    t, noise = torch.randint(1, 51, (6,)), torch.randn_like(x0)
    torch.manual_seed(0)
    loss = d.loss(lambda x, tt, labels: noise, x0)
    abar = d.abar[t].double().view(-1, 1, 1, 1)
    v = abar.sqrt() * noise.double() - (1 - abar).sqrt() * x0.double()
    expected = 0.0 if target == 'eps' else ((noise.double() - v) ** 2).mean().item()
    assert abs(loss.item() - expected) < 1e-6


def test_ddim_eta1_on_all_steps_is_the_ddpm_step():
    d, x0 = ddpm.Diffusion(T=30, schedule='cosine'), torch.rand(4, 1, 8, 8) * 2 - 1
    runs = {}
    for sampler in ('ddpm', 'ddim'):
        runs[sampler] = []
        ddpm.sample(oracle(d, x0), d, x0.shape, sampler, steps=30, eta=1.0,
                    generator=torch.Generator().manual_seed(3), frames=runs[sampler])
    for a, b in zip(runs['ddpm'][:5], runs['ddim'][:5]):  # same noise draws: same mean and variance
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize('steps', [1, 7, 30])
def test_dpmpp_with_eta1_takes_the_posterior_step_like_ddim_eta1(steps):
    # with the true x0, the first-order SDE step of DPM-Solver++ is the posterior q(x_s | x_t, x0) on the
    # step sub-sequence, as DDIM with eta = 1 is; with the same noise draws every step but the last agrees
    d, x0 = ddpm.Diffusion(T=30, schedule='cosine'), torch.rand(4, 1, 8, 8) * 2 - 1
    runs = {}
    for sampler in ('ddim', 'dpm++'):
        runs[sampler] = []
        ddpm.sample(oracle(d, x0), d, x0.shape, sampler, steps=steps, eta=1.0,
                    generator=torch.Generator().manual_seed(3), frames=runs[sampler])
    assert len(runs['ddim']) == len(runs['dpm++']) == steps
    for a, b in zip(runs['ddim'][:-1], runs['dpm++'][:-1]):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(runs['dpm++'][-1], x0, atol=1e-3, rtol=0)  # from x_T, x0 = (x - ..) / sqrt(abar_T ~ 0)


def steps_taken(d, steps, spacing):
    """The steps t at which dpm++ calls the model (once a step; the last step lands on 0), from the times it passes."""
    x0, seen = torch.zeros(1, 1, 4, 4), []
    def model(x, t, labels=None):
        seen.append(round(t[0].item() * d.T))
        return oracle(d, x0)(x, t)
    model.parameters = lambda: iter([x0])
    ddpm.sample(model, d, x0.shape, 'dpm++', steps, spacing=spacing)
    return seen


@pytest.mark.parametrize('T,schedule,steps', [(200, 'cosine', 50), (200, 'cosine', 20), (200, 'linear', 50),
                                              (1000, 'linear', 30), (20, 'cosine', 19), (20, 'cosine', 20),
                                              (20, 'cosine', 1)])
def test_logsnr_spacing_is_the_nearest_steps_to_even_log_snr_targets(T, schedule, steps):
    d = ddpm.Diffusion(T, schedule)
    got = steps_taken(d, steps, 'logsnr')
    assert len(got) == steps and got == sorted(set(got), reverse=True) and got[0] == T and (steps == 1 or got[-1] == 1)
    # in float64: the fewest m even targets from lam(T) to lam(1) whose nearest steps are `steps` distinct ones
    lam = 0.5 * np.log(d.abar[1:].double().numpy() / (1 - d.abar[1:].double().numpy()))  # steps 1..T
    for m in range(steps, 100 * T):
        want = sorted({int(np.abs(lam - v).argmin()) + 1 for v in np.linspace(lam[-1], lam[0], m)}, reverse=True)
        if len(want) >= steps:
            break
    assert got == (want if steps < T else list(range(T, 0, -1)))
    if (T, schedule, steps) == (200, 'cosine', 50):  # short steps at both ends, long ones in the middle
        assert got[:10] == list(range(200, 190, -1)) and got[-8:] == list(range(8, 0, -1)) and 10 in np.diff(got[::-1])


@pytest.mark.parametrize('steps', [1, 7, 50])
def test_uniform_spacing_is_even_in_t(steps):
    d = ddpm.Diffusion(200, 'cosine')
    assert steps_taken(d, steps, 'uniform') == np.linspace(200, 0, steps + 1).round().astype(int)[:-1].tolist()


def test_unknown_spacing_is_refused():
    with pytest.raises(ValueError, match='logsnr or uniform'):
        ddpm.sample(ddpm.ScoreNet(widths=(8, 16)), ddpm.Diffusion(T=20), (1, 1, 8, 8), 'ddim', 5, spacing='log')
    r = run('sample', '--spacing', 'log')
    assert r.returncode == 2 and "invalid choice: 'log'" in r.stderr and len(r.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize('steps', [0, 21])
def test_sampler_rejects_steps_out_of_range(steps):
    d = ddpm.Diffusion(T=20)
    with pytest.raises(ValueError, match='steps in 1..20'):
        ddpm.sample(ddpm.ScoreNet(widths=(8, 16)), d, (1, 1, 8, 8), 'ddim', steps)


def test_guidance_zero_is_the_plain_conditional_model_and_w_mixes():
    torch.manual_seed(0)
    d, model = ddpm.Diffusion(T=10), ddpm.ScoreNet(widths=(8, 16), num_classes=10)
    y = torch.tensor([1, 7, 7, 2])
    plain = lambda x, t, labels=None: model(x, t, y)
    plain.parameters = model.parameters
    a = ddpm.sample(model, d, (4, 1, 8, 8), labels=y, guidance=0.0, generator=torch.Generator().manual_seed(5))
    b = ddpm.sample(plain, d, (4, 1, 8, 8), generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(a, b)
    x, w = torch.randn(4, 1, 8, 8), 2.5
    eps, _ = d.predict(model, x, 7, y, guidance=w)
    tt = torch.full((4,), 0.7)
    with torch.no_grad():
        guided = (1 + w) * model(x, tt, y) - w * model(x, tt, torch.full_like(y, 10))
    abar = d.abar[7]
    x0 = ((x - (1 - abar).sqrt() * guided) / abar.sqrt()).clamp(-1, 1)  # predict() clips x0 to the data range
    torch.testing.assert_close(eps, (x - abar.sqrt() * x0) / (1 - abar).sqrt(), atol=1e-5, rtol=1e-5)

# --- training ---------------------------------------------------------------------------------------------


def test_tiny_overfit_loss_falls_below_what_an_untrained_model_reaches():
    needs_mnist()
    torch.manual_seed(0)
    images, _ = ddpm.load_images('mnist', DATA, limit=16)
    d, model = ddpm.Diffusion(), ddpm.ScoreNet(widths=(16, 32, 64))
    eval_loss = lambda: np.mean([d.loss(model, images).item() for _ in range(20)])
    with torch.no_grad():
        untrained = eval_loss()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(300):
        loss = d.loss(model, images)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        trained = eval_loss()
    assert untrained > 0.5 and trained < 0.15, (untrained, trained)  # measured: ~1.0 -> ~0.07


def test_cli_train_sample_resume_end_to_end(tmp_path):
    needs_mnist()
    out = tmp_path / 'run'
    r = run('train', *TINY, '--epochs', '1', '--out', str(out))
    assert r.returncode == 0, r.stderr
    assert 'img/s' in r.stdout and (out / 'ckpt.pt').is_file() and (out / 'samples_epoch1.png').is_file()
    assert ddpm.load_checkpoint(out / 'ckpt.pt')['step'] == 4
    r = run('sample', '--ckpt', str(out / 'ckpt.pt'), '--n', '10', '--out', str(tmp_path / 'g.png'),
            '--npz', str(tmp_path / 's.npz'), '--batch', '4')  # no architecture flags needed
    assert r.returncode == 0, r.stderr
    assert 'dpm++ with 20 network evaluations' in r.stdout  # the default sampler: 50 steps, or T (20) if fewer
    assert Image.open(tmp_path / 'g.png').size == (4 * 30 + 2, 3 * 30 + 2)  # 10 digits, 4 per row, padding 2
    samples = np.load(tmp_path / 's.npz')['samples']
    assert samples.shape == (10, 28, 28) and samples.dtype == np.uint8
    r = run('train', *TINY, '--epochs', '2', '--out', str(out), '--resume', str(out / 'ckpt.pt'))
    assert r.returncode == 0, r.stderr
    assert 'resumed' in r.stdout and ddpm.load_checkpoint(out / 'ckpt.pt')['step'] == 8


def test_resume_is_bitwise_exact(tmp_path, monkeypatch):
    needs_mnist()
    saved, save = [], ddpm.save_checkpoint  # keep every checkpoint of an uninterrupted 3-epoch run
    monkeypatch.setattr(ddpm, 'save_checkpoint', lambda path, state: saved.append(path.read_bytes() if
                        path.exists() else None) or save(path, state))
    ddpm.main(['train', *TINY, '--epochs', '3', '--out', str(tmp_path / 'straight')])
    (tmp_path / 'epoch1.pt').write_bytes(saved[1])  # the file as it was after epoch 1
    ddpm.main(['train', *TINY, '--epochs', '3', '--out', str(tmp_path / 'resumed'),
               '--resume', str(tmp_path / 'epoch1.pt')])
    a, b = (ddpm.load_checkpoint(tmp_path / d / 'ckpt.pt') for d in ('straight', 'resumed'))
    assert ddpm.load_checkpoint(tmp_path / 'epoch1.pt')['step'] == 4 and a['step'] == b['step'] == 12
    for key in ('model', 'ema', 'optimizer'):
        for name, value in a[key].items() if key != 'optimizer' else a[key]['state'][0].items():
            other = b[key][name] if key != 'optimizer' else b[key]['state'][0][name]
            assert torch.equal(value, other), (key, name)


def test_resume_refuses_contradicting_flags(tmp_path):
    needs_mnist()
    ddpm.main(['train', *TINY, '--depth', '2', '--epochs', '1', '--out', str(tmp_path)])
    r = run('train', *TINY[:-4], '--T', '50', '--resume', str(tmp_path / 'ckpt.pt'), '--out', str(tmp_path))
    assert r.returncode != 0 and '--T 50 contradicts the checkpoint (20)' in r.stderr
    r = run('train', *TINY, '--depth', '3', '--resume', str(tmp_path / 'ckpt.pt'), '--out', str(tmp_path))
    assert r.returncode != 0 and '--depth 3 contradicts the checkpoint (2)' in r.stderr
    r = run('sample', '--ckpt', str(tmp_path / 'ckpt.pt'), '--n', '2', '--out', str(tmp_path / 'g.png'))
    assert r.returncode == 0, r.stderr  # the checkpoint's config builds the deeper net


def test_checkpoint_from_before_depth_and_target_resumes_and_samples_as_depth_1_eps(tmp_path):
    needs_mnist()
    ddpm.main(['train', *TINY, '--depth', '1', '--epochs', '1', '--out', str(tmp_path)])
    ckpt = torch.load(tmp_path / 'ckpt.pt', weights_only=True)
    for part in ('args', 'config'):  # as written before the flags existed
        del ckpt[part]['depth'], ckpt[part]['target']
    torch.save(ckpt, tmp_path / 'old.pt')
    ddpm.main(['train', *TINY, '--epochs', '2', '--resume', str(tmp_path / 'old.pt'), '--out', str(tmp_path)])
    resumed = ddpm.load_checkpoint(tmp_path / 'ckpt.pt')
    assert resumed['step'] == 8 and resumed['config']['depth'] == 1 and resumed['config']['target'] == 'eps'
    r = run('sample', '--ckpt', str(tmp_path / 'old.pt'), '--n', '2', '--out', str(tmp_path / 'g.png'))
    assert r.returncode == 0, r.stderr


def test_resume_without_flags_continues_the_checkpoints_schedule(tmp_path):
    needs_mnist()
    ddpm.main(['train', *TINY, '--epochs', '1', '--lr', '1e-3', '--out', str(tmp_path)])
    ddpm.main(['train', '--data', DATA, '--resume', str(tmp_path / 'ckpt.pt'), '--out', str(tmp_path)])
    ckpt = ddpm.load_checkpoint(tmp_path / 'ckpt.pt')  # not the defaults' 60 epochs of batch 32 at lr 3e-3
    assert ckpt['step'] == 4 and ckpt['args']['lr'] == 1e-3 and ckpt['args']['batch'] == 50


def timed(function, seconds):
    """`function`, appending the duration of each call to the list `seconds`."""
    def wrapper(*args, **kwargs):
        start = time.time()
        try:
            return function(*args, **kwargs)
        finally:
            seconds.append(time.time() - start)
    return wrapper


def test_minutes_budget_ends_on_time_with_the_schedule_ended(tmp_path, monkeypatch):
    needs_mnist()
    budget, saves, grids = 0.1, [], []  # minutes; a tiny step takes ~0.05 s
    monkeypatch.setattr(ddpm, 'save_checkpoint', timed(ddpm.save_checkpoint, saves))
    monkeypatch.setattr(ddpm, 'sample', timed(ddpm.sample, grids))
    ddpm.main(['train', *TINY, '--minutes', str(budget), '--out', str(tmp_path)])
    ckpt = ddpm.load_checkpoint(tmp_path / 'ckpt.pt')
    # the budget can be overrun by the epoch's checkpoint and grid that were being written when it ended, one
    # step, and the final checkpoint: measured 6.0-6.3 s alone, up to 9.9 s beside other jobs (slow fsyncs)
    late = 2 * max(saves) + max(grids) + 0.5
    assert 0.7 * budget * 60 < ckpt['seconds'] < budget * 60 + late, (ckpt['seconds'], saves, grids)
    assert ckpt['step'] == ckpt['total'] < 240 and ckpt['scheduler']['_last_lr'][0] == 0  # ended on time at LR 0
    last_log_line = (tmp_path / 'log.csv').read_text().splitlines()[-1].split(',')
    assert float(last_log_line[3]) == 0
    ddpm.main(['train', *TINY, '--minutes', str(2 * budget), '--out', str(tmp_path),  # resume: the rest of
               '--resume', str(tmp_path / 'ckpt.pt')])                             # a doubled budget
    resumed = ddpm.load_checkpoint(tmp_path / 'ckpt.pt')
    late = 2 * max(saves) + max(grids) + 0.5
    assert 1.7 * budget * 60 < resumed['seconds'] < 2 * budget * 60 + late and resumed['step'] > ckpt['step']


def test_label_dropout_happens_at_the_configured_rate(tmp_path, monkeypatch):
    needs_mnist()
    seen, loss = [], ddpm.Diffusion.loss

    def record(self, m, x, y=None, *a):  # remember the labels of each batch, then compute the real loss
        seen.append(y)
        return loss(self, m, x, y, *a)
    monkeypatch.setattr(ddpm.Diffusion, 'loss', record)
    ddpm.main(['train', *TINY[:3], '1000', *TINY[4:], '--cond', '--p-uncond', '0.3', '--epochs', '1',
               '--out', str(tmp_path)])
    labels = torch.cat(seen)
    assert len(labels) == 1000 and abs((labels == 10).float().mean().item() - 0.3) < 0.05


def test_tiny_conditional_overfit_draws_the_requested_class(tmp_path, monkeypatch):
    needs_mnist()
    images, labels = ddpm.load_images('mnist', DATA, limit=1000)
    zeros_and_ones = (labels == 0) | (labels == 1)
    monkeypatch.setattr(ddpm, 'load_images', lambda *a, **k: (images[zeros_and_ones][:20],
                                                              labels[zeros_and_ones][:20]))
    ddpm.main(['train', '--data', DATA, '--cond', '--T', '20', '--schedule', 'cosine', '--target', 'v',
               '--batch', '10', '--lr', '3e-3', '--epochs', '200', '--every', '1000', '--out', str(tmp_path)])
    ckpt = ddpm.load_checkpoint(tmp_path / 'ckpt.pt')
    diffusion, model = ddpm.build(ckpt['config'], 'cpu')
    model.load_state_dict(ckpt['ema'])
    wanted = torch.tensor([0, 1] * 20)
    x = ddpm.sample(model, diffusion, (40, 1, 28, 28), 'dpm++', 20, labels=wanted, guidance=1.0,
                    generator=torch.Generator().manual_seed(0))
    drawn = fid.Extractor('mnist').net(fid.to_input(ddpm.to_uint8(x))).argmax(1)
    assert (drawn == wanted).float().mean() >= 0.8, drawn.tolist()  # measured: 0.95 (38 of 40) at 400 steps


@pytest.mark.parametrize('sig', [signal.SIGINT, signal.SIGTERM])
def test_signal_saves_a_checkpoint_that_resumes(tmp_path, sig):
    needs_mnist()
    proc = subprocess.Popen([sys.executable, str(ROOT / 'ddpm.py'), 'train', *TINY, '--epochs', '10000',
                             '--every', '10000', '--out', str(tmp_path)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=ROOT)
    assert 'training' in proc.stdout.readline()
    time.sleep(2)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode != 0 and 'continue with: python ddpm.py train --resume' in err, err
    step = ddpm.load_checkpoint(tmp_path / 'ckpt.pt')['step']
    assert step > 0
    r = run('train', *TINY, '--epochs', str(step // 4 + 1), '--resume', str(tmp_path / 'ckpt.pt'),
            '--out', str(tmp_path))
    assert r.returncode == 0 and f'at step {step}' in r.stdout, r.stderr


def test_checkpoint_survives_sigkill_during_saves(tmp_path):
    path = tmp_path / 'ckpt.pt'
    script = (f'import ddpm, torch\nstate = {{"format": ddpm.FORMAT, "w": torch.randn(2_000_000)}}\n'
              f'while True:\n    ddpm.save_checkpoint({str(path)!r}, state)\n')
    proc = subprocess.Popen([sys.executable, '-c', script], cwd=ROOT)
    while not path.exists():
        time.sleep(0.05)
    time.sleep(1.0)  # many saves in flight by now
    proc.kill()
    proc.wait()
    assert ddpm.load_checkpoint(path)['w'].shape == (2_000_000,)


def test_nan_loss_stops_with_a_message_and_keeps_the_checkpoint(tmp_path, monkeypatch):
    needs_mnist()
    ddpm.main(['train', *TINY, '--epochs', '1', '--out', str(tmp_path)])
    before = (tmp_path / 'ckpt.pt').read_bytes()
    monkeypatch.setattr(ddpm.Diffusion, 'loss', lambda *a, **k: torch.tensor(float('nan'), requires_grad=True))
    # the loss is read at each progress line (every 5 s) and before each checkpoint: here by the one at step 8
    with pytest.raises(SystemExit, match=r'loss became nan by step [5-8]: training diverged; try a lower --lr'):
        ddpm.main(['train', *TINY, '--epochs', '2', '--out', str(tmp_path), '--resume', str(tmp_path / 'ckpt.pt')])
    assert (tmp_path / 'ckpt.pt').read_bytes() == before


def test_progress_line_reports_the_recent_pace_not_the_average(tmp_path, monkeypatch, capsys):
    needs_mnist()
    clock, loss = [0.0], ddpm.Diffusion.loss  # a clock that only training steps move: the first epoch's

    def slow_then_fast_loss(self, *args, **kwargs):  # 4 steps take 25 s each (a busy CPU), the later ones 1 s
        clock[0] += 25 if clock[0] < 100 else 1
        return loss(self, *args, **kwargs)
    monkeypatch.setattr(ddpm.Diffusion, 'loss', slow_then_fast_loss)
    monkeypatch.setattr(ddpm, 'time', SimpleNamespace(time=lambda: clock[0]))  # ddpm's clock only
    ddpm.main(['train', *TINY, '--epochs', '3', '--out', str(tmp_path)])  # 12 steps of 50 images
    lines = [line for line in capsys.readouterr().out.splitlines() if ' img/s ' in line]
    rates = [line.split(' img/s ')[0].rsplit(' ', 1)[1] for line in lines]
    # a line a step while slow (25 s >= 5 s), then one at each epoch's end; the average since the start
    # would read 8 * 50 / 104 = 4 img/s at step 8 and an ETA of 0.9 minutes
    assert rates == ['2', '2', '2', '2', '50', '50'], lines
    assert 'step 8/12' in lines[4] and lines[4].endswith('eta 0.1m'), lines


def test_checkpoint_that_would_run_code_is_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, (f'touch {tmp_path / "pwned"}',))
    path = tmp_path / 'evil.pt'
    with open(path, 'wb') as f:
        pickle.dump({'format': ddpm.FORMAT, 'x': Evil()}, f)
    with pytest.raises(ddpm.DDPMError, match='not a readable ddpm.py checkpoint'):
        ddpm.load_checkpoint(path)
    assert not (tmp_path / 'pwned').exists()


def test_bad_inputs_give_one_line_errors(tmp_path):
    (tmp_path / 'junk.pt').write_bytes(b'not a checkpoint')
    torch.save({'some': 'dict'}, tmp_path / 'other.pt')
    (tmp_path / 'readonly').mkdir(mode=0o500)
    cases = [
        (['sample', '--ckpt', str(tmp_path / 'missing.pt')], 'not found'),
        (['sample', '--ckpt', str(tmp_path / 'junk.pt')], 'not a readable ddpm.py checkpoint'),
        (['sample', '--ckpt', str(tmp_path / 'other.pt')], 'is not a ddpm.py checkpoint'),
        (['train', '--T', '0'], 'argument --T: 0 is out of range'),
        (['train', '--lr', 'fast'], "argument --lr: invalid float value: 'fast'"),
        (['train', '--batch', '0'], 'argument --batch: 0 is out of range'),
        (['train', '--widths', '32'], '--widths needs two or more levels'),
        (['train', '--depth', '0'], 'argument --depth: 0 is out of range'),
        (['sample', '--n', '-1'], 'argument --n: -1 is out of range'),
        (['sample', '--digit', '11'], 'argument --digit: invalid choice'),
        (['sample', '--guidance', '-1'], 'argument --guidance: -1 is out of range'),
        (['train', '--data', str(tmp_path / 'nowhere'), '--out', str(tmp_path / 'o'), '--device', 'cpu'],
         'cannot load mnist from'),
    ]
    if os.geteuid() != 0:  # root can write anywhere
        cases.append((['train', '--out', str(tmp_path / 'readonly' / 'run')], 'Permission denied'))
    env = dict(os.environ, TORCH_HOME=str(tmp_path))
    for args, message in cases:
        r = subprocess.run([sys.executable, str(ROOT / 'ddpm.py'), *args], capture_output=True, text=True,
                           timeout=120, cwd=ROOT, env=env | {'no_proxy': '*', 'https_proxy': 'http://127.0.0.1:9'})
        assert r.returncode != 0, args
        assert message in r.stderr and 'Traceback' not in r.stderr, (args, r.stderr)
        assert len(r.stderr.strip().splitlines()) == 1, (args, r.stderr)


def test_sampling_errors(tmp_path):
    needs_mnist()
    ddpm.main(['train', *TINY, '--epochs', '1', '--out', str(tmp_path)])
    r = run('sample', '--ckpt', str(tmp_path / 'ckpt.pt'), '--digit', '3')
    assert r.returncode != 0 and 'trained without --cond' in r.stderr
    r = run('sample', '--ckpt', str(tmp_path / 'ckpt.pt'), '--sampler', 'ddim', '--steps', '21')
    assert r.returncode != 0 and 'steps in 1..20' in r.stderr and 'Traceback' not in r.stderr


def test_gif_has_the_requested_frames_and_grid(tmp_path):
    needs_mnist()
    ddpm.main(['train', *TINY, '--epochs', '1', '--out', str(tmp_path), '--cond'])
    r = run('sample', '--ckpt', str(tmp_path / 'ckpt.pt'), '--n', '10', '--digit', 'all', '--gif',
            str(tmp_path / 'a.gif'), '--out', str(tmp_path / 'g.png'))
    assert r.returncode == 0, r.stderr
    gif = Image.open(tmp_path / 'a.gif')
    assert gif.n_frames == 20 and gif.size == (8 * 30 + 2, 2 * 30 + 2)  # T=20 steps; 10 images, 8 per row
    assert Image.open(tmp_path / 'g.png').size == (1 * 30 + 2, 10 * 30 + 2)  # one row per digit


def test_torchrun_two_processes_train_like_one(tmp_path):
    needs_mnist()
    # widths from 16: a GroupNorm group of one channel cancels that channel's bias, whose gradient is then 0 up to
    # rounding, which Adam turns into steps of +-lr in any run: 8-channel layers would differ by ~1e-3
    tiny = [*TINY[:-1], '16,32', '--device', 'cpu']
    for epochs, resume in (('1', []), ('2', ['--resume'])):  # 2 epochs: resumed under torchrun too
        for name, launch in (('one', [sys.executable]), ('two', [sys.executable, '-m', 'torch.distributed.run',
                                                                  '--standalone', '--nproc_per_node=2'])):
            out = tmp_path / name
            r = subprocess.run([*launch, str(ROOT / 'ddpm.py'), 'train', *tiny, '--epochs', epochs, '--out', str(out),
                                *resume, *[str(out / 'ckpt.pt')] * len(resume)], capture_output=True, text=True,
                               timeout=300, cwd=ROOT)
            assert r.returncode == 0 and r.stdout.count('done:') == 1, r.stdout + r.stderr  # rank 0 logs alone
    one, two = (ddpm.load_checkpoint(tmp_path / name / 'ckpt.pt') for name in ('one', 'two'))
    assert one['step'] == two['step'] == 8
    for key in ('model', 'ema'):
        for name, value in one[key].items():
            torch.testing.assert_close(two[key][name], value, rtol=0, atol=1e-5, msg=f'{key} {name}')
    files = sorted(p.name for p in (tmp_path / 'two').iterdir())
    assert files == ['ckpt.pt', 'log.csv', 'samples_epoch1.png', 'samples_epoch2.png'], files
    assert len((tmp_path / 'two' / 'log.csv').read_text().splitlines()) == 2  # one line per epoch: rank 0's


def test_compile_and_amp_train_close_to_eager(tmp_path):
    needs_mnist()
    if not torch._dynamo.is_dynamo_supported() or not shutil.which(os.environ.get('CXX', 'g++')):
        pytest.skip('torch.compile is not supported here (it needs Dynamo and a C++ compiler on the CPU)')
    tiny = [*TINY[:-1], '16,32', '--epochs', '1']
    weights = {}
    for flags in ([], ['--compile'], ['--amp']):
        ddpm.main(['train', *tiny, *flags, '--out', str(tmp_path / str(flags))])
        weights[tuple(flags)] = ddpm.load_checkpoint(tmp_path / str(flags) / 'ckpt.pt')['model']
    for flags, tolerance in ((('--compile',), 5e-4), (('--amp',), 2e-2)):  # one Adam step: up to lr = 3e-3
        gap = max((weights[flags][n] - w).abs().max().item() for n, w in weights[()].items())
        assert gap < tolerance, (flags, gap)
    assert gap > 1e-5  # bfloat16 autocast did change the arithmetic


def test_import_has_no_side_effects(tmp_path):
    r = subprocess.run([sys.executable, '-c', f'import sys; sys.path.insert(0, {str(ROOT)!r}); import ddpm, fid'],
                       capture_output=True, text=True, cwd=tmp_path, timeout=60)
    assert r.returncode == 0 and r.stdout == '' and r.stderr == '' and list(tmp_path.iterdir()) == []

# --- fid.py -----------------------------------------------------------------------------------------------


def test_frechet_distance_closed_forms():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(500, 6))
    mu, sigma = a.mean(0), np.cov(a, rowvar=False)
    assert abs(fid.frechet_distance(mu, sigma, mu, sigma)) < 1e-6
    d1, d2, m1, m2 = rng.uniform(0.5, 2, 6), rng.uniform(0.5, 2, 6), rng.normal(size=6), rng.normal(size=6)
    expected = ((m1 - m2) ** 2).sum() + (d1 + d2 - 2 * np.sqrt(d1 * d2)).sum()  # diagonal covariances
    assert abs(fid.frechet_distance(m1, np.diag(d1), m2, np.diag(d2)) - expected) < 1e-8
    b = rng.normal(size=(500, 6)) * 2 + 1
    stats_b = b.mean(0), np.cov(b, rowvar=False)
    assert abs(fid.frechet_distance(mu, sigma, *stats_b) - fid.frechet_distance(*stats_b, mu, sigma)) < 1e-8


def test_frechet_distance_of_singular_covariances():
    sigma = np.zeros((4, 4))
    sigma[0, 0] = 1.0
    assert abs(fid.frechet_distance(np.zeros(4), sigma, np.zeros(4), sigma)) < 1e-4


def test_mnist_feature_net_is_accurate():
    needs_mnist()
    extractor = fid.Extractor('mnist')
    assert fid.accuracy(extractor.net, DATA) >= 0.99


def test_mnist_fid_is_zero_on_itself_and_grows_with_noise():
    needs_mnist()
    extractor, (images, _) = fid.Extractor('mnist'), fid.load_mnist(DATA, train=False)
    images = images[:2000]
    stats = fid.statistics(extractor(images))
    assert abs(fid.frechet_distance(*stats, *stats)) < 1e-6
    rng, scores = np.random.default_rng(0), []
    for noise in (10, 40, 80):
        noisy = np.clip(images + rng.normal(0, noise, images.shape), 0, 255).astype(np.uint8)
        scores.append(fid.frechet_distance(*stats, *fid.statistics(extractor(noisy))))
    assert 0 < scores[0] < scores[1] < scores[2], scores


def test_inception_features_separate_real_from_noise():
    try:
        extractor = fid.Extractor('inception', batch=50)
    except fid.FIDError:
        assert not os.environ.get('CI'), 'CI must provide the Inception weights (see .ci/run)'
        pytest.skip('Inception weights not available here')
    needs_mnist()
    images = fid.load_mnist(DATA, train=False)[0]
    a, b = extractor(images[:150]), extractor(images[150:300])
    noise = extractor(np.random.default_rng(0).integers(0, 256, (150, 28, 28), dtype=np.uint8))
    assert a.shape == (150, 2048)
    real = fid.frechet_distance(*fid.statistics(a), *fid.statistics(b))
    fake = fid.frechet_distance(*fid.statistics(a), *fid.statistics(noise))
    assert real < fake / 5, (real, fake)


def test_fid_cli_bad_inputs(tmp_path):
    np.savez(tmp_path / 'float.npz', samples=np.zeros((5, 28, 28), np.float32))
    np.savez(tmp_path / 'one.npz', samples=np.zeros((1, 28, 28), np.uint8))
    np.savez(tmp_path / 'shape.npz', samples=np.zeros((5, 28), np.uint8))
    cases = [('missing.npz', 'cannot read samples'), ('float.npz', 'expected uint8 images'),
             ('one.npz', 'at least 2 samples'), ('shape.npz', 'expected uint8 images')]
    for name, message in cases:
        r = subprocess.run([sys.executable, str(ROOT / 'fid.py'), str(tmp_path / name), '--data', DATA],
                           capture_output=True, text=True, timeout=120, cwd=ROOT)
        assert r.returncode != 0 and message in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_fid_cli_scores_samples(tmp_path):
    needs_mnist()
    train = fid.load_mnist(DATA, train=True)[0]
    images = train[np.random.default_rng(1).permutation(len(train))[:2000]]  # the file's order is not random
    np.savez(tmp_path / 's.npz', samples=images)
    r = subprocess.run([sys.executable, str(ROOT / 'fid.py'), str(tmp_path / 's.npz'), '--data', DATA, '--json'],
                       capture_output=True, text=True, timeout=300, cwd=ROOT,
                       env=dict(os.environ, FID_CACHE=str(tmp_path)))
    assert r.returncode == 0, r.stderr
    import json
    report = json.loads(r.stdout)
    # real digits score near the floor: 10-16 over five random subsets of 2000 (15-22 at 1000, 4-5 at 10000)
    assert report['n'] == 2000 and report['weights'] == fid.sha256(fid.MNIST_WEIGHTS)[:12] and 0 < report['fid'] < 25
    assert list(tmp_path.glob('mnist-test-mnist-*-10000.npz'))  # reference statistics cached, keyed
