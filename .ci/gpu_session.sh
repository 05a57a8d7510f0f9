#!/usr/bin/env bash
# A session's GPU work in one device call (issues #51, #52): the CUDA tests, the README snippet, .ci/bench.py
# eager and --fast rows, 60-epoch runs that must end by LIMIT seconds (SIGINT saves them), then 3 seeds of
# 10,000 samples of each run and its EMA in float16, packed into $OUT/partNN (cat them, then tar -x).
# Before it: MNIST's four raw files gzipped into .mnist/ (listed in .git/info/exclude), then
#   run: bash .ci/gpu_session.sh 2>&1 | tee $OUT/console.txt    carry: [".mnist"]    timeout_s: 600
# Score the samples here with python fid.py. DRY=1 runs it all small on the CPU to check the script.
set -u
T0=$(date +%s)
el() { echo $(( $(date +%s) - T0 )); }
LIMIT=${LIMIT:-545}             # seconds for all of it
export PYTHONUNBUFFERED=1 DDPM_DATA=/tmp/mnist-data
OUT=${OUT:-/tmp/out}; W=/tmp/work; R=$W/runs; S=$W/samples
mkdir -p $DDPM_DATA/MNIST/raw $R $S $OUT
for f in .mnist/*.gz; do gunzip -c $f > $DDPM_DATA/MNIST/raw/$(basename $f .gz); done
if [ "${DRY:-0}" = 1 ]; then
  SMALL="--limit 1024 --widths 8,16 --T 20 --epochs 2 --device cpu"; N=120; DEV=cpu
else
  SMALL=""; N=10000; DEV=cuda
fi
{ nvidia-smi --query-gpu=name,driver_version,clocks.max.sm --format=csv; python -c 'import torch; print(torch.__version__, torch.version.cuda)'; nproc; } > $W/env.txt 2>&1
cat $W/env.txt
echo "== tests on CUDA, README snippet ($(el)s)"
timeout 150 python -m pytest -q -k cuda test_ddpm.py 2>&1 | tail -15 | tee $W/pytest.txt
awk '/^```python/{f=1; next} /^```/{f=0} f' README.md > $W/snippet.py
PYTHONPATH=$PWD timeout 60 python $W/snippet.py 2>&1 | tail -3 | tee $W/snippet.txt
echo "== speed ($(el)s)"
timeout 60 python .ci/bench.py --device $DEV --rows depth2:32,depth2:256 --steps 200 --warmup 20 2>&1 | tee $W/bench_eager.txt
timeout 90 python .ci/bench.py --device $DEV --rows depth2:32,depth2:256,depth2:1024 --steps 300 --warmup 10 --fast 2>&1 | tee $W/bench_fast.txt
DONE=""; NDONE=0
if [ "${DRY:-0}" != 1 ] && tail -1 $W/pytest.txt | grep -qi "failed\|error\|no tests"; then
  echo "== the fast path is broken: no training runs"; LIMIT=0
fi
train() {  # NAME FLAGS...: a run in $R/NAME that must end, saved, by the deadline
  local name=$1; shift
  local left=$(( LIMIT - 20 * (NDONE + 3) - $(el) ))  # keep time to sample the runs
  if [ $left -lt 45 ]; then echo "== skip $name: $left s left"; return; fi
  echo "== train $name $* ($(el)s, at most ${left}s)"
  timeout -s INT $left python ddpm.py train --out $R/$name $SMALL "$@" > $W/log_$name.txt 2>&1
  echo "rc $? at $(el)s"; tail -3 $W/log_$name.txt
  if [ -f $R/$name/ckpt.pt ]; then DONE="$DONE $name"; NDONE=$((NDONE + 1)); fi
}
train b512 --batch 512
train d32
train b1024 --batch 1024
train c512 --batch 512 --cond
train b256 --batch 256
echo "== sample: $DONE ($(el)s)"
python - $N $R $S $DONE <<'EOF' 2>&1 | grep -v samples/s | tee $W/sample.txt
import sys, time, torch, ddpm
n, runs, samples, names = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4:]
for name in names:
    ckpt = f'{runs}/{name}/ckpt.pt'
    for seed in range(3):
        t = time.time()
        try:
            ddpm.main(['sample', '--ckpt', ckpt, '--n', n, '--seed', str(seed), '--out', '',
                       '--npz', f'{samples}/{name}_s{seed}.npz',
                       *(['--digit', 'all'] if name.startswith('c') else [])])
        except SystemExit as e:
            print(name, seed, e)
    full = torch.load(ckpt, weights_only=True)  # the EMA in float16, as assets/ keeps it
    slim = {k: full[k] for k in ('format', 'config', 'args', 'step', 'seconds')}
    slim['ema'] = {k: v.half() if v.is_floating_point() else v for k, v in full['ema'].items()}
    torch.save(slim, f'{samples}/{name}.pt')
    print(name, 'step', full['step'], 'seconds', round(full['seconds'], 1), flush=True)
EOF
echo "== pack ($(el)s)"
cp $W/*.txt $S/
tar -cf $W/all.tar -C $W samples
split -b 15M -d $W/all.tar $OUT/part
ls -la $OUT; echo "end $(el)s"
