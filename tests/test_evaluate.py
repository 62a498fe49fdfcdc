import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.metrics import average_precision_score

from tgdp_core import evaluate as ev


# ---------------------------------------------------------------------------- ranks and recall
def sorted_rank(row, i, ties):
    """Rank of item i by sorting the row with an explicit tie-break: the true match last among
    equal scores (pessimistic) or first (optimistic)."""
    last = ties == "pessimistic"
    order = sorted(range(len(row)), key=lambda j: (-row[j], (j == i) if last else (j != i)))
    return order.index(i) + 1


@pytest.mark.parametrize("ties", ev.TIES)
def test_recall_and_ranks_match_a_direct_computation_with_ties(ties):
    g = torch.Generator().manual_seed(0)
    sim = torch.randint(0, 6, (30, 40), generator=g).float()  # few distinct values: many ties
    ranks = [sorted_rank(sim[i].tolist(), i, ties) for i in range(30)]
    assert ev.true_match_ranks(sim, ties).tolist() == ranks
    expected = {f"R@{k}": 100 * np.mean([r <= k for r in ranks]) for k in (1, 5, 10)}
    assert ev.recall_at_k(sim, ties=ties) == pytest.approx(expected)
    assert ev.median_rank(sim, ties) == pytest.approx(np.median(ranks))
    assert ev.mean_rank(sim, ties) == pytest.approx(np.mean(ranks))


def test_recall_on_hand_made_examples():
    n = 10
    assert ev.recall_at_k(torch.eye(n)) == {"R@1": 100.0, "R@5": 100.0, "R@10": 100.0}
    assert ev.median_rank(torch.eye(n)) == 1.0
    # reversed: every query's match has the lowest score of its row, rank n
    i = torch.arange(n)
    reversed_sim = (i[:, None] - i[None, :]).abs().float()
    assert ev.recall_at_k(reversed_sim) == {"R@1": 0.0, "R@5": 0.0, "R@10": 100.0}
    assert ev.median_rank(reversed_sim) == 10.0
    # a collapsed encoder ties everything: it must not score as a perfect one
    collapsed = torch.ones(n, n)
    assert ev.recall_at_k(collapsed) == {"R@1": 0.0, "R@5": 0.0, "R@10": 100.0}
    assert ev.recall_at_k(collapsed, ties="optimistic")["R@1"] == 100.0
    sim = torch.tensor([[0.9, 0.9, 0.1],   # tie with item 1: rank 2 (pessimistic) or 1
                        [0.8, 0.5, 0.2],   # one item higher: rank 2
                        [0.3, 0.4, 0.1]])  # lowest: rank 3
    assert ev.true_match_ranks(sim).tolist() == [2, 2, 3]
    assert ev.true_match_ranks(sim, "optimistic").tolist() == [1, 2, 3]
    assert ev.recall_at_k(sim, ks=(1, 2, 3)) == pytest.approx({"R@1": 0.0, "R@2": 200 / 3, "R@3": 100.0})
    assert ev.recall_at_k(sim, ks=(1,), ties="optimistic") == pytest.approx({"R@1": 100 / 3})
    assert ev.median_rank(sim) == 2.0 and ev.mean_rank(sim) == pytest.approx(7 / 3)
    # an even number of queries: the median is the mean of the two middle ranks
    assert ev.median_rank(torch.tensor([[1.0, 0, 0, 0], [1, 0, 0, 0]])) == 2.5  # ranks 1 and 4


def test_recall_rejects_non_finite_and_bad_shapes():
    sim = torch.eye(4)
    sim[1, 1] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        ev.recall_at_k(sim)
    with pytest.raises(ValueError, match="Nq <= Ng"):
        ev.recall_at_k(torch.zeros(5, 4))
    with pytest.raises(ValueError, match="ties"):
        ev.recall_at_k(torch.eye(3), ties="mean")


# ---------------------------------------------------------------------------- retrieval
def test_clip_similarity_is_the_mean_cosine_over_aligned_pairs():
    a, v = torch.randn(5, 3, 8), torch.randn(7, 3, 8)  # not normalised: the function normalises
    an, vn = F.normalize(a, dim=-1), F.normalize(v, dim=-1)
    loop = torch.zeros(5, 7)
    for i in range(5):
        for j in range(7):
            loop[i, j] = sum(an[i, k] @ vn[j, k] for k in range(3)) / 3
    torch.testing.assert_close(ev.clip_similarity(a, v), loop)
    # K = 1, as (N, 1, D) or (N, D)
    torch.testing.assert_close(ev.clip_similarity(a[:, :1], v[:, :1]), an[:, 0] @ vn[:, 0].T)
    torch.testing.assert_close(ev.clip_similarity(a[:, 0], v[:, 0]), an[:, 0] @ vn[:, 0].T)
    with pytest.raises(ValueError, match="agree"):
        ev.clip_similarity(a, v[:, :2])


def test_retrieval_is_near_chance_on_random_and_perfect_on_identical_embeddings():
    g = torch.Generator().manual_seed(0)
    a, v = torch.randn(200, 4, 32, generator=g), torch.randn(200, 4, 32, generator=g)
    chance = ev.retrieval_metrics(a, v)
    assert set(chance) == {f"{d} {m}" for d in ("A->V", "V->A") for m in ("R@1", "R@5", "R@10", "MedR")}
    for d in ("A->V", "V->A"):
        assert chance[f"{d} R@10"] < 15  # chance 5
        assert 60 < chance[f"{d} MedR"] < 140  # chance 100.5
    same = ev.retrieval_metrics(a, a)
    assert all(same[f"{d} R@{k}"] == 100.0 for d in ("A->V", "V->A") for k in (1, 5, 10))
    assert same["A->V MedR"] == same["V->A MedR"] == 1.0


def test_directions_are_rows_and_columns():
    # audio 0 finds visual 0 first, but visual 0's nearest audio is audio 1
    a = torch.tensor([[1.0, 0.0], [0.9, 0.1], [-1.0, 0.0]])
    v = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.1]])
    sim = ev.clip_similarity(a, v)
    m = ev.retrieval_metrics(a, v, ks=(1,))
    assert m["A->V R@1"] == ev.recall_at_k(sim, ks=(1,))["R@1"]
    assert m["V->A R@1"] == ev.recall_at_k(sim.T, ks=(1,))["R@1"]
    assert m["A->V R@1"] != m["V->A R@1"]


def test_class_precision_and_chance_on_a_hand_made_example():
    labels = torch.tensor([[1, 0, 0], [1, 1, 0], [0, 1, 0], [0, 0, 1]])
    relevant = ev.label_relevance(labels)
    assert relevant.tolist() == [[True, True, False, False], [True, True, True, False],
                                 [False, True, True, False], [False, False, False, True]]
    sim = torch.tensor([[0.9, 0.1, 0.8, 0.2],   # top: relevant, then irrelevant
                        [0.5, 0.4, 0.3, 0.6],   # top: irrelevant, then relevant
                        [0.7, 0.7, 0.7, 0.7],   # all tied, 2 of 4 relevant
                        [0.1, 0.2, 0.3, 0.9]])  # top: relevant (its only one), then irrelevant
    chance = 100 * (2 / 4 + 3 / 4 + 2 / 4 + 1 / 4) / 4
    assert ev.precision_at_k(sim, relevant, ks=(1, 2)) == pytest.approx({"P@1": 50.0, "P@2": 37.5, "P chance": chance})
    assert ev.precision_at_k(sim, relevant, ks=(1, 2), ties="optimistic") == pytest.approx(
        {"P@1": 75.0, "P@2": 62.5, "P chance": chance})
    # k beyond the gallery: precision over the whole gallery, which is chance
    assert ev.precision_at_k(sim, relevant, ks=(10,))["P@10"] == pytest.approx(chance)
    # a query with nothing relevant is skipped
    relevant[3] = False
    assert ev.precision_at_k(sim, relevant, ks=(1,)) == pytest.approx({"P@1": 100 / 3, "P chance": 100 * 7 / 12})


def test_class_level_retrieval_credits_same_class_clips():
    # each audio clip is nearest to the *other* clip of its class and second nearest to its own
    # pair: instance R@1 0, median rank 2, class precision 100
    visual = torch.eye(4)
    audio = visual[[1, 0, 3, 2]] + 0.5 * visual
    for labels in (torch.tensor([0, 0, 1, 1]), torch.tensor([[1, 0], [1, 0], [0, 1], [0, 1]])):
        m = ev.retrieval_metrics(audio, visual, labels)
        for d in ("A->V", "V->A"):
            assert m[f"{d} R@1"] == 0.0 and m[f"{d} R@5"] == 100.0 and m[f"{d} MedR"] == 2.0
            assert m[f"{d} P@1"] == 100.0 and m[f"{d} P@5"] == 50.0 and m[f"{d} P chance"] == 50.0


# ---------------------------------------------------------------------------- mAP and top-1
@pytest.mark.parametrize("tied", [False, True])
def test_map_equals_scikit_learn(tied):
    rng = np.random.default_rng(0)
    y = (rng.random((60, 7)) < 0.3).astype(int)
    y[0] = 1  # every class has a positive
    scores = rng.integers(0, 4, (60, 7)).astype(float) if tied else rng.normal(size=(60, 7))
    expected = 100 * average_precision_score(y, scores, average="macro")
    assert ev.mean_average_precision(y, scores) == pytest.approx(expected, rel=1e-12)
    assert ev.mean_average_precision(torch.tensor(y), torch.tensor(scores, dtype=torch.float32)) == pytest.approx(
        100 * average_precision_score(y, scores.astype(np.float32), average="macro"), rel=1e-6)
    per_class = ev.average_precision(y, scores).numpy()
    np.testing.assert_allclose(per_class, [average_precision_score(y[:, c], scores[:, c]) for c in range(7)])


def test_map_skips_classes_without_positives():
    rng = np.random.default_rng(1)
    y = (rng.random((40, 5)) < 0.4).astype(int)
    y[0] = 1
    y[:, 2] = 0
    scores = rng.normal(size=(40, 5))
    keep = [0, 1, 3, 4]
    expected = 100 * average_precision_score(y[:, keep], scores[:, keep], average="macro")
    assert ev.mean_average_precision(y, scores) == pytest.approx(expected)
    assert np.isnan(ev.average_precision(y, scores)[2].item())


def test_top1_accuracy():
    logits = torch.tensor([[0.1, 0.9, 0.0], [0.8, 0.1, 0.1], [0.2, 0.3, 0.5], [0.0, 1.0, 0.0]])
    assert ev.top1_accuracy(torch.tensor([1, 0, 0, 2]), logits) == 50.0


# ---------------------------------------------------------------------------- probes
def clustered(n, classes, dim, generator, tokens=None):
    """Class centroids plus unit noise; with ``tokens`` the centroid sits in one random token of K."""
    centroids = 3 * torch.randn(classes, dim, generator=torch.Generator().manual_seed(99))
    y = torch.randint(0, classes, (n,), generator=generator)
    if tokens is None:
        return centroids[y] + torch.randn(n, dim, generator=generator), y
    x = torch.randn(n, tokens, dim, generator=generator)
    where = torch.randint(0, tokens, (n,), generator=generator)
    x[torch.arange(n), where] += centroids[y]
    return x, y


def multilabel(n, classes, dim, generator, tokens=None):
    """Label c is on where a fixed projection of the features is large (about 30% of clips)."""
    directions = torch.randn(dim, classes, generator=torch.Generator().manual_seed(98))
    x = torch.randn(n, dim, generator=generator)
    y = (x @ directions / dim**0.5 > 0.5).long()
    if tokens is not None:  # K noisy views of the clip, like its frames
        x = x[:, None] + 0.5 * torch.randn(n, tokens, dim, generator=generator)
    return x, y


PROBES = [
    ("linear", ev.linear_probe, None, {"epochs": 40, "lr": 3e-3}),
    ("attention", ev.attention_probe, 4, {"epochs": 30}),
]


@pytest.mark.parametrize("name,probe,tokens,kwargs", PROBES, ids=[p[0] for p in PROBES])
def test_probes_learn_single_label_and_stay_at_chance_on_random_labels(name, probe, tokens, kwargs):
    g = torch.Generator().manual_seed(0)
    train_x, train_y = clustered(400, 4, 64, g, tokens)
    test_x, test_y = clustered(200, 4, 64, g, tokens)
    assert probe(train_x, train_y, test_x, test_y, multilabel=False, **kwargs)["top1"] > 90
    # labels unrelated to the features (on both splits: test clusters keep their own labels otherwise)
    shuffled, test_shuffled = train_y[torch.randperm(400, generator=g)], test_y[torch.randperm(200, generator=g)]
    assert probe(train_x, shuffled, test_x, test_shuffled, multilabel=False, **kwargs)["top1"] < 35  # chance 25


@pytest.mark.parametrize("name,probe,tokens,kwargs", PROBES, ids=[p[0] for p in PROBES])
def test_probes_learn_multi_label_and_stay_at_chance_on_random_labels(name, probe, tokens, kwargs):
    g = torch.Generator().manual_seed(0)
    train_x, train_y = multilabel(400, 5, 64, g, tokens)
    test_x, test_y = multilabel(200, 5, 64, g, tokens)
    prevalence = 100 * test_y.float().mean().item()
    assert 20 < prevalence < 40
    assert probe(train_x, train_y, test_x, test_y, multilabel=True, **kwargs)["mAP"] > 70  # chance ~30
    shuffled, test_shuffled = train_y[torch.randperm(400, generator=g)], test_y[torch.randperm(200, generator=g)]
    assert probe(train_x, shuffled, test_x, test_shuffled, multilabel=True, **kwargs)["mAP"] < prevalence + 8


def test_probes_are_deterministic_and_leave_the_global_rng_alone():
    g = torch.Generator().manual_seed(0)
    x, y = clustered(200, 4, 16, g, tokens=3)
    state = torch.random.get_rng_state()
    runs = [ev.attention_probe(x[:150], y[:150], x[150:], y[150:], multilabel=False, epochs=3) for _ in range(2)]
    assert torch.equal(torch.random.get_rng_state(), state)
    assert runs[0] == runs[1]
    with pytest.raises(ValueError, match="single-label"):
        ev.linear_probe(x[:, 0], y.float(), x[:, 0], y.float(), multilabel=False)
    with pytest.raises(ValueError, match="divisible"):
        ev.attention_probe(x, y, x, y, multilabel=False, heads=3)


# ---------------------------------------------------------------------------- tables
def test_markdown_table():
    rows = {"sync": {"A->V R@1": 23.2, "mAP": 30.5}, "tgdp": {"A->V R@1": 30.26, "MedR": 3.0}}
    assert ev.markdown_table(rows) == (
        "| model | A->V R@1 | mAP | MedR |\n"
        "|---|---:|---:|---:|\n"
        "| sync | 23.2 | 30.5 | - |\n"
        "| tgdp | 30.3 | - | 3.0 |")
    assert ev.markdown_table(rows, columns=["mAP"], decimals=2).splitlines()[2] == "| sync | 30.50 |"


def test_pair_class_precision_against_a_direct_loop():
    from tgdp_core.evaluate import pair_class_precision

    g = torch.Generator().manual_seed(0)
    N, K, D = 6, 3, 5
    a, v = torch.randn(N, K, D, generator=g), torch.randn(N, K, D, generator=g)
    y = torch.randint(0, 3, (N, K), generator=g)
    got = pair_class_precision(a, v, y, chunk=4)  # chunking must not change the result
    for name, q, gal in (("A->V", a, v), ("V->A", v, a)):
        hits = 0
        for i in range(N):
            for k in range(K):
                best, best_label = -2.0, None
                for j in range(N):
                    if j == i:
                        continue  # the query's own clip is left out
                    for m in range(K):
                        s = torch.nn.functional.cosine_similarity(q[i, k], gal[j, m], dim=0).item()
                        if s > best:
                            best, best_label = s, y[j, m].item()
                hits += best_label == y[i, k].item()
        assert got[f"{name} pair P@1"] == pytest.approx(100 * hits / (N * K))
    chance = sum(((y == y[i, k]).sum() - (y[i] == y[i, k]).sum()).item() / (N * K - K)
                 for i in range(N) for k in range(K)) / (N * K)
    assert got["pair P chance"] == pytest.approx(100 * chance)
    # identical audio and visual pair embeddings with one embedding per class: P@1 = 100
    proto = torch.eye(3)[y]  # (N, K, 3)
    assert pair_class_precision(proto, proto, y)["A->V pair P@1"] == 100


def test_a_gallery_too_small_for_the_metrics_is_warned_about():
    """Issue 17, item 14: `eval --clips 1` printed R@1 100 with no caveat."""
    a = torch.randn(1, 2, 8)
    with pytest.warns(UserWarning, match=r"gallery of only 1 clip\(s\): a random ranking scores R@1 100 % and "
                                         r"R@10 100 %.*use at least 20 clips"):
        assert ev.retrieval_metrics(a, a)["A->V R@1"] == 100.0
    with pytest.warns(UserWarning, match="only 12 clip.*R@1 8 % and R@10 83 %"):
        ev.retrieval_metrics(torch.randn(12, 2, 8), torch.randn(12, 2, 8))
    assert not ev.warn_small_gallery(20) and ev.warn_small_gallery(10, ks=(1, 5)) is False
