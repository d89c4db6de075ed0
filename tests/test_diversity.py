"""workers.pipeline.diversity: MiniLM embeddings, k-means selection, near-duplicate report (the
real bundled encoder on BANKING77 rows of four intents)."""
from __future__ import annotations

import numpy as np
import pytest

from tests.generation_fixtures import INTENTS, banking77_rows
from workers.pipeline.diversity import DiversityError, embed_texts, near_duplicates, select_diverse


@pytest.fixture(scope="module")
def banking(shared_data):
    # Ordered by intent, as an import of a file sorted by intent would be: the first 4 rows by
    # id are all card_arrival.
    return banking77_rows(shared_data, per_intent=8)


@pytest.fixture(scope="module")
def banking_emb(banking):
    return embed_texts([t for t, _ in banking])


def test_embeddings_are_unit_vectors_of_minilm_size(banking, banking_emb):
    assert banking_emb.shape == (32, 384)
    assert banking_emb.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(banking_emb, axis=1), 1.0, atol=1e-5)
    # Same intent closer than other intents, on average.
    labels = np.array([i for _, i in banking])
    sims = banking_emb @ banking_emb.T
    same = sims[labels[:, None] == labels[None, :]].mean()
    other = sims[labels[:, None] != labels[None, :]].mean()
    assert same > other + 0.1


def test_diverse_four_covers_more_intents_than_first_four(banking, banking_emb):
    first = {banking[i][1] for i in range(4)}
    chosen = select_diverse(banking_emb, 4, seed=0)
    diverse = {banking[i][1] for i in chosen}
    assert len(chosen) == 4 and len(set(chosen)) == 4
    assert first == {"card_arrival"}
    assert len(diverse) >= 3 > len(first)
    assert select_diverse(banking_emb, 4, seed=0) == chosen  # deterministic


def test_select_all_when_n_is_not_smaller_and_refuses_zero(banking_emb):
    assert select_diverse(banking_emb[:5], 9) == [0, 1, 2, 3, 4]
    with pytest.raises(DiversityError, match="limit"):
        select_diverse(banking_emb, 0)


def test_identical_rows_still_give_n_distinct_picks():
    x = np.zeros((6, 3), dtype=np.float32)
    x[:, 0] = 1.0
    x[5] = [0, 1, 0]
    picks = select_diverse(x, 3, seed=1)
    assert len(set(picks)) == 3 and 5 in picks


def test_near_duplicates_are_found_and_grouped():
    texts = ["Where is my new card? It has not arrived.",
             "Where is my new card?  It has not arrived!",
             "What is the exchange rate for euros today?",
             "where is my new card? it has not arrived",
             "I topped up my account but the money is still pending."]
    emb = embed_texts(texts)
    report = near_duplicates(emb, threshold=0.95)
    assert {(i, j) for i, j, _ in report.pairs} == {(0, 1), (0, 3), (1, 3)}
    assert all(0.95 <= s <= 1.0 for _, _, s in report.pairs)
    assert report.groups == [[0, 1, 3]]
    assert [g for g in near_duplicates(emb, threshold=0.5, block=2).groups if 2 in g] == []  # exchange rate: alone
    with pytest.raises(DiversityError, match="duplicate_threshold"):
        near_duplicates(emb, threshold=1.5)


def test_near_duplicates_blockwise_equals_one_block():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(30, 8)).astype(np.float32)
    x[7] = x[3] + 0.001
    x[20] = x[3]
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    a, b = near_duplicates(x, threshold=0.99, block=4), near_duplicates(x, threshold=0.99, block=1000)
    assert [(i, j) for i, j, _ in a.pairs] == [(i, j) for i, j, _ in b.pairs] == [(3, 7), (3, 20), (7, 20)]
    assert a.groups == [[3, 7, 20]]
