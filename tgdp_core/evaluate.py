"""Evaluation on embeddings and frozen features: zero-shot retrieval, probes, result tables.

Everything here works on tensors, so the same functions serve the CLI, notebooks and tests:

    sim = clip_similarity(audio_emb, visual_emb)      # (N, K, D) each -> (N, N)
    recall_at_k(sim)                                   # {"R@1": .., "R@5": .., "R@10": ..}, percent
    retrieval_metrics(audio_emb, visual_emb, labels)   # both directions, ranks, class precision
    linear_probe(train_x, train_y, test_x, test_y, multilabel=True)      # {"mAP": ..}
    attention_probe(train_x, train_y, test_x, test_y, multilabel=False)  # {"top1": ..}
    knn_probe(train_x, train_y, test_x, test_y, multilabel=True)         # {"mAP": ..}, k = 20
    print(markdown_table({"sync": sync_metrics, "tgdp": tgdp_metrics}))

Protocols follow docs/method.md ("Evaluation"). Every metric is reported in percent except
ranks, which are 1-based positions.

Ties. A collapsed encoder maps every clip to the same embedding, so every similarity ties; if
ties were resolved in the true match's favour (rank = 1 + number of strictly better items) such
an encoder would score R@1 = 100. The default, ``ties="pessimistic"``, therefore puts the true
match (and, for class precision, the relevant items) *last* among the items it ties with:
rank = number of gallery items scoring at least as high as the true match. ``"optimistic"``
puts it first; the gap between the two shows how much of a result rests on ties. With
continuous embeddings exact ties are rare and both conventions agree.
"""
from __future__ import annotations

import numbers
import warnings
from typing import Callable, Iterable, Mapping, NamedTuple, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .layers import Block, init_weights

TIES = ("pessimistic", "optimistic")


# ---------------------------------------------------------------------------- ranks and recall
def _check_similarity(similarity: torch.Tensor) -> None:
    if similarity.ndim != 2 or similarity.shape[0] > similarity.shape[1]:
        raise ValueError(f"similarity must have shape (Nq, Ng) with Nq <= Ng, got {tuple(similarity.shape)}")
    # A NaN true-match score compares false with everything and would count as rank 0, a hit.
    if not torch.isfinite(similarity).all():
        raise ValueError("similarity contains NaN or infinite values")


def true_match_ranks(similarity: torch.Tensor, ties: str = "pessimistic") -> torch.Tensor:
    """1-based rank of each query's true match: (Nq, Ng) -> (Nq,) int64; query i's match is gallery i.

    pessimistic: number of gallery items scoring >= the match (the match counted last among ties);
    optimistic: 1 + number of gallery items scoring strictly higher.
    """
    _check_similarity(similarity)
    if ties not in TIES:
        raise ValueError(f"unknown ties convention {ties!r}; use one of {', '.join(TIES)}")
    true = similarity.diagonal().unsqueeze(1)  # (Nq, 1)
    if ties == "pessimistic":
        return (similarity >= true).sum(dim=1)
    return (similarity > true).sum(dim=1) + 1


def recall_at_k(similarity: torch.Tensor, ks: Iterable[int] = (1, 5, 10),
                ties: str = "pessimistic") -> dict[str, float]:
    """{"R@k": percent of queries whose true match ranks within the top k} for k in ``ks``.

    similarity (Nq, Ng), higher = more similar; query i's match is gallery i.
    """
    ranks = true_match_ranks(similarity, ties)
    return {f"R@{k}": 100.0 * (ranks <= k).double().mean().item() for k in ks}


def median_rank(similarity: torch.Tensor, ties: str = "pessimistic") -> float:
    """Median 1-based rank of the true match (the mean of the two middle ranks for even Nq)."""
    return true_match_ranks(similarity, ties).double().quantile(0.5).item()


def mean_rank(similarity: torch.Tensor, ties: str = "pessimistic") -> float:
    """Mean 1-based rank of the true match."""
    return true_match_ranks(similarity, ties).double().mean().item()


# ---------------------------------------------------------------------------- zero-shot retrieval
def _as_clips(emb: torch.Tensor, name: str) -> torch.Tensor:
    """(N, K, D) or (N, D) (K = 1) embeddings -> (N, K, D) float, each pair L2-normalised."""
    if emb.ndim == 2:
        emb = emb.unsqueeze(1)
    if emb.ndim != 3:
        raise ValueError(f"{name} must have shape (N, K, D) or (N, D), got {tuple(emb.shape)}")
    return F.normalize(emb.float(), dim=-1)


def clip_similarity(audio_emb: torch.Tensor, visual_emb: torch.Tensor) -> torch.Tensor:
    """Clip-to-clip similarity (docs/method.md, "Evaluation"): sim[i, j] = mean over k of cos(a_ik, v_jk).

    audio_emb (Na, K, D), visual_emb (Nv, K, D): the K aligned frame/segment pairs of each clip
    ((N, D) means K = 1). Rows are audio clips, columns visual clips: (Na, Nv). Embeddings are
    L2-normalised here (a no-op for ``encode_*`` outputs), so raw global features work too.
    """
    a, v = _as_clips(audio_emb, "audio_emb"), _as_clips(visual_emb, "visual_emb")
    if a.shape[1:] != v.shape[1:]:
        raise ValueError(f"audio_emb and visual_emb must agree in (K, D), got {tuple(a.shape)} and {tuple(v.shape)}")
    # mean_k <a_ik, v_jk> = <a_i, v_j> / K with a_i, v_j the K pairs concatenated: one matmul and
    # no (Na, Nv, K) intermediate, so memory is the inputs plus the output (1,000 clips x 16 x
    # 768 is 49 MB per side) and no chunking is needed.
    return a.flatten(1) @ v.flatten(1).T / a.shape[1]  # (Na, K*D) @ (K*D, Nv)


def label_relevance(labels: torch.Tensor) -> torch.Tensor:
    """Which clips share a class: (N, C) multi-hot or (N,) class ids -> (N, N) bool."""
    if labels.ndim == 1 and not labels.is_floating_point():
        return labels[:, None] == labels[None, :]
    if labels.ndim != 2:
        raise ValueError(f"labels must be (N, C) multi-hot or (N,) class ids, got shape {tuple(labels.shape)}")
    hot = (labels != 0).float()
    return hot @ hot.T > 0  # (N, N): number of shared labels > 0


def precision_at_k(similarity: torch.Tensor, relevant: torch.Tensor, ks: Iterable[int] = (1, 5, 10),
                   ties: str = "pessimistic") -> dict[str, float]:
    """Class-level retrieval: {"P@k": percent of the top k that are relevant, "P chance": ...}.

    similarity (Nq, Ng); relevant (Nq, Ng) bool, e.g. ``label_relevance``. "P chance" is the
    expected P@k of a random ranking: the mean over queries of the fraction of relevant gallery
    items. Queries with no relevant item are skipped (no ranking can find one). Items tied
    with the k-th score fill the remaining places irrelevant-first ("pessimistic") or
    relevant-first ("optimistic"); see the module docstring.
    """
    _check_similarity(similarity)
    if relevant.shape != similarity.shape:
        raise ValueError(f"relevant must have the shape of similarity {tuple(similarity.shape)}, "
                         f"got {tuple(relevant.shape)}")
    if ties not in TIES:
        raise ValueError(f"unknown ties convention {ties!r}; use one of {', '.join(TIES)}")
    keep = relevant.any(dim=1)
    if not keep.any():
        raise ValueError("no query has a relevant gallery item")
    sim, rel = similarity[keep], relevant[keep].bool()
    ks = tuple(ks)
    top = sim.topk(min(max(ks), sim.shape[1]), dim=1).values  # (Nq', k_max) scores, descending
    out = {}
    for k in ks:
        kk = min(k, sim.shape[1])
        kth = top[:, kk - 1:kk]  # (Nq', 1): the k-th highest score
        above, at = sim > kth, sim == kth
        places = kk - above.sum(1)  # >= 1 places left for the items tied with the k-th score
        if ties == "pessimistic":
            taken = (places - (~rel & at).sum(1)).clamp_min(0)
        else:
            taken = torch.minimum(places, (rel & at).sum(1))
        hits = (rel & above).sum(1) + taken
        out[f"P@{k}"] = 100.0 * (hits.double() / kk).mean().item()
    out["P chance"] = 100.0 * rel.double().mean(dim=1).mean().item()
    return out


def retrieval_metrics(audio_emb: torch.Tensor, visual_emb: torch.Tensor, labels: torch.Tensor | None = None,
                      ks: Iterable[int] = (1, 5, 10), ties: str = "pessimistic") -> dict[str, float]:
    """Zero-shot retrieval in both directions between the paired clips of a test set.

    audio_emb, visual_emb (N, K, D) (or (N, D)): clip i's audio pairs with clip i's frames.
    A->V queries with audio and ranks the visual clips (rows of ``clip_similarity``), V->A the
    reverse (its transpose). Keys "A->V R@k", "A->V MedR", the same for "V->A". With ``labels``
    ((N, C) multi-hot or (N,) class ids) also class-level retrieval, where a retrieved clip is
    relevant if it shares a label with the query: "A->V P@k" and "A->V P chance" (chance level
    beside it), the same for "V->A". The gallery includes the query's own pair.
    """
    ks = tuple(ks)
    sim = clip_similarity(audio_emb, visual_emb)
    if sim.shape[0] != sim.shape[1]:
        raise ValueError(f"retrieval needs paired clips, got {sim.shape[0]} audio and {sim.shape[1]} visual")
    warn_small_gallery(sim.shape[0], ks)
    relevant = None if labels is None else label_relevance(torch.as_tensor(labels, device=sim.device))
    out = {}
    for direction, s in (("A->V", sim), ("V->A", sim.T)):
        out.update({f"{direction} {key}": value for key, value in recall_at_k(s, ks, ties).items()})
        out[f"{direction} MedR"] = median_rank(s, ties)
        if relevant is not None:
            # relevance is symmetric (shared labels), so V->A uses the same matrix transposed
            rel = relevant if direction == "A->V" else relevant.T
            out.update({f"{direction} {key}": value for key, value in precision_at_k(s, rel, ks, ties).items()})
    return out


def warn_small_gallery(n: int, ks: Sequence[int] = (1, 5, 10)) -> bool:
    """Warn (and return True) when a gallery of ``n`` clips is too small for R@k to mean much:
    below 2 * max(ks) clips a random ranking already scores R@max(k) >= 50 % (at n <= k, 100 %)."""
    if n >= 2 * max(ks):
        return False
    k = max(ks)
    warnings.warn(f"retrieval over a gallery of only {n} clip(s): a random ranking scores R@1 {100 / n:.0f} % and "
                  f"R@{k} {100 * min(k, n) / n:.0f} %, so these figures say little about the model; use at least "
                  f"{2 * k} clips (hundreds for figures worth comparing)", stacklevel=3)
    return True


# ---------------------------------------------------------------------------- classification metrics
def average_precision(y_true, scores) -> torch.Tensor:
    """Per-class average precision as scikit-learn computes it: (N, C) -> (C,) float64 in [0, 1].

    y_true (N, C) multi-hot (nonzero = positive), scores (N, C); tensors or arrays; (N,) means
    one class. AP = sum over distinct score thresholds of (R_n - R_{n-1}) * P_n, so tied scores
    form one threshold (no interpolation). A class with no positive gets NaN (scikit-learn
    warns and gives 0 there).
    """
    y = torch.as_tensor(y_true)
    s = torch.as_tensor(scores).double()
    if y.ndim == 1:
        y, s = y.unsqueeze(1), s.unsqueeze(1)
    if y.shape != s.shape or y.ndim != 2:
        raise ValueError(f"y_true and scores must both be (N, C), got {tuple(y.shape)} and {tuple(s.shape)}")
    if not torch.isfinite(s).all():
        raise ValueError("scores contain NaN or infinite values")
    y, s = (y != 0).double().T, s.T  # (C, N)
    ordered, order = s.sort(dim=1, descending=True)
    hits = y.gather(1, order)  # (C, N) positives in descending score order
    tp = hits.cumsum(1)
    # Every item takes the precision at the end of its tie group: the last index whose score
    # equals its own, found by a right-sided search in the ascending (negated) scores.
    neg = (-ordered).contiguous()
    group_end = torch.searchsorted(neg, neg, right=True) - 1  # (C, N)
    precision = tp.gather(1, group_end) / (group_end + 1)
    # Each positive raises recall by 1 / P at its group's threshold: AP = mean precision over positives.
    return (hits * precision).sum(1) / hits.sum(1)  # 0 / 0 = NaN for a class without positives


def mean_average_precision(y_true, scores) -> float:
    """Macro mAP in percent: ``average_precision_score(y_true, scores, average="macro")`` * 100.

    Classes with no positive in ``y_true`` are skipped (scikit-learn would count them as 0,
    which punishes a model for the test split's label coverage).
    """
    ap = average_precision(y_true, scores)
    valid = ~ap.isnan()
    if not valid.any():
        raise ValueError("no class has a positive example")
    return 100.0 * ap[valid].mean().item()


def top1_accuracy(labels, logits) -> float:
    """Percent of samples whose highest logit is their class: labels (N,) ids, logits (N, C)."""
    labels, logits = torch.as_tensor(labels), torch.as_tensor(logits)
    if logits.ndim != 2 or labels.shape != logits.shape[:1]:
        raise ValueError(f"need labels (N,) and logits (N, C), got {tuple(labels.shape)} and {tuple(logits.shape)}")
    return 100.0 * (logits.argmax(dim=1) == labels.to(logits.device)).double().mean().item()


# ---------------------------------------------------------------------------- probes on frozen features
class _LinearHead(nn.Module):
    """LayerNorm + Linear on pooled features: (B, D) -> (B, C) logits."""

    def __init__(self, dim: int, num_classes: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(x))


class _AttentionHead(nn.Module):
    """Learnable query token + two transformer blocks + LayerNorm + Linear: (B, K, D) -> (B, C)."""

    def __init__(self, dim: int, num_classes: int, heads: int):
        super().__init__()
        self.query = nn.Parameter(torch.zeros(1, 1, dim))
        self.blocks = nn.ModuleList(Block(dim, heads) for _ in range(2))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)
        self.apply(init_weights)
        nn.init.normal_(self.query, std=0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.cat([self.query.expand(x.shape[0], -1, -1), x], dim=1)  # (B, 1 + K, D)
        x = self.blocks[0](x)
        # Only the query token's output is read, so the last block computes that row alone.
        q, _ = self.blocks[1].forward_global(x)  # (B, 1, D)
        return self.head(self.norm(q[:, 0]))


def _num_classes(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, test_y: torch.Tensor,
                 multilabel: bool, feature_ndim: int) -> int:
    """Check the probe's inputs; the number of classes (multi-hot width, or largest id + 1)."""
    feature_shape = "(N, D)" if feature_ndim == 2 else "(N, K, D)"
    for name, x, y in (("train", train_x, train_y), ("test", test_x, test_y)):
        if x.ndim != feature_ndim or not x.is_floating_point():
            raise ValueError(f"{name}_x must be a float tensor {feature_shape}, got {tuple(x.shape)} {x.dtype}")
        if y.shape[0] != x.shape[0]:
            raise ValueError(f"{name}_y has {y.shape[0]} rows but {name}_x has {x.shape[0]}")
        if multilabel and y.ndim != 2:
            raise ValueError(f"multi-label {name}_y must be (N, C) multi-hot, got {tuple(y.shape)}")
        if not multilabel and (y.ndim != 1 or y.is_floating_point()):
            raise ValueError(f"single-label {name}_y must be (N,) integer class ids, got {tuple(y.shape)} {y.dtype}")
    if train_x.shape[1:] != test_x.shape[1:]:
        raise ValueError(f"train_x and test_x differ in feature shape: {tuple(train_x.shape)} vs {tuple(test_x.shape)}")
    if multilabel:
        if train_y.shape[1] != test_y.shape[1]:
            raise ValueError(f"train_y and test_y differ in classes: {train_y.shape[1]} vs {test_y.shape[1]}")
        return train_y.shape[1]
    return max(int(train_y.max()), int(test_y.max())) + 1


def _fit_and_score(head: nn.Module, train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor,
                   test_y: torch.Tensor, multilabel: bool, epochs: int, lr: float, weight_decay: float,
                   batch_size: int, seed: int) -> dict[str, float]:
    """Train ``head`` with AdamW for ``epochs`` passes over shuffled mini-batches, score the test set."""
    device = train_x.device
    head = head.to(device)
    train_x, test_x = train_x.float(), test_x.float()
    target = train_y.to(device).float() if multilabel else train_y.to(device).long()
    loss_fn = F.binary_cross_entropy_with_logits if multilabel else F.cross_entropy
    opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=weight_decay)
    order = torch.Generator().manual_seed(seed)  # shuffles on the CPU, so any device repeats them
    head.train()
    for epoch in range(epochs):
        for idx in torch.randperm(train_x.shape[0], generator=order).split(batch_size):
            idx = idx.to(device)
            loss = loss_fn(head(train_x[idx]), target[idx])
            if not torch.isfinite(loss):
                raise FloatingPointError(f"probe loss is {loss.item()} in epoch {epoch}")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    head.eval()
    with torch.no_grad():
        logits = torch.cat([head(x) for x in test_x.split(batch_size)]).cpu()
    if multilabel:
        return {"mAP": mean_average_precision(test_y.cpu(), logits)}
    return {"top1": top1_accuracy(test_y.cpu(), logits)}


def _seeded(seed: int, build: Callable[[], nn.Module]) -> nn.Module:
    """Build a module with initial weights fixed by ``seed``, leaving the global RNG untouched."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


def linear_probe(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, test_y: torch.Tensor,
                 multilabel: bool, epochs: int = 100, lr: float = 1e-3, weight_decay: float = 1e-4,
                 batch_size: int = 256, seed: int = 0) -> dict[str, float]:
    """LayerNorm + Linear on frozen pooled features x (N, D), trained with AdamW.

    multilabel: y (N, C) multi-hot, BCE-with-logits, returns {"mAP": macro mAP in percent}
    (classes without a positive in test_y are skipped, see ``mean_average_precision``);
    otherwise y (N,) class ids, cross-entropy, returns {"top1": percent}. Deterministic given
    ``seed`` (initialisation and batch order) on a given device.
    """
    classes = _num_classes(train_x, train_y, test_x, test_y, multilabel, feature_ndim=2)
    head = _seeded(seed, lambda: _LinearHead(train_x.shape[1], classes))
    return _fit_and_score(head, train_x, train_y, test_x, test_y, multilabel, epochs, lr, weight_decay,
                          batch_size, seed)


def attention_probe(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, test_y: torch.Tensor,
                    multilabel: bool, epochs: int = 30, lr: float = 1e-3, weight_decay: float = 0.05,
                    batch_size: int = 256, seed: int = 0, heads: int | None = None) -> dict[str, float]:
    """Attention probe (docs/method.md, "Evaluation") on frozen per-token features x (N, K, D), e.g. 16 per-frame
    global features per clip, or audio and visual ones concatenated along K.

    A learnable query token is prepended, two pre-norm transformer blocks (``layers.Block``)
    run over the 1 + K tokens, and the query's output goes through LayerNorm + Linear. The
    tokens carry no position embedding: the probe reads a set. ``heads`` defaults to D // 64
    (head width 64, as in the backbone) where 64 divides D, else 1. Losses, metrics and
    determinism as in ``linear_probe``.
    """
    classes = _num_classes(train_x, train_y, test_x, test_y, multilabel, feature_ndim=3)
    dim = train_x.shape[2]
    heads = heads or (dim // 64 if dim % 64 == 0 else 1)
    if dim % heads:
        raise ValueError(f"feature width {dim} is not divisible by heads={heads}")
    head = _seeded(seed, lambda: _AttentionHead(dim, classes, heads))
    return _fit_and_score(head, train_x, train_y, test_x, test_y, multilabel, epochs, lr, weight_decay,
                          batch_size, seed)


def knn_probe(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, test_y: torch.Tensor,
              multilabel: bool, k: int = 20, temperature: float = 0.07, batch_size: int = 1024) -> dict[str, float]:
    """Weighted k-nearest-neighbour vote on frozen pooled features x (N, D), as DINO evaluates.

    Cosine similarity (features L2-normalised here); each test clip's k most similar training
    clips vote for their labels with weight exp(similarity / temperature); the summed votes are
    the class scores. multilabel: y (N, C) multi-hot, votes are the neighbours' multi-hot
    rows, returns {"mAP": ..}; otherwise y (N,) class ids, returns {"top1": ..} (percent, as
    ``linear_probe``). Nothing is trained, so nothing is random.
    """
    classes = _num_classes(train_x, train_y, test_x, test_y, multilabel, feature_ndim=2)
    if k < 1 or temperature <= 0:
        raise ValueError(f"knn_probe needs k >= 1 and temperature > 0, got k={k}, temperature={temperature}")
    train = F.normalize(train_x.float(), dim=1)
    votes = train_y.float() if multilabel else F.one_hot(train_y.long(), classes).float()  # (Ntr, C)
    votes = votes.to(train.device)
    k = min(k, train.shape[0])
    scores = []
    for chunk in F.normalize(test_x.float(), dim=1).split(batch_size):
        sim, idx = (chunk @ train.T).topk(k, dim=1)  # (b, k) nearest training clips
        weight = (sim / temperature).exp()  # (b, k)
        scores.append((weight.unsqueeze(-1) * votes[idx]).sum(1).cpu())  # (b, C)
    scores = torch.cat(scores)
    if multilabel:
        return {"mAP": mean_average_precision(test_y.cpu(), scores)}
    return {"top1": top1_accuracy(test_y.cpu(), scores)}


# ---------------------------------------------------------------------------- result tables
def markdown_table(rows: Mapping[str, Mapping[str, float]], columns: Sequence[str] | None = None,
                   decimals: int = 1) -> str:
    """A Markdown table with one row per model/method and one column per metric.

    rows: {"tgdp": {"A->V R@1": 30.3, ...}, "sync": {...}}. ``columns`` picks and orders the
    metrics (default: every metric, in order of first appearance). Missing values show "-".
    """
    if columns is None:
        columns = list(dict.fromkeys(name for metrics in rows.values() for name in metrics))

    def cell(value) -> str:
        if value is None:
            return "-"
        return f"{value:.{decimals}f}" if isinstance(value, numbers.Real) else str(value)

    lines = ["| model | " + " | ".join(columns) + " |", "|---|" + "---:|" * len(columns)]
    for name, metrics in rows.items():
        lines.append(f"| {name} | " + " | ".join(cell(metrics.get(c)) for c in columns) + " |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------- models on datasets
class ClipEmbeddings(NamedTuple):
    audio: torch.Tensor  # (N, K, D) L2-normalised, one per aligned segment
    visual: torch.Tensor  # (N, K, D) L2-normalised, one per frame
    labels: torch.Tensor  # (N, C) multi-hot clip labels
    frame_labels: torch.Tensor  # (N, K) class of each pair, -1 where the manifest has none


class ClipFeatures(NamedTuple):
    audio: torch.Tensor  # (N, K, D) global audio features before normalisation, one per aligned segment
    visual: torch.Tensor  # (N, K, D) global visual features before normalisation, one per frame
    labels: torch.Tensor  # (N, C) multi-hot clip labels
    frame_labels: torch.Tensor  # (N, K) class of each pair, -1 where the manifest has none
    index: torch.Tensor  # (N,) each clip's "index" item: its position in the manifest


@torch.no_grad()
def clip_features(encoder, dataset, batch_size: int = 16, workers: int = 0, progress: bool = True) -> ClipFeatures:
    """Every clip's aligned frame/segment pairs through ``encoder.encode`` (an ``AVEncoder``: a
    model's ``.encoder``, or the EMA teacher's from ``checkpoint.load_teacher_encoder``).

    ``dataset``: evaluation items holding all K pairs of a clip (``dataset.eval_data``).
    """
    from tqdm.auto import tqdm

    from .dataset import eval_loader

    encoder.eval()
    device = next(encoder.parameters()).device
    audio, visual, labels, frame_labels, index = [], [], [], [], []
    for batch in tqdm(eval_loader(dataset, batch_size, workers), desc="embedding", unit="batch",
                      disable=not progress, leave=False):
        B, K = batch["fbank"].shape[:2]
        fbank = batch["fbank"].flatten(0, 1).to(device)  # (B*K, T, F)
        frames = batch["frames"].flatten(0, 1).to(device)  # (B*K, 3, S, S)
        audio.append(encoder.encode(fbank, "a")[0].view(B, K, -1).float().cpu())
        visual.append(encoder.encode(frames, "v")[0].view(B, K, -1).float().cpu())
        labels.append(batch["labels"])
        frame_labels.append(batch["frame_labels"])
        index.append(batch["index"])
    if not audio:
        raise ValueError("the evaluation set yielded no clips")
    return ClipFeatures(*(torch.cat(parts) for parts in (audio, visual, labels, frame_labels, index)))


def embed_clips(model, dataset, batch_size: int = 16, workers: int = 0, progress: bool = True) -> ClipEmbeddings:
    """Every clip's aligned frame/segment pairs as ``encode_audio`` / ``encode_visual`` embed them
    (``clip_features`` of ``model.encoder``, L2-normalised)."""
    f = clip_features(model.encoder, dataset, batch_size, workers, progress)
    return ClipEmbeddings(F.normalize(f.audio, dim=-1), F.normalize(f.visual, dim=-1), f.labels, f.frame_labels)


def evaluate_model(model, test_set, train_set=None, batch_size: int = 16, probe_epochs: int = 100,
                   progress: bool = True) -> dict[str, float]:
    """Zero-shot retrieval on ``test_set`` and, given ``train_set``, a linear probe (mAP) on
    frozen clip features (mean of each clip's audio and visual embeddings, concatenated)."""
    a, v, y, fy = embed_clips(model, test_set, batch_size, progress=progress)
    metrics = retrieval_metrics(a, v, y if y.shape[1] else None)
    if (fy >= 0).all():
        metrics.update(pair_class_precision(a, v, fy))
    if train_set is not None and y.shape[1]:
        ta, tv, ty, _ = embed_clips(model, train_set, batch_size, progress=progress)
        train_x = torch.cat([ta.mean(1), tv.mean(1)], dim=1)  # (N, 2D) clip features
        test_x = torch.cat([a.mean(1), v.mean(1)], dim=1)
        metrics.update(linear_probe(train_x, ty, test_x, y, multilabel=True, epochs=probe_epochs))
    return metrics


def pair_class_precision(audio_emb: torch.Tensor, visual_emb: torch.Tensor, frame_labels: torch.Tensor,
                         chunk: int = 1024) -> dict[str, float]:
    """Class-level retrieval between single frames and single segments of *other* clips.

    audio_emb, visual_emb (N, K, D), frame_labels (N, K) class per pair. Every segment queries
    all frames of the other clips (and vice versa); P@1 counts a top hit showing the query's
    class. The query's own clip is left out, so instance matching cannot help. Returns
    "A->V pair P@1", "V->A pair P@1" and "pair P chance" (share of the gallery in the
    query's class), in percent.
    """
    N, K, D = audio_emb.shape
    a, v = F.normalize(audio_emb.reshape(N * K, D), dim=-1), F.normalize(visual_emb.reshape(N * K, D), dim=-1)
    y = frame_labels.reshape(N * K)
    clip = torch.arange(N).repeat_interleave(K)
    out = {}
    for name, queries, gallery in (("A->V", a, v), ("V->A", v, a)):
        hits = 0
        for lo in range(0, N * K, chunk):
            sim = queries[lo:lo + chunk] @ gallery.T  # (chunk, N*K)
            sim[clip[lo:lo + chunk, None] == clip[None, :]] = -torch.inf
            hits += (y[sim.argmax(dim=1)] == y[lo:lo + chunk]).sum().item()
        out[f"{name} pair P@1"] = 100 * hits / (N * K)
    out["pair P chance"] = pair_chance(frame_labels)
    return out


def pair_chance(frame_labels: torch.Tensor) -> float:
    """Expected pair P@1 of a random ranking: the mean share of other clips' pairs in the
    query's class, in percent. frame_labels (N, K)."""
    N, K = frame_labels.shape
    y = frame_labels.reshape(N * K)
    counts = torch.bincount(y, minlength=int(y.max()) + 1).float()
    same_clip = (y.view(N, K, 1) == y.view(N, 1, K)).sum(-1).view(-1).float()  # same class within the clip
    return 100 * ((counts[y] - same_clip) / (N * K - K)).mean().item()
