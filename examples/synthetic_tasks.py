"""A synthetic language with long-range structure, and two tasks on it.

The language ("topic Markov"): a sequence is ``[CLS] x_1 … x_{L-1}``. Each
content token follows the previous one through a transition table that
depends on a hidden *topic*::

    T_z = (1 - ρ)·B + ρ·S_z          B: shared background table, S_z: topic z's own table
    T'_z = (1 - ε)·T_z + ε/V         ε: noise, any token at all

B and every S_z are sparse (``branching`` successors per token, Dirichlet
weights), so most transitions say little about the topic and a few say a
lot. Half the sequences switch to a different topic at a position drawn from
the middle half; the other half keep one topic throughout.

* **Pre-training: masked-token prediction** (BERT's MLM). A masked token is
  predicted best from its neighbours *and* the topic of its segment, which
  only the rest of the sequence reveals: a model that beats the
  neighbours-only Bayes predictor (``mlm_baselines``) is using long-range
  context.
* **Downstream: topic-switch detection** (binary classification): does the
  sequence change topic? This is a different task (a sequence-level label,
  never seen in pre-training) that needs what pre-training had to learn
  (inferring the topic of each stretch of text) and then comparing two
  stretches. ``switch_bayes_accuracy`` gives the best accuracy any model can
  reach (exact posterior over change point and topics).

Everything is generated from seeds with ``torch.Generator``: no files, no
global random state touched.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

PAD, CLS, SEP, MASK = 0, 1, 2, 3
N_SPECIAL = 4


@dataclass(frozen=True)
class TopicLanguage:
    """The generator's tables. ``tables[z]`` is T'_z over content tokens (rows sum to 1)."""

    tables: torch.Tensor  # (K, V, V) float64
    seq_len: int  # including [CLS]

    @property
    def n_topics(self) -> int:
        return self.tables.shape[0]

    @property
    def n_content(self) -> int:
        return self.tables.shape[1]

    @property
    def vocab_size(self) -> int:
        return self.n_content + N_SPECIAL

    @property
    def switch_range(self) -> tuple[int, int]:
        """Inclusive range of the first content position generated under the second topic."""
        n = self.seq_len - 1
        return 1 + n // 4, 1 + (3 * n) // 4


@dataclass(frozen=True)
class Corpus:
    ids: torch.Tensor  # (N, L) int64, ids[:, 0] == CLS
    topics: torch.Tensor  # (N, L) int64: topic that generated each token (column 0 unused)
    switched: torch.Tensor  # (N,) int64, 1 if the topic changes


def _sparse_rows(v: int, branching: int, g: torch.Generator, among: torch.Tensor | None = None) -> torch.Tensor:
    """A (v, v) transition table with ``branching`` successors per row (drawn from ``among``), Dirichlet(1) weights."""
    among = torch.arange(v) if among is None else among
    table = torch.zeros(v, v, dtype=torch.float64)
    for a in range(v):
        succ = among[torch.randperm(len(among), generator=g)[:branching]]
        w = -torch.log(torch.rand(branching, generator=g, dtype=torch.float64))  # Exp(1) → Dirichlet(1)
        table[a, succ] = w / w.sum()
    return table


def make_language(seed: int = 0, n_content: int = 64, n_topics: int = 8, branching: int = 4,
                  topic_weight: float = 0.35, noise: float = 0.1, seq_len: int = 64,
                  topic_vocab: int | None = None) -> TopicLanguage:
    """``topic_vocab``: topic z's own transitions lead only into z's own random subset of that many tokens."""
    g = torch.Generator().manual_seed(seed)
    background = _sparse_rows(n_content, branching, g)
    tables = []
    for _ in range(n_topics):
        among = None if topic_vocab is None else torch.randperm(n_content, generator=g)[:topic_vocab]
        tables.append((1 - topic_weight) * background + topic_weight * _sparse_rows(n_content, branching, g, among))
    tables = torch.stack(tables)
    tables = (1 - noise) * tables + noise / n_content
    return TopicLanguage(tables, seq_len)


def sample(lang: TopicLanguage, n: int, seed: int) -> Corpus:
    """``n`` sequences, half with a topic switch (position uniform in ``switch_range``)."""
    g = torch.Generator().manual_seed(seed)
    k, v, length = lang.n_topics, lang.n_content, lang.seq_len
    z1 = torch.randint(0, k, (n,), generator=g)
    switched = torch.rand(n, generator=g) < 0.5
    z2 = (z1 + torch.randint(1, k, (n,), generator=g)) % k  # uniform over the other topics
    z2 = torch.where(switched, z2, z1)
    lo, hi = lang.switch_range
    at = torch.randint(lo, hi + 1, (n,), generator=g)
    pos = torch.arange(length)
    topics = torch.where(pos[None, :] >= at[:, None], z2[:, None], z1[:, None])
    tokens = torch.empty(n, length, dtype=torch.int64)
    tokens[:, 0] = -1
    tokens[:, 1] = torch.randint(0, v, (n,), generator=g)
    cdf = lang.tables.cumsum(-1)
    cdf[..., -1] = 1.0  # rounding must not leave a gap above the last token
    u = torch.rand(length, n, 1, generator=g, dtype=torch.float64)
    for t in range(2, length):
        rows = cdf[topics[:, t], tokens[:, t - 1]]  # (n, v): inverse-CDF sampling, one draw per token
        tokens[:, t] = torch.searchsorted(rows, u[t]).squeeze(1).clamp(max=v - 1)
    ids = tokens + N_SPECIAL
    ids[:, 0] = CLS
    return Corpus(ids, topics, switched.long())


def mask_tokens(ids: torch.Tensor, g: torch.Generator, rate: float = 0.15,
                replace: tuple[float, float] = (0.8, 0.1)) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT masking of content positions: returns (inputs, labels with -100 where not predicted).

    Of the chosen positions, ``replace[0]`` become [MASK], ``replace[1]`` a random
    content token, the rest keep their token. ``replace=(1, 0)`` masks all (evaluation).
    """
    chosen = torch.rand(ids.shape, generator=g) < rate
    chosen[:, 0] = False
    labels = torch.where(chosen, ids, torch.full_like(ids, -100))
    u = torch.rand(ids.shape, generator=g)
    inputs = ids.clone()
    inputs[chosen & (u < replace[0])] = MASK
    rand = chosen & (u >= replace[0]) & (u < replace[0] + replace[1])
    n_content = int(ids.max()) + 1 - N_SPECIAL
    inputs[rand] = torch.randint(N_SPECIAL, N_SPECIAL + n_content, (int(rand.sum()),), generator=g)
    return inputs, labels


def mlm_baselines(lang: TopicLanguage, corpus: Corpus, labels: torch.Tensor) -> dict[str, float]:
    """Accuracy at the predicted positions of three reference predictors.

    * ``chance``: 1 / number of content tokens;
    * ``neighbours``: Bayes predictor from the *true* left and right neighbours,
      topic unknown (uniform over topics, as a model that ignores the rest of
      the sequence must assume);
    * ``neighbours+topic``: the same with the true topic of each transition given.

    Both use the true neighbours even where the model saw them masked, so
    they are upper bounds for predictors with that information.
    """
    x = corpus.ids - N_SPECIAL
    n, length = x.shape
    tables = lang.tables
    rows, cols = torch.nonzero(labels != -100, as_tuple=True)
    v = lang.n_content
    left = torch.ones(len(rows), lang.n_topics, v, dtype=torch.float64)
    right = torch.ones_like(left)
    has_left = cols >= 2
    a = x[rows[has_left], cols[has_left] - 1]
    left[has_left] = tables[:, a, :].permute(1, 0, 2)  # P(x_t | x_{t-1}, z) for every z
    has_right = cols <= length - 2
    rr, cc = rows[has_right], cols[has_right]
    b = x[rr, (cc + 1).clamp(max=length - 1)]
    right[has_right] = tables[:, :, b].permute(2, 0, 1)  # P(x_{t+1} = b | x_t, z) for every z
    truth = x[rows, cols]
    no_topic = (left * right).sum(1).argmax(-1)
    z_here = corpus.topics[rows, cols]
    z_next = corpus.topics[rows, (cols + 1).clamp(max=length - 1)]
    idx = torch.arange(len(rows))
    with_topic = (left[idx, z_here] * right[idx, z_next]).argmax(-1)
    return {"chance": 1.0 / v,
            "neighbours": (no_topic == truth).double().mean().item(),
            "neighbours+topic": (with_topic == truth).double().mean().item()}


def transition_logliks(lang: TopicLanguage, ids: torch.Tensor) -> torch.Tensor:
    """(K, N, L-2): log P(x_t | x_{t-1}, z) for every topic z and content position t >= 2."""
    x = ids - N_SPECIAL
    return lang.tables.log()[:, x[:, 1:-1], x[:, 2:]]


def switch_posterior(lang: TopicLanguage, ids: torch.Tensor) -> torch.Tensor:
    """Exact P(switched | sequence) under the generator (prior 1/2, change point and topics uniform)."""
    # lp[n, t, z] = log P(x_t | x_{t-1}, z) for t >= 2 (x_1 is uniform: no information)
    lp = transition_logliks(lang, ids).permute(1, 2, 0)
    lp = torch.cat([torch.zeros(ids.shape[0], 2, lang.n_topics, dtype=lp.dtype), lp], 1)  # index = position
    cum = lp.cumsum(1)  # cum[:, t] = log-lik of positions 0..t
    total = cum[:, -1]  # (N, K)
    k = lang.n_topics
    log_same = torch.logsumexp(total, -1) - math.log(k)
    lo, hi = lang.switch_range
    s = torch.arange(lo, hi + 1)
    before = cum[:, s - 1]  # (N, S, K): positions < s under z1
    after = total[:, None, :] - before  # positions >= s under z2
    pair = before[:, :, :, None] + after[:, :, None, :]  # (N, S, K, K)
    off_diag = ~torch.eye(k, dtype=torch.bool)
    log_switch = torch.logsumexp(pair[:, :, off_diag].flatten(1), -1) - math.log(len(s) * k * (k - 1))
    return torch.sigmoid(log_switch - log_same)


def switch_bayes_accuracy(lang: TopicLanguage, corpus: Corpus) -> float:
    """The best accuracy any classifier can reach on ``corpus`` (the Bayes decision)."""
    pred = (switch_posterior(lang, corpus.ids) > 0.5).long()
    return (pred == corpus.switched).double().mean().item()


@dataclass(frozen=True)
class Labelled:
    ids: torch.Tensor  # (N, L) int64, ids[:, 0] == CLS
    labels: torch.Tensor  # (N,) int64


def corrupt(lang: TopicLanguage, corpus: Corpus, rate: float, seed: int) -> Labelled:
    """Corruption detection: half the sequences get each content token replaced with probability ``rate``.

    A replaced token is uniform over content tokens, so it breaks the transitions on both
    sides of it; spotting that needs the transition statistics masked-token pre-training
    learns, and nothing about topics. Label 1: corrupted.
    """
    g = torch.Generator().manual_seed(seed)
    n, length = corpus.ids.shape
    label = torch.rand(n, generator=g) < 0.5
    hit = (torch.rand(n, length, generator=g) < rate) & label[:, None]
    hit[:, 0] = False
    noise = torch.randint(N_SPECIAL, N_SPECIAL + lang.n_content, (n, length), generator=g)
    return Labelled(torch.where(hit, noise, corpus.ids), label.long())


def likelihood_scores(lang: TopicLanguage, ids: torch.Tensor) -> torch.Tensor:
    """Mean log-likelihood per transition under the true tables, topic unknown (mixture over topics).

    A sequence-level score a reference classifier thresholds: it knows the generator,
    which no trained model does.
    """
    lp = transition_logliks(lang, ids)
    return (torch.logsumexp(lp.sum(-1), 0) - math.log(lang.n_topics)) / lp.shape[-1]


def likelihood_reference_accuracy(lang: TopicLanguage, fit: Labelled, test: Labelled) -> float:
    """Accuracy on ``test`` of the best threshold on :func:`likelihood_scores`, chosen on ``fit``."""
    s_fit, s_test = likelihood_scores(lang, fit.ids), likelihood_scores(lang, test.ids)
    return ((s_test < best_threshold(s_fit, fit.labels)).long() == test.labels).double().mean().item()


def best_threshold(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """The score ``t`` among ``scores`` for which ``scores < t`` predicts ``labels`` best (first such).

    Sorted prefix counts, so O(N log N): trying every threshold against every
    score is N² comparisons, 655 million at the full mode's 25600 examples.
    """
    order = torch.argsort(scores)
    ones_before = torch.cat([torch.zeros(1, dtype=torch.long), torch.cumsum(labels[order].long(), 0)])
    below = torch.searchsorted(scores[order], scores, right=False)  # how many scores are < each one
    zeros = int((labels == 0).sum())
    correct = ones_before[below] + zeros - (below - ones_before[below])
    return scores[int(torch.argmax(correct))].item()  # argmax: the first of equal maxima

