"""The model's paths: gradient routing, compute per pass, teacher, one step per method, bad input."""
import pytest
import torch

import tgdp_core as tg
from tgdp_core.masking import patchify
from tgdp_core.teacher import EMATeacher, momentum_at
from tgdp_core.trainer import make_optimizer, make_teacher, train_step

from conftest import tiny_batch


def grads(module):
    return {n: p.grad for n, p in module.named_parameters()}


def nonzero(g):
    return g is not None and g.abs().sum() > 0


@pytest.fixture
def tgdp_setup(tiny_cfg):
    model = tg.build_model(tiny_cfg)
    teacher = EMATeacher(model.encoder)
    audio, frames = tiny_batch(tiny_cfg)
    return model, teacher, audio, frames


def test_decoder_gets_gradient_only_from_reconstruction(tgdp_setup):
    model, teacher, audio, frames = tgdp_setup
    out = model(audio, frames, teacher(audio, frames, "patch_to_global"))
    (out.parts["contrastive"] + out.parts["distill"]).backward(retain_graph=True)
    assert not any(nonzero(g) for g in grads(model.decoder).values())
    # the joint block's shared norms and the joint output norm serve the concatenated pass only
    enc = model.encoder
    for p in (*enc.joint.norm1.parameters(), *enc.joint.norm2.parameters(), *enc.norm.parameters()):
        assert not nonzero(p.grad)
    assert nonzero(enc.joint.norm1_a.weight.grad) and nonzero(enc.norm_v.weight.grad)
    model.zero_grad()
    out.parts["rec"].backward()
    assert all(nonzero(g) for g in grads(model.decoder).values())
    # ... and the reconstruction path never touches the per-modality global pass
    for p in (*enc.joint.norm1_a.parameters(), *enc.norm_a.parameters(), *enc.norm_v.parameters()):
        assert not nonzero(p.grad)


def test_contrastive_path_sees_only_the_teachers_top_k(tgdp_setup):
    model, teacher, audio, frames = tgdp_setup
    frames.requires_grad_(True)
    audio.requires_grad_(True)
    guide = teacher(audio, frames, "patch_to_global")
    out = model(audio, frames, guide)
    (out.parts["contrastive"] + out.parts["distill"]).backward()
    ratio = model.cfg.objective.contrastive_mask_ratio
    for x, img, prio in ((frames, frames.grad, guide.priority_v),
                         (audio, audio.grad.transpose(1, 2).unsqueeze(1), guide.priority_a)):
        touched = patchify(img, model.cfg.model.patch_size).abs().sum(-1) > 0  # (B, N) patches with gradient
        keep = int(prio.shape[1] * (1 - ratio))
        top = torch.zeros_like(touched)
        top.scatter_(1, torch.topk(prio, keep, dim=1).indices, True)
        assert torch.equal(touched, top)


def test_teacher_never_receives_gradients_and_moves_by_ema(tgdp_setup):
    model, teacher, audio, frames = tgdp_setup
    assert not any(p.requires_grad for p in teacher.parameters())
    guide = teacher(audio, frames, "patch_to_global")
    assert not guide.audio.requires_grad and not guide.priority_v.requires_grad
    model(audio, frames, guide).loss.backward()
    assert all(p.grad is None for p in teacher.parameters())
    with torch.no_grad():
        for p in model.encoder.parameters():
            p.add_(torch.randn_like(p))
    before = [p.clone() for p in teacher.parameters()]
    teacher.update(model.encoder, momentum=1.0)
    assert all(torch.equal(a, b) for a, b in zip(before, teacher.parameters()))
    teacher.update(model.encoder, momentum=0.9)
    for b, t, s in zip(before, teacher.parameters(), model.encoder.parameters()):
        assert torch.allclose(t, 0.9 * b + 0.1 * s, atol=1e-6)
    teacher.update(model.encoder, momentum=0.0)
    assert all(torch.equal(t, s) for t, s in zip(teacher.parameters(), model.encoder.parameters()))


def test_momentum_schedule_is_a_cosine_ramp():
    assert momentum_at(0, 100, 0.996) == pytest.approx(0.996)
    assert momentum_at(50, 100, 0.996) == pytest.approx(0.998)
    assert momentum_at(100, 100, 0.996) == pytest.approx(1.0)
    values = [momentum_at(s, 100, 0.99) for s in range(101)]
    assert values == sorted(values)


def test_each_pass_computes_only_what_its_loss_uses(tgdp_setup, monkeypatch):
    model, teacher, audio, frames = tgdp_setup
    calls = []
    Block = type(model.encoder.joint)
    for name in ("forward", "forward_global"):
        original = getattr(Block, name)

        def spy(self, *args, _name=name, _original=original, **kwargs):
            calls.append((self, _name, kwargs.get("norm")))
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(Block, name, spy)
    decoder_calls = []
    model.decoder.register_forward_hook(lambda *a: decoder_calls.append(1))

    def joint_calls(joint):
        return sorted(c[1:] for c in calls if c[0] is joint)

    guide = teacher(audio, frames, "patch_to_global")
    # teacher: the global row per modality only; no full joint pass, no concatenated pass
    assert joint_calls(teacher.encoder.joint) == [("forward_global", "a"), ("forward_global", "v")]
    calls.clear()
    model(audio, frames, guide)
    # student: one concatenated pass (reconstruction), the global row per modality (contrastive)
    assert joint_calls(model.encoder.joint) == [("forward", None), ("forward_global", "a"), ("forward_global", "v")]
    assert decoder_calls == [1]


@pytest.mark.parametrize("method", ["tgdp", "sync", "cavmae"])
def test_one_optimiser_step_per_method(method):
    cfg = tg.Config.preset("tiny", method=method)
    model = tg.build_model(cfg)
    teacher = make_teacher(model)
    assert (teacher is not None) == (method == "tgdp")
    optimizer = make_optimizer(model, cfg)
    audio, frames = tiny_batch(cfg)
    before = [p.detach().clone() for p in model.parameters()]
    teacher_before = [p.clone() for p in teacher.parameters()] if teacher else []
    record = train_step(model, teacher, optimizer, audio, frames, step=0)
    expected = {"rec", "contrastive"} | ({"distill"} if method == "tgdp" else set())
    assert expected <= set(record) and all(torch.isfinite(torch.tensor(record[k])) for k in expected)
    assert all(not torch.equal(a, p) for a, p in zip(before, model.parameters()))
    if teacher:  # momentum 0.996 at step 0: the teacher moved, a little
        assert any(not torch.equal(a, p) for a, p in zip(teacher_before, teacher.parameters()))


def test_ablation_switches_change_the_contrastive_view():
    audio, frames = tiny_batch(tg.Config.preset("tiny"))
    masks = {}
    for name, over in {"guided": {}, "random": {"objective.selection": "random"},
                       "ratio0": {"objective.contrastive_mask_ratio": 0.0},
                       "ratio65": {"objective.contrastive_mask_ratio": 0.65}}.items():
        cfg = tg.Config.preset("tiny", **over)
        torch.manual_seed(0)
        model = tg.build_model(cfg)
        guide = EMATeacher(model.encoder)(audio, frames, "patch_to_global")
        out = model(audio, frames, guide, torch.Generator().manual_seed(0))
        masks[name] = out.masks["con_v"]
        kept = int(36 * (1 - cfg.objective.contrastive_mask_ratio))
        assert (out.masks["con_v"] == 0).sum(1).eq(kept).all()
        if name == "guided":
            top = torch.topk(guide.priority_v, kept, dim=1).indices
            assert (out.masks["con_v"].gather(1, top) == 0).all()
    assert not torch.equal(masks["guided"], masks["random"])
    assert masks["ratio0"].sum() == 0
    cfg = tg.Config.preset("tiny", **{"objective.distill_weight": 0.0})
    model = tg.build_model(cfg)
    out = model(audio, frames, EMATeacher(model.encoder)(audio, frames, "global_to_patch"))
    assert "distill" not in out.parts


def test_tgdp_without_guide_is_a_clear_error(tiny_cfg):
    model = tg.build_model(tiny_cfg)
    with pytest.raises(ValueError, match="needs the teacher's guide"):
        model(*tiny_batch(tiny_cfg))


def test_base_preset_matches_the_official_architecture():
    """190.66 M parameters in the official model: ours plus the 4 LayerNorms per
    modality-specific and decoder block that the official Block creates but never uses."""
    model = tg.build_model(tg.Config.preset("base"))
    trainable = sum(p.numel() for p in model.parameters())
    fixed = sum(b.numel() for b in model.buffers())  # the sin-cos tables
    unused_official_norms = (2 * 11 * 4 * 2 * 768) + (8 * 4 * 2 * 512)
    assert fixed == 517_120
    assert trainable + unused_official_norms == 190_143_744
    assert trainable + fixed + unused_official_norms == 190_660_864


@pytest.mark.parametrize("call,bad,message", [
    ("encode_audio", torch.zeros(2, 64, 128), r"fbank must have shape \(B, 128, 64\), got \(2, 64, 128\)"),
    ("encode_audio", torch.zeros(2, 128, 64, dtype=torch.int64), r"floating-point"),
    ("encode_audio", torch.full((2, 128, 64), float("nan")), r"NaN or infinite"),
    ("encode_visual", torch.zeros(2, 96, 96, 3), r"frames must have shape \(B, 3, 96, 96\)"),
    ("encode_visual", [[0.0]], r"must be a torch.Tensor"),
])
def test_bad_input_names_the_expected_shape(tiny_cfg, call, bad, message):
    model = tg.build_model(tiny_cfg)
    with pytest.raises((ValueError, TypeError), match=message):
        getattr(model, call)(bad)


def test_encoders_return_unit_vectors(tiny_cfg):
    model = tg.build_model(tiny_cfg).eval()
    audio, frames = tiny_batch(tiny_cfg)
    for emb in (model.encode_audio(audio), model.encode_visual(frames)):
        assert emb.shape == (4, tiny_cfg.model.embed_dim)
        assert torch.allclose(emb.norm(dim=-1), torch.ones(4), atol=1e-5)
    feats = model.forward_features(audio, frames)
    assert torch.allclose(torch.nn.functional.normalize(feats.audio, dim=-1), model.encode_audio(audio), atol=1e-5)


@pytest.mark.parametrize("direction", ["patch_to_global", "global_to_patch"])
@torch.no_grad()
def test_token_priority_stays_fp32_under_bf16_autocast(direction):
    """At base width the priorities are all near 1/N; bf16 would round them onto a few dozen
    values and the top-k cut would fall inside ties (issue 12). Computed in fp32 inside the
    autocast region they stay distinct and rank as the fp32 run does."""
    from tgdp_core.layers import Block, init_weights
    from tgdp_core.masking import num_kept

    g = torch.Generator().manual_seed(0)
    block = Block(768, 12, modality_norms=True)
    block.apply(init_weights)
    x = torch.randn(2, 1 + 208, 768, generator=g)  # global token + base's audio patches
    _, want = block.forward_global(x, norm="a", priority=direction)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, got = block.forward_global(x, norm="a", priority=direction)
    assert got.dtype == torch.float32
    k = num_kept(208, 0.5)
    for b in range(2):
        assert torch.unique(got[b]).numel() >= 0.95 * 208
        overlap = set(got[b].topk(k).indices.tolist()) & set(want[b].topk(k).indices.tolist())
        assert len(overlap) >= 0.95 * k


@pytest.mark.parametrize("kind", ["guided", "guided_inverse"])
def test_reconstruction_view_keeps_the_teachers_top_k_or_its_complement(kind):
    cfg = tg.Config.preset("tiny", **{"objective.rec_selection": kind})
    model = tg.build_model(cfg)
    audio, frames = tiny_batch(cfg)
    guide = EMATeacher(model.encoder)(audio, frames, "patch_to_global")
    out = model(audio, frames, guide, torch.Generator().manual_seed(0))
    for mask, priority in ((out.masks["rec_a"], guide.priority_a), (out.masks["rec_v"], guide.priority_v)):
        n = priority.shape[1]
        keep = int(n * (1 - cfg.objective.rec_mask_ratio))
        top = torch.zeros_like(mask, dtype=torch.bool).scatter_(
            1, priority.topk(keep if kind == "guided" else n - keep, dim=1).indices, True)
        kept = mask == 0
        assert torch.equal(kept, top if kind == "guided" else ~top)
    random = tg.build_model(tg.Config.preset("tiny"))(audio, frames, guide, torch.Generator().manual_seed(0))
    assert random.masks["rec_v"].sum(1).eq(out.masks["rec_v"].sum(1)).all()  # as many removed as at random


def test_guided_reconstruction_gets_the_teachers_priority_from_the_trainer(monkeypatch):
    asked = []
    cfg = tg.Config.preset("tiny", **{"objective.rec_selection": "guided", "objective.selection": "random",
                                      "objective.distill_weight": 0.0, "teacher.guidance_warmup_fraction": 0.005})
    model = tg.build_model(cfg)
    teacher = make_teacher(model)
    assert teacher is not None  # the reconstruction view's guidance needs one, even without distillation
    forward = teacher.forward
    monkeypatch.setattr(teacher, "forward", lambda a, v, priority: asked.append(priority) or forward(a, v, priority))
    optimizer = make_optimizer(model, cfg)
    audio, frames = tiny_batch(cfg)
    for step in (0, 2):
        train_step(model, teacher, optimizer, audio, frames, step)
    assert asked == [None, "patch_to_global"]  # random during the guidance warm-up, guided after it


def test_released_softmax_selection_follows_the_raw_attention():
    audio, frames = tiny_batch(tg.Config.preset("tiny"))
    cold = tg.Config.preset("tiny", **{"objective.selection": "probabilistic_softmax",
                                       "objective.selection_temperature": 1e-7})
    model = tg.build_model(cold)
    guide = EMATeacher(model.encoder)(audio, frames, "patch_to_global")
    assert torch.allclose(guide.priority_v, guide.attention_v / guide.attention_v.sum(1, keepdim=True))
    out = model(audio, frames, guide, torch.Generator().manual_seed(0))
    keep = int(36 * (1 - cold.objective.contrastive_mask_ratio))
    top = guide.attention_v.topk(keep, dim=1).indices
    assert (out.masks["con_v"].gather(1, top) == 0).all()  # T -> 0: the top-k
    warm = tg.build_model(tg.Config.preset("tiny", **{"objective.selection": "probabilistic_softmax"}))
    warm.load_state_dict(model.state_dict())
    shares = [(warm(audio, frames, guide, torch.Generator().manual_seed(s)).masks["con_v"].gather(1, top) == 0)
              .float().mean().item() for s in range(8)]
    assert 0.3 < sum(shares) / len(shares) < 0.7  # T = 1: about a random half of the top-k survives
