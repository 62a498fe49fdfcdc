import pytest
import torch

from tgdp_core.masking import (guided_masking, gumbel_top_k_masking, inverse_guided_masking, num_kept, patchify,
                               probabilistic_masking, random_masking, softmax_logits, softmax_probabilities, unpatchify)


def tokens(B=3, N=20, D=4):
    # token j of every sample carries the value j in every channel, so kept ids are readable
    return torch.arange(N, dtype=torch.float32).view(1, N, 1).expand(B, N, D).clone()


@pytest.mark.parametrize("ratio", [0.0, 0.5, 0.65, 0.75])
def test_random_masking_invariants(ratio):
    x = tokens()
    B, N, _ = x.shape
    kept, mask, ids_restore = random_masking(x, ratio)
    keep = int(N * (1 - ratio))
    assert kept.shape == (B, keep, 4) and mask.shape == (B, N)
    assert (mask.sum(1) == N - keep).all()
    for b in range(B):
        kept_ids = kept[b, :, 0].long()
        # mask is 0 exactly at the kept tokens (MAE convention), in the original order
        assert set(kept_ids.tolist()) == set(torch.nonzero(mask[b] == 0).flatten().tolist())
    # ids_restore inverts the shuffle: the kept tokens lead the shuffled order, and
    # gathering the shuffled sequence with ids_restore gives back x
    ids_shuffle = torch.argsort(ids_restore, dim=1)
    shuffled = torch.gather(x, 1, ids_shuffle.unsqueeze(-1).expand_as(x))
    assert torch.equal(shuffled[:, :keep], kept)
    assert torch.equal(torch.gather(shuffled, 1, ids_restore.unsqueeze(-1).expand_as(x)), x)


def test_generator_makes_masks_repeatable():
    x = tokens()
    m1 = random_masking(x, 0.75, torch.Generator().manual_seed(7))[1]
    m2 = random_masking(x, 0.75, torch.Generator().manual_seed(7))[1]
    m3 = random_masking(x, 0.75, torch.Generator().manual_seed(8))[1]
    assert torch.equal(m1, m2) and not torch.equal(m1, m3)


def test_guided_masking_keeps_exactly_the_top_k():
    x = tokens(B=4, N=50)
    scores = torch.rand(4, 50)
    for ratio in (0.0, 0.5, 0.65, 0.75):
        keep = int(50 * (1 - ratio))
        kept, mask, _ = guided_masking(x, scores, ratio)
        top = torch.topk(scores, keep, dim=1).indices
        for b in range(4):
            assert set(kept[b, :, 0].long().tolist()) == set(top[b].tolist())
            assert set(torch.nonzero(mask[b] == 0).flatten().tolist()) == set(top[b].tolist())


def test_probabilistic_masking_follows_scores():
    x = tokens(B=2, N=10)
    scores = torch.tensor([[0.0] * 5 + [1.0] * 5, [5.0] + [1e-4] * 9])
    seen_first = 0
    for seed in range(50):
        kept, _, _ = probabilistic_masking(x, scores, 0.5, torch.Generator().manual_seed(seed))
        assert set(kept[0, :, 0].long().tolist()) == {5, 6, 7, 8, 9}  # zero-score tokens never drawn
        seen_first += 0 in kept[1, :, 0].long().tolist()
    assert seen_first == 50  # a dominant token is always drawn
    a = probabilistic_masking(x, torch.ones(2, 10), 0.5, torch.Generator().manual_seed(0))[1]
    b = probabilistic_masking(x, torch.ones(2, 10), 0.5, torch.Generator().manual_seed(1))[1]
    assert not torch.equal(a, b)  # uniform scores: a random draw, not a fixed order


def test_inverse_guided_masking_removes_exactly_the_top_tokens():
    x = tokens(B=4, N=50)
    scores = torch.rand(4, 50)
    for ratio in (0.0, 0.5, 0.75):
        keep = int(50 * (1 - ratio))
        kept, mask, ids_restore = inverse_guided_masking(x, scores, ratio)
        top = set(torch.topk(scores, 50 - keep, dim=1).indices[0].tolist()) if keep < 50 else set()
        assert set(kept[0, :, 0].long().tolist()) == set(range(50)) - top
        assert set(torch.nonzero(mask[0] == 1).flatten().tolist()) == top
    # at 0.5 the kept half is the guided mask's removed half exactly
    assert torch.equal(inverse_guided_masking(x, scores, 0.5)[1], 1 - guided_masking(x, scores, 0.5)[1])


def test_gumbel_top_k_on_logits_is_the_draw_on_their_softmax():
    x, logits = tokens(B=3, N=30), torch.randn(3, 30)
    for seed in range(3):
        a = gumbel_top_k_masking(x, logits, 0.5, torch.Generator().manual_seed(seed))[1]
        b = probabilistic_masking(x, torch.softmax(logits, -1), 0.5, torch.Generator().manual_seed(seed))[1]
        assert torch.equal(a, b)
    assert torch.allclose(softmax_probabilities(logits, 0.5), torch.softmax(2 * logits, -1))
    cold = gumbel_top_k_masking(x, softmax_logits(logits, 1e-9), 0.5)[1]
    assert torch.equal(cold, guided_masking(x, logits, 0.5)[1])  # T -> 0: the top-k, without underflow
    with pytest.raises(ValueError, match="temperature must be positive"):
        softmax_logits(logits, 0.0)


def test_masking_rejects_bad_input():
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        num_kept(10, 1.0)
    with pytest.raises(ValueError, match=r"\(B, N, D\)"):
        random_masking(torch.zeros(3, 4), 0.5)
    with pytest.raises(ValueError, match=r"scores of shape \(3, 20\)"):
        guided_masking(tokens(), torch.zeros(3, 19), 0.5)


def test_patchify_orders_audio_frequency_major_and_round_trips():
    F_, T, p = 32, 48, 16
    spec = torch.randn(2, 1, F_, T)  # (B, 1, mel, time)
    patches = patchify(spec, p)  # (B, 2 * 3, 256)
    f, t = 1, 2  # token k = f * (T / p) + t covers mel rows 16f.., frames 16t..
    k = f * (T // p) + t
    assert torch.equal(patches[:, k].view(2, p, p), spec[:, 0, f * p:(f + 1) * p, t * p:(t + 1) * p])
    assert torch.equal(unpatchify(patches, p, 1, (F_ // p, T // p)), spec)
    frames = torch.randn(2, 3, 32, 32)
    assert torch.equal(unpatchify(patchify(frames, p), p, 3, (2, 2)), frames)
    # channel is the innermost index of a patch vector (row, col, channel)
    assert torch.equal(patchify(frames, p)[0, 0, :3], frames[0, :, 0, 0])
