"""The frozen-encoder recipe's ridge head with many labels: the direct fit against the Gram-summed fit `train` uses.

With more labels than embedding dimensions (FineWeb-Edu: ~450k annotations), `classifiers/head.py` sums per-fold Gram
matrices over blocks of float32 rows instead of standardising float64 copies of the embeddings. Both fits run in this
process on the same random embeddings (offset like pooled layers) and labels, with the same search (5 folds, 25
alphas, and with `--weighted` the three flattenings); printed per size: wall seconds, peak memory allocated beyond the
embeddings (tracemalloc) as a multiple of their float32 size, their ratios, and whether the chosen alpha and the
out-of-fold predictions agree. The direct fit runs on one BLAS thread, as it always did; the Gram fit uses the
threads for large fits.

    python benchmarks/bench_head.py                       # 20k and 60k rows x 2304 (MiniLM, six layers): ~4 min
    python benchmarks/bench_head.py --rows 100000 --dims 4608 --no-direct   # arctic-embed-m's six layers
"""

from __future__ import annotations

import argparse
import time
import tracemalloc

import numpy as np
from threadpoolctl import threadpool_limits

from edu_filter.classifiers import head


def measure(fit, x, y, weights) -> tuple[float, float, tuple]:
    tracemalloc.start()
    try:
        start = time.perf_counter()
        result = fit(x, y, 5, 0, weights)
        seconds = time.perf_counter() - start
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    return seconds, peak / x.nbytes, result


def direct(x, y, folds, seed, weights):
    with threadpool_limits(1):
        return head._fit_ridge_head(x, y, folds, seed, weights)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", default="20000,60000", help="comma-separated numbers of labelled rows")
    parser.add_argument("--dims", type=int, default=2304)
    parser.add_argument("--weighted", action="store_true", help="inclusion weights (three fits per fold)")
    parser.add_argument("--no-direct", action="store_true", help="skip the direct fit (memory: ~12x the embeddings)")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    print(f"{'rows':>8} {'dims':>5} {'direct s':>9} {'gram s':>7} {'speed-up':>8} {'direct mem':>10} "
          f"{'gram mem':>8} {'same alpha':>10} {'max |oof diff|':>14}")
    for n in (int(r) for r in args.rows.split(",")):
        x = (0.3 + 0.05 * rng.normal(size=(n, args.dims))).astype(np.float32)
        y = np.clip(np.round(10 * x[:, :8].sum(axis=1) - 23 + rng.normal(0, 1, n)), 0, 5)
        weights = rng.uniform(0.5, 4.0, n) if args.weighted else None
        gram_s, gram_mem, gram = measure(head.fit_ridge_head, x, y, weights)
        if args.no_direct:
            print(f"{n:>8} {args.dims:>5} {'':>9} {gram_s:>7.1f} {'':>8} {'':>10} {gram_mem:>7.2f}x")
            continue
        direct_s, direct_mem, plain = measure(direct, x, y, weights)
        print(f"{n:>8} {args.dims:>5} {direct_s:>9.1f} {gram_s:>7.1f} {direct_s / gram_s:>7.1f}x {direct_mem:>9.2f}x "
              f"{gram_mem:>7.2f}x {str(plain[2] == gram[2]):>10} {np.abs(plain[1] - gram[1]).max():>14.2e}",
              flush=True)


if __name__ == "__main__":
    main()
