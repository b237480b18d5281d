"""`score --select active`: choose which documents the LLM annotates, in rounds, and weight them so that training
on the chosen sample estimates training on the whole pool.

Rounds. The pool's frozen-encoder embeddings are computed once (through the embedding cache, keyed as `train` keys
them), when a round is first drawn rather than replayed. Round 0 draws a seed batch uniformly. Every later round
refits the ridge head on the labels so far (weighted, as `train` fits it), places the cut points on its out-of-fold
predictions, and draws the next batch from the documents not yet chosen with probabilities that favour what the next
labels teach most:

- the rare high scores and the cut that separates them: p = P(label >= T) under the head's prediction, the
  calibrated cut point of threshold T (3 web, 4 code: the presets' decisions) and the head's out-of-fold error; the
  priority is p squared, which puts the draw on likely positives and on the documents around the cut (p near 1/2)
  rather than on the bulk the head is sure scores low;
- a uniform share (20% of each draw), so every document keeps a probability of at least
  `uniform_share * n / remaining` and no weight can explode;
- diversity: the batch is a systematic sample along the pool ordered by embedding cluster (clusters in random order,
  by prediction inside each), which spreads it over the clusters and the score range instead of piling it on one
  corner of the embedding space.

These choices were made by cross-validation on the bundled web training split (pools of 750, half of them
labelled): uncertainty summed over thresholds 2-4, predictive variance, other sharpness and uniform shares, and 10
rounds instead of 5 were no better (benchmarks/RESULTS.md).

Weights. Every draw is a systematic probability-proportional-to-size sample, whose inclusion probability is exactly
the probability given, pi_i. Round t then gives an unbiased estimate of any pool total, sum_pool f: the documents
labelled before it count once and each document it draws counts 1/pi_i (a Horvitz-Thompson estimate of what was
still unlabelled). Averaging the rounds' estimates with fixed shares lambda_t = n_t / N (N the budget) stays
unbiased and gives each document chosen in round s the weight

    w_i = lambda_s / pi_i + sum_{t > s} lambda_t

(a seed document, pi = n_0 / pool: pool / N + 1 - n_0 / N). The weighted sum of any per-document quantity over the
chosen sample, e.g. the squared error of a fit or the true positives at a cut, is then an unbiased estimate of its sum
over the pool, which is what `train` needs to fit and calibrate as if it had seen the pool.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from edu_filter.documents import InputError

DEFAULT_ROUNDS = 5
UNIFORM_SHARE = 0.2  # of each round's draw spread uniformly over the remaining pool (floor on every probability)
SHARPNESS = 2  # the priority is P(label >= threshold) to this power
CLUSTERS = 16
CLUSTER_DIMENSIONS = 32  # principal components the clusters are found in
PCA_FIT_ROWS = 20_000  # rows the components are fitted on (a larger pool is projected in blocks of this size)


def round_sizes(budget: int, rounds: int, seed_size: int | None) -> list[int]:
    """Documents per round: the seed batch (default: an equal share), then the rest spread evenly."""
    if budget < 1:
        raise ValueError("--sample (the annotation budget) must be a positive number of documents")
    if rounds < 1:
        raise ValueError("--rounds must be >= 1")
    if rounds == 1:
        if seed_size is not None:
            raise ValueError("--seed-size is the first of several rounds: with --rounds 1 leave it out")
        return [budget]
    seed = math.ceil(budget / rounds) if seed_size is None else seed_size
    if not 1 <= seed <= budget:
        raise ValueError(f"--seed-size must be between 1 and the budget ({budget}), got {seed}")
    rest = budget - seed
    later = min(rounds - 1, rest)  # rounds beyond the budget would be empty (and --rounds 10**9 a list of 10**9)
    return [seed] + [rest // later + (k < rest % later) for k in range(later)]


def inclusion_probabilities(priority: np.ndarray, n: int, uniform_share: float) -> np.ndarray:
    """Probabilities summing to n, each at most 1: a uniform share plus the rest in proportion to priority.

    Documents whose share would exceed 1 are taken for sure (probability 1) and the others rescaled, repeatedly."""
    m = len(priority)
    if n >= m:
        return np.ones(m)
    priority = np.asarray(priority, dtype=np.float64)
    if priority.sum() <= 0 or not np.isfinite(priority).all():
        priority = np.ones(m)
    share = uniform_share / m + (1 - uniform_share) * priority / priority.sum()
    pi = np.zeros(m)
    certain = np.zeros(m, dtype=bool)
    while True:
        left = n - certain.sum()
        pi[~certain] = left * share[~certain] / share[~certain].sum()
        over = (pi > 1) & ~certain
        if not over.any():
            break
        certain |= over
        pi[certain] = 1.0
    return pi


def systematic_sample(probabilities: np.ndarray, order: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Indices of a systematic sample with inclusion probabilities exactly `probabilities` (which sum to an integer
    n, each at most 1): lay them end to end in `order` and take the items under u, u+1, ..., u+n-1 for one uniform
    u in [0, 1). The order does not change the inclusion probabilities; it makes the sample spread along it."""
    p = probabilities[order]
    n = int(round(p.sum()))
    cumulative = np.cumsum(p)
    cumulative *= n / cumulative[-1]  # exact total, whatever the rounding
    points = rng.random() + np.arange(n)
    return np.sort(order[np.searchsorted(cumulative, points, side="right")])


def inclusion_weights(sizes: list[int], chosen_round: np.ndarray, probability: np.ndarray) -> np.ndarray:
    """w_i = lambda_s / pi_i + sum_{t > s} lambda_t for documents chosen in round s (see the module docstring);
    `sizes` are the round sizes that fix lambda_t = n_t / sum(n). NaN where not chosen."""
    shares = np.asarray(sizes, dtype=np.float64) / sum(sizes)
    later = np.r_[np.cumsum(shares[::-1])[::-1][1:], 0.0]  # sum of the shares of the rounds after each round
    w = np.full(len(chosen_round), np.nan)
    chosen = chosen_round >= 0
    s = chosen_round[chosen]
    w[chosen] = shares[s] / probability[chosen] + later[s]
    return w


def priorities(predictions: np.ndarray, cut: float, sigma: float) -> np.ndarray:
    """What labelling each document is expected to teach: P(label >= threshold) squared, under a normal error of
    the head's out-of-fold size around the calibrated cut of that threshold."""
    from scipy.special import ndtr

    return ndtr((predictions - cut) / max(float(sigma), 1e-3)) ** SHARPNESS


def cluster_labels(embeddings: np.ndarray, seed: int) -> np.ndarray:
    """A cluster per document (k-means on the leading principal components), computed once per pool."""
    from sklearn.cluster import KMeans
    from sklearn.decomposition import PCA
    from threadpoolctl import threadpool_limits

    n = len(embeddings)
    k = min(CLUSTERS, max(1, n // 10))
    if k == 1:
        return np.zeros(n, dtype=np.int64)
    with threadpool_limits(1):
        pca = PCA(min(CLUSTER_DIMENSIONS, n, embeddings.shape[1]), random_state=seed)
        if n <= PCA_FIT_ROWS:
            reduced = pca.fit_transform(embeddings)
        else:  # fitted on a sample, applied in blocks: no centred copy of the whole pool's embeddings
            pca.fit(embeddings[np.sort(np.random.default_rng(seed).choice(n, PCA_FIT_ROWS, replace=False))])
            reduced = np.concatenate([pca.transform(embeddings[i:i + PCA_FIT_ROWS]) for i in range(0, n, PCA_FIT_ROWS)])
        return KMeans(k, n_init=1, random_state=seed).fit_predict(reduced).astype(np.int64)


@dataclass
class RoundChoice:
    round: int
    indices: np.ndarray  # positions in the pool
    probabilities: np.ndarray  # inclusion probability of each, given the rounds before


class ActiveSelector:
    """The selection over one pool: which documents each round draws and with what probability.

    Pure (no LLM): `choose(round, labels)` returns the round's draw, `record` replays a draw made earlier (a resumed
    run), `weights()` gives the inclusion weights of everything chosen so far."""

    def __init__(self, embeddings: np.ndarray | Callable[[], np.ndarray], budget: int, rounds: int = DEFAULT_ROUNDS,
                 seed_size: int | None = None, seed: int = 0, threshold: int = 3,
                 uniform_share: float = UNIFORM_SHARE, folds: int = 5, min_positives: int = 5,
                 pool_size: int | None = None):
        # `embeddings()` (with `pool_size`): computed at the first round drawn, not for a rerun replaying every round
        # (a pool of millions re-embedded, hours on a CPU, for answers all in the cache)
        self._embeddings, self._x, self._clusters = embeddings, None, None
        n = len(embeddings) if pool_size is None else pool_size
        self.budget = min(budget, n)
        # a budget that covers the pool labels all of it at once, every weight 1
        self.sizes = round_sizes(self.budget, rounds, seed_size) if budget < n else [n]
        self.seed, self.threshold, self.uniform_share = seed, threshold, uniform_share
        self.folds, self.min_positives = folds, min_positives
        self.chosen_round = np.full(n, -1, dtype=np.int64)
        self.probability = np.full(n, np.nan)

    @property
    def x(self) -> np.ndarray:
        # a pool of 100k documents at 4608 dimensions (the default encoders): 1.8 GB, past half the free memory a
        # file mapping (`cached_embeddings`)
        if self._x is None:
            given = self._embeddings() if callable(self._embeddings) else self._embeddings
            self._x = np.asarray(given, dtype=np.float32)
        return self._x

    @property
    def clusters(self) -> np.ndarray:
        if self._clusters is None:
            self._clusters = cluster_labels(self.x, self.seed)
        return self._clusters

    def prepare(self) -> None:
        """The pool embedded and clustered now, rather than at the first round drawn."""
        self.clusters  # noqa: B018 - computed on first use

    @property
    def rounds(self) -> int:
        return len(self.sizes)

    def record(self, choice: RoundChoice) -> None:
        if (self.chosen_round[choice.indices] >= 0).any():
            raise ValueError(f"round {choice.round} draws documents an earlier round drew")
        self.chosen_round[choice.indices] = choice.round
        self.probability[choice.indices] = choice.probabilities

    def weights(self) -> np.ndarray:
        """Inclusion weights of the documents chosen so far (NaN elsewhere), for the rounds drawn so far."""
        drawn = int(self.chosen_round.max()) + 1
        return inclusion_weights(self.sizes[:drawn], self.chosen_round, self.probability)

    def choose(self, round_index: int, labels: np.ndarray) -> RoundChoice:
        """Draw round `round_index` given the labels so far (NaN: not labelled, or the answer failed)."""
        rng = np.random.default_rng([self.seed, round_index])
        remaining = np.flatnonzero(self.chosen_round < 0)
        n = self.sizes[round_index]
        predictions = np.zeros(len(remaining))
        priority = np.ones(len(remaining))
        if round_index > 0:
            fitted = self._fit(labels)
            if fitted is not None:
                head, cut_points, sigma = fitted
                # (x @ w)[remaining], not x[remaining] @ w: the latter copies every unchosen embedding first
                predictions = (self.x @ head[0])[remaining].astype(np.float64) + head[1]
                priority = priorities(predictions, cut_points[self.threshold - 1], sigma)
        share = 1.0 if round_index == 0 else self.uniform_share
        pi = inclusion_probabilities(priority, n, share)
        # clusters in random order, by prediction inside each: systematic sampling along it spreads the batch
        cluster_rank = rng.permutation(int(self.clusters.max()) + 1)[self.clusters[remaining]]
        order = np.lexsort((rng.random(len(remaining)), predictions, cluster_rank))
        picked = systematic_sample(pi, order, rng)
        return RoundChoice(round_index, remaining[picked], pi[picked])

    def _fit(self, labels: np.ndarray):
        """The head on the labels so far (weighted by the rounds drawn), its cut points and out-of-fold error; None
        when there are too few labels to fit one."""
        labelled = np.flatnonzero((self.chosen_round >= 0) & np.isfinite(labels))
        y = labels[labelled]
        if len(labelled) < 2 * self.folds or np.ptp(y) == 0:
            return None
        from edu_filter.classifiers.calibration import fit_cut_points  # imported here: they bring torch
        from edu_filter.classifiers.head import RowsOf, fit_ridge_head

        w = self.weights()[labelled]
        head, oof, _, _ = fit_ridge_head(RowsOf(self.x, labelled), y, self.folds, self.seed, weights=w)
        cut_points = fit_cut_points(oof, y, min_positives=self.min_positives, weights=w)
        sigma = math.sqrt(np.average((oof - y) ** 2, weights=w))
        return head, cut_points, sigma


def pool_fingerprint(docs: list[dict]) -> str:
    """Identity of a pool: the set of its (id, text) pairs, in any order.

    Draws are recorded by id with their inclusion probabilities, so the same documents read in another order replay
    them, and later rounds drawn along the new order have inclusion probabilities just as exact. A document added,
    removed or edited changes it: the recorded probabilities (and the embeddings that steered them) were another
    pool's."""
    import hashlib

    def digest(doc: dict) -> bytes:
        return hashlib.sha256(f"{doc['id']}\0{doc['text']}".encode("utf-8", "surrogatepass")).digest()

    return hashlib.sha256(b"".join(sorted(map(digest, docs)))).hexdigest()[:20]


def selection_settings(budget: int, rounds: int, seed_size: int | None, seed: int, threshold: int,
                       embedding_key: str) -> dict:
    """What fixes the draws, as asked rather than as fitted to the pool: the key must not change with the pool, so
    that a changed pool is recognised (see `refuse_another_pool`)."""
    return {"budget": budget, "rounds": rounds, "seed_size": seed_size, "seed": seed, "threshold": threshold,
            "uniform_share": UNIFORM_SHARE, "sharpness": SHARPNESS, "embeddings": embedding_key}


def selection_key(settings: dict, answers_key: str) -> str:
    """Draws depend on the labels, hence on the answer run too (prompt, model, generation settings)."""
    from edu_filter.annotate.cache import run_key

    return run_key({**settings, "answers": answers_key})


def refuse_another_pool(recorded_pool: str | None, pool: str, cache_path) -> None:
    if recorded_pool not in (None, pool):
        raise InputError(
            f"{cache_path} holds this selection's draws from another pool: documents were added, removed or "
            "edited since they were drawn (or, for rows without ids, named by file and line, reordered, or their "
            "file renamed or moved), so their weights no longer hold and new draws would spend the "
            "budget again. Score the documents they were drawn from, or start a new selection with a new "
            "--cache (by default <output>.cache.sqlite: a new -o)"
        )


class ActiveAnnotation:
    """Runs the rounds: draw (or replay a recorded draw), have the LLM score the batch, feed the labels back.

    `score(batch_docs)` is the plain `score` path (prompt, backend, retries, answer cache); only drawn documents
    ever reach it, so the LLM sees at most the budget."""

    def __init__(self, docs: list[dict], embeddings: np.ndarray | Callable[[], np.ndarray], budget: int,
                 rounds: int = DEFAULT_ROUNDS, seed_size: int | None = None, seed: int = 0, threshold: int = 3,
                 embedding_key: str = "", encoder: str = "", pool: str | None = None):
        self.docs, self.encoder = docs, encoder
        self.selector = ActiveSelector(embeddings, budget, rounds, seed_size, seed, threshold, pool_size=len(docs))
        self.pool = pool or pool_fingerprint(docs)  # `pool`: the docs' fingerprint, when the caller has it already
        self.settings = selection_settings(budget, rounds, seed_size, seed, threshold, embedding_key)

    async def run(self, score, cache, announce=None, note=None) -> list[dict]:
        """Output rows of every drawn document, in pool order, with `round` and `weight`.

        Refused (InputError), before anything is asked, when the cache holds draws of this selection from another
        pool: their probabilities do not hold for this one, and drawing anew would spend the budget again. `note`
        is told when the cache holds draws of this pool by another selection, which this one does not replay."""
        key = selection_key(self.settings, cache.run_key)
        refuse_another_pool(cache.selection_pool(key), self.pool, cache.path)
        recorded = cache.selection(key)
        if not recorded and note is not None and (others := cache.drawn_by_other_selections(self.pool, key)):
            note(f"{cache.path} holds {others:,} documents this pool's earlier selections drew, with other settings "
                 "(--sample, --rounds, --seed-size, --seed, the encoder or its --max-length, or the answers' model, "
                 "prompt or generation settings): this selection draws anew; answers of the same model and settings "
                 "are used where it draws the same documents (the same settings replay those draws)")
        position = {doc["id"]: i for i, doc in enumerate(self.docs)}
        labels = np.full(len(self.docs), np.nan)
        rows: dict[int, dict] = {}
        for r in range(self.selector.rounds):
            replayed = r in recorded
            if not replayed:
                choice = self.selector.choose(r, labels)
                # as stored: another run sharing the cache may have drawn this round first
                recorded[r] = cache.record_selection(key, r, [(self.docs[i]["id"], p) for i, p in zip(
                    choice.indices, choice.probabilities)], self.pool)
            drawn = sorted(recorded[r], key=lambda pair: position[pair[0]])
            choice = RoundChoice(r, np.array([position[d] for d, _ in drawn]), np.array([p for _, p in drawn]))
            self.selector.record(choice)
            if announce is not None:
                announce(r, self.selector.rounds, len(choice.indices), replayed)
            batch = await score([self.docs[i] for i in choice.indices])
            for i, row in zip(choice.indices, batch):
                rows[int(i)] = row
                labels[i] = np.nan if row["score"] is None else row["score"]
        weights = self.selector.weights()
        out = []
        for i in sorted(rows):
            out.append({**rows[i], "round": int(self.selector.chosen_round[i]), "weight": float(weights[i])})
        return out
