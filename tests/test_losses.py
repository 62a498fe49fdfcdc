import math

import pytest
import torch
import torch.nn.functional as F

from tgdp_core import losses


def direct_info_nce(a, v, t):
    """Both directions written out with explicit sums over the batch."""
    a, v = F.normalize(a, dim=-1), F.normalize(v, dim=-1)
    B = a.shape[0]
    total = 0.0
    for i in range(B):
        s_av = [float(a[i] @ v[j]) / t for j in range(B)]
        s_va = [float(v[i] @ a[j]) / t for j in range(B)]
        total += -(s_av[i] - math.log(sum(math.exp(s) for s in s_av)))
        total += -(s_va[i] - math.log(sum(math.exp(s) for s in s_va)))
    return total / (2 * B)


def test_info_nce_matches_direct_computation():
    a, v = torch.randn(6, 16, dtype=torch.float64), torch.randn(6, 16, dtype=torch.float64)
    assert losses.info_nce(a, v, 0.2).item() == pytest.approx(direct_info_nce(a, v, 0.2), rel=1e-5)
    # perfectly aligned, well-separated pairs give a loss near zero
    eye = torch.eye(6)
    assert losses.info_nce(eye, eye, 0.05).item() < 1e-6


def test_gathered_info_nce_with_a_faked_two_rank_collective():
    """Two ranks of 4 samples each: the mean of the per-rank losses, with negatives gathered
    across ranks and gradients kept, equals the one-process loss on the global batch of 8,
    and so do the gradients reaching every sample."""
    torch.manual_seed(0)
    a = torch.randn(8, 16, requires_grad=True)
    v = torch.randn(8, 16, requires_grad=True)
    world, B = 2, 4

    def rank_loss(r):
        la, lv = a[r * B:(r + 1) * B], v[r * B:(r + 1) * B]
        full = {"a": F.normalize(a, dim=-1), "v": F.normalize(v, dim=-1)}
        seen = []

        def gather(x):
            key = "a" if not seen else "v"  # info_nce gathers audio first, then visual
            seen.append(key)
            # other ranks' slices stay attached to their owners' graph, as all_gather with
            # gradients does: their gradients flow back to the rank that produced them
            parts = list(full[key].split(B))
            parts[r] = x
            return torch.cat(parts)

        return losses.info_nce(la, lv, 0.1, gather=gather, rank=r)

    per_rank = [rank_loss(r) for r in range(world)]
    distributed = sum(per_rank) / world  # DDP averages gradients over ranks
    single = losses.info_nce(a, v, 0.1)
    assert distributed.item() == pytest.approx(single.item(), rel=1e-6)
    grad_distributed = torch.autograd.grad(distributed, (a, v), retain_graph=True)
    grad_single = torch.autograd.grad(single, (a, v))
    for g1, g2 in zip(grad_distributed, grad_single):
        assert torch.allclose(g1, g2, atol=1e-6)
    # gathered negatives are really used: local-only negatives give a different loss
    local_only = sum(losses.info_nce(a[r * B:(r + 1) * B], v[r * B:(r + 1) * B], 0.1) for r in range(world)) / world
    assert abs(local_only.item() - single.item()) > 1e-3


def test_reconstruction_loss_uses_masked_normalised_patches_only():
    torch.manual_seed(0)
    pred, target = torch.randn(2, 5, 8), torch.randn(2, 5, 8) * 3 + 1
    mask = torch.tensor([[1, 0, 1, 0, 0], [0, 0, 0, 1, 1]], dtype=torch.float32)
    norm = (target - target.mean(-1, keepdim=True)) / torch.sqrt(target.var(-1, unbiased=True, keepdim=True) + 1e-6)
    rows = [((pred[b, n] - norm[b, n]) ** 2).mean() for b in range(2) for n in range(5) if mask[b, n]]
    assert losses.reconstruction_loss(pred, target, mask).item() == pytest.approx(torch.stack(rows).mean().item(), rel=1e-6)
    # kept patches do not count: changing their prediction leaves the loss alone
    pred2 = pred.clone()
    pred2[0, 1] += 100
    assert losses.reconstruction_loss(pred2, target, mask).item() == pytest.approx(losses.reconstruction_loss(pred, target, mask).item())
    raw = losses.reconstruction_loss(pred, target, mask, norm_pix=False)
    assert raw.item() == pytest.approx(torch.stack([((pred[b, n] - target[b, n]) ** 2).mean() for b in range(2) for n in range(5) if mask[b, n]]).mean().item(), rel=1e-6)


def test_distillation_pulls_only_the_student():
    student = torch.randn(4, 8, requires_grad=True)
    teacher = torch.randn(4, 8, requires_grad=True)
    loss = losses.distillation_loss(student, teacher)
    assert loss.item() == pytest.approx(((student - teacher) ** 2).mean().item())
    loss.backward()
    assert student.grad is not None and teacher.grad is None
    assert losses.distillation_loss(teacher, teacher).item() == 0.0
