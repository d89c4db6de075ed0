"""Diversity sampling of queries: which N queries to send to the teacher so that N covers the
query space, and a report of near-duplicate queries. Plain Python (no Django).

Method (the choice, and why):

- **Embeddings**: the bundled sentence encoder ``minilm-l6`` (all-MiniLM-L6-v2), mean pooling
  over the tokens under the attention mask, then L2 normalisation, as sentence-transformers
  defines it for this model (Reimers & Gurevych 2019, "Sentence-BERT"). On unit vectors the dot
  product is the cosine similarity.
- **Selection**: k-means with k = N (scikit-learn's ``KMeans``, k-means++ seeding, Arthur &
  Vassilvitskii 2007), then from each cluster the query nearest its centroid, as in "Diverse
  mini-batch active learning" (Zhdanov 2019, arXiv:1901.05954). We chose k-means over k-center
  greedy (Sener & Savarese 2018, core-sets) because k-center picks the farthest points first,
  i.e. outliers (odd or malformed queries), while the query nearest a centroid is a typical one
  of its region; both cover the space. Deterministic for a given ``seed``.
- **Near-duplicates**: every pair with cosine similarity >= ``threshold`` (default 0.95), grouped
  into connected components (a group holds queries linked by a chain of such pairs). Computed
  blockwise, so memory stays at ``block x n`` floats.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

#: Default cosine-similarity threshold for a near-duplicate pair.
DEFAULT_DUPLICATE_THRESHOLD = 0.95
#: The encoder used for the embeddings (a bundled short name, see ``workers.pipeline.registry``).
ENCODER = "minilm-l6"


class DiversityError(ValueError):
    """Bad input to the selection (the message names the setting)."""


@dataclass
class NearDuplicates:
    """Near-duplicate report over ``n`` texts: ``pairs`` ``[(i, j, cosine)]`` with ``i < j``
    (positions in the input), ``groups`` the connected components of size >= 2, largest first,
    each a sorted list of positions."""

    threshold: float
    pairs: list[tuple[int, int, float]] = field(default_factory=list)
    groups: list[list[int]] = field(default_factory=list)


def embed_texts(texts: list[str], *, model: str = ENCODER, cache_dir=None, policy=None, batch_size: int = 64,
                max_length: int = 128) -> np.ndarray:
    """Sentence embeddings of ``texts``: an array ``(len(texts), d)`` of float32, each row of unit
    L2 norm (d = 384 for MiniLM-L6). Mean pooling over the attention mask (Reimers & Gurevych
    2019). ``model`` is resolved through ``workers.pipeline.registry.resolve_model`` (bundled
    name, hub id or an allowed folder; ``policy`` as there). Texts longer than ``max_length``
    tokens are cut. Raises ``registry.ModelNotAvailable`` / ``security.Refused`` from the
    resolution. Runs on the GPU when torch sees one."""
    import torch
    from transformers import AutoModel, AutoTokenizer

    from workers.pipeline.registry import resolve_model

    if not texts:
        return np.zeros((0, 384), dtype=np.float32)
    path = resolve_model(model, cache_dir, policy=policy, field="encoder")
    tok = AutoTokenizer.from_pretrained(path)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    enc = AutoModel.from_pretrained(path).to(device)
    enc.eval()
    out = []
    with torch.inference_mode():
        for i in range(0, len(texts), batch_size):
            batch = tok(list(texts[i:i + batch_size]), padding=True, truncation=True, max_length=max_length,
                        return_tensors="pt").to(device)
            hidden = enc(**batch).last_hidden_state  # (b, tokens, d)
            mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            out.append(torch.nn.functional.normalize(pooled, p=2, dim=1).float().cpu().numpy())
    return np.concatenate(out).astype(np.float32)


def select_diverse(embeddings: np.ndarray, n: int, *, seed: int = 0) -> list[int]:
    """Positions of ``n`` rows of ``embeddings`` (shape ``(m, d)``) that cover the space: k-means
    with k = n (k-means++ seeding, ``n_init=4`` (1 above n = 256), ``random_state=seed``), then per cluster the row
    nearest its centroid (Zhdanov 2019). Returns ``min(n, m)`` distinct positions, ascending.
    When two clusters would pick the same row (identical rows), the next nearest free row of the
    cluster is taken. Raises DiversityError when ``n < 1``."""
    from sklearn.cluster import KMeans

    if n < 1:
        raise DiversityError(f"limit: {n} must be at least 1")
    m = int(embeddings.shape[0])
    if n >= m:
        return list(range(m))
    import warnings

    from sklearn.exceptions import ConvergenceWarning

    x = np.asarray(embeddings, dtype=np.float64)
    with warnings.catch_warnings():  # fewer distinct rows than n: handled below
        warnings.simplefilter("ignore", ConvergenceWarning)
        # k-means costs about m * n * d per iteration and per init: one init for large n.
        km = KMeans(n_clusters=n, n_init=4 if n <= 256 else 1, random_state=seed).fit(x)
    chosen: list[int] = []
    taken: set[int] = set()
    for c in range(n):
        members = np.flatnonzero(km.labels_ == c)
        if members.size == 0:  # cannot happen with sklearn's KMeans, but keep n picks
            members = np.arange(m)
        d = np.linalg.norm(x[members] - km.cluster_centers_[c], axis=1)
        for pos in members[np.argsort(d, kind="stable")]:
            if int(pos) not in taken:
                chosen.append(int(pos))
                taken.add(int(pos))
                break
    if len(chosen) < n:  # clusters of identical rows: fill with the lowest free positions
        chosen += [i for i in range(m) if i not in taken][: n - len(chosen)]
    return sorted(chosen)


def near_duplicates(embeddings: np.ndarray, *, threshold: float = DEFAULT_DUPLICATE_THRESHOLD,
                    block: int = 1024) -> NearDuplicates:
    """Pairs of rows of ``embeddings`` (unit rows, shape ``(m, d)``) whose cosine similarity is
    >= ``threshold``, and their groups (connected components, via scipy). Memory: ``block x m``
    floats at a time. Raises DiversityError when ``threshold`` is outside (0, 1]."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    if not (0.0 < float(threshold) <= 1.0):
        raise DiversityError(f"duplicate_threshold: {threshold} is outside (0, 1]")
    x = np.asarray(embeddings, dtype=np.float32)
    m = int(x.shape[0])
    report = NearDuplicates(threshold=float(threshold))
    if m < 2:
        return report
    # float32 rounding can put an identical pair at 0.99999994; compare with a little slack.
    eps = 1e-6
    for start in range(0, m, block):
        sims = x[start:start + block] @ x.T  # (b, m)
        rows, cols = np.nonzero(sims >= threshold - eps)
        for r, c in zip(rows.tolist(), cols.tolist()):
            i = start + r
            if c > i:
                report.pairs.append((i, c, min(1.0, float(sims[r, c]))))
    if not report.pairs:
        return report
    a = np.array([p[0] for p in report.pairs])
    b = np.array([p[1] for p in report.pairs])
    graph = coo_matrix((np.ones(len(a)), (a, b)), shape=(m, m))
    _, labels = connected_components(graph, directed=False)
    by_label: dict[int, list[int]] = {}
    for pos in sorted(set(a.tolist()) | set(b.tolist())):
        by_label.setdefault(int(labels[pos]), []).append(pos)
    report.groups = sorted(by_label.values(), key=lambda g: (-len(g), g[0]))
    return report
