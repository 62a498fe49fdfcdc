"""The memory and speed switches of issue 12: each changes how a step runs, not what it computes.

How fast each is, is measured by ``python -m tgdp_core bench --variants ...`` (README,
"Performance"), never asserted here.
"""
import time

import pytest
import torch
from torch.profiler import profile

import tgdp_core as tg
from tgdp_core.layers import Block
from tgdp_core.model import AVEncoder, TGDPModel
from tgdp_core.trainer import make_optimizer, make_teacher, mask_generator, train_step

from conftest import SyntheticAV, tiny_batch

# tiny with the teacher's guidance and the masked contrastive view from the first step
GUIDED = {"teacher.guidance_warmup_fraction": 0.0, "objective.contrastive_mask_warmup_fraction": 0.0}


def steps(cfg, n=2, batch=4):
    """Losses and final weights of ``n`` training steps of a fresh model (seed 0, fixed inputs)."""
    torch.manual_seed(0)
    model = tg.build_model(cfg)
    teacher, optimizer = make_teacher(model), make_optimizer(model, cfg)
    audio, frames = tiny_batch(cfg, batch, generator=torch.Generator().manual_seed(1))
    losses = [train_step(model, teacher, optimizer, audio, frames, step,
                         generator=mask_generator(cfg, step, torch.device("cpu")))["loss"] for step in range(n)]
    return losses, model


def test_grad_checkpointing_recomputes_the_blocks_and_changes_nothing_else(monkeypatch):
    plain_losses, plain = steps(tg.Config.preset("tiny", **GUIDED))
    calls = []
    original = Block._forward
    monkeypatch.setattr(Block, "_forward", lambda self, *a: calls.append(self) or original(self, *a))
    losses, model = steps(tg.Config.preset("tiny", **GUIDED, **{"model.grad_checkpointing": True}), n=1)
    # each forward of a student block ran again in the backward (the teacher's, under no_grad, did not)
    runs = [sum(b is block for b in calls) for block in model.modules() if isinstance(block, Block)]
    assert sorted(set(runs)) == [2, 4]  # joint (its concatenated pass) and decoder: 1 + 1; specific: 2 + 2
    monkeypatch.undo()
    losses, model = steps(tg.Config.preset("tiny", **GUIDED, **{"model.grad_checkpointing": True}))
    assert losses == pytest.approx(plain_losses, rel=1e-5)
    for (name, a), b in zip(model.state_dict().items(), plain.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-6), name


def test_a_run_resumes_with_checkpointing_switched(tmp_path):
    cfg = tg.Config.preset("tiny", train=dict(steps=2, batch_size=4, log_every=1, checkpoint_every=1),
                           data={"workers": 0})
    tg.train(cfg, tmp_path, dataset=SyntheticAV(cfg))
    cfg.train.steps = 3
    cfg.model.grad_checkpointing = True  # a memory switch: the same model, the run goes on
    result = tg.train(cfg, tmp_path, dataset=SyntheticAV(cfg), allow_change=["train.steps"])
    assert [r["step"] for r in result.history] == [1, 2, 3]


def test_bf16_teacher_runs_under_autocast_and_hands_back_fp32(monkeypatch):
    cfg = tg.Config.preset("tiny", **GUIDED, **{"teacher.precision": "bf16"})
    seen = {}
    original_guide, original_forward = AVEncoder.guide, TGDPModel.forward

    def guide(self, *args):
        seen["teacher autocast"] = torch.is_autocast_enabled("cpu")
        return original_guide(self, *args)

    def forward(self, fbank, frames, guide=None, *args, **kwargs):
        seen["student autocast"] = torch.is_autocast_enabled("cpu")
        seen["guide dtypes"] = {t.dtype for t in (guide.audio, guide.visual, guide.priority_a, guide.priority_v)}
        return original_forward(self, fbank, frames, guide, *args, **kwargs)

    monkeypatch.setattr(AVEncoder, "guide", guide)
    monkeypatch.setattr(TGDPModel, "forward", forward)
    losses, _ = steps(cfg, n=1)
    assert seen == {"teacher autocast": True, "student autocast": False, "guide dtypes": {torch.float32}}
    monkeypatch.undo()
    same, _ = steps(tg.Config.preset("tiny", **GUIDED), n=1)
    assert losses[0] == pytest.approx(same[0], rel=0.02)  # the targets differ by bf16 rounding only


def test_teacher_precision_is_validated():
    with pytest.raises(ValueError, match="teacher.precision 'fp16' is not one of same, bf16"):
        tg.Config.preset("tiny", **{"teacher.precision": "fp16"})


@pytest.mark.slow  # compiling tiny's blocks: about 70 s with a cold inductor cache on 2 busy cores, 9 s warm
def test_train_compile_gives_the_eager_losses(tmp_path):
    """``train.compile`` through the trainer (setup_run compiles every block of student and
    teacher): the same losses as eager, and checkpoints that load into an eager model."""
    cfg = tg.Config.preset("tiny", **GUIDED, train=dict(steps=3, batch_size=2, log_every=1, checkpoint_every=3),
                           data={"workers": 0})
    eager = tg.train(cfg, tmp_path / "eager", dataset=SyntheticAV(cfg))
    cfg.train.compile = True
    start = time.perf_counter()
    compiled = tg.train(cfg, tmp_path / "compiled", dataset=SyntheticAV(cfg))
    print(f"3 compiled tiny steps in {time.perf_counter() - start:.0f} s")
    for key in ("loss", "rec", "distill", "contrastive"):
        assert [r[key] for r in compiled.history] == pytest.approx([r[key] for r in eager.history], rel=1e-4), key
    tg.load_model(compiled.checkpoint)  # strict load: the state dict kept its names


def test_teacher_priority_attention_runs_the_fused_kernel():
    """The one-hot column that reads the patch -> global attention keeps SDPA on its fused
    kernel (q and k get a zero channel so every head dim is Dh + 1): no N x N matrix."""
    cfg = tg.Config.preset("tiny")
    joint = tg.build_model(cfg).encoder.joint
    x = torch.randn(2, 1 + cfg.model.num_visual_patches, cfg.model.embed_dim)
    with torch.no_grad(), profile() as prof:
        joint.forward_global(x, "v", "patch_to_global")
    ops = {e.key for e in prof.key_averages()}
    assert "aten::_scaled_dot_product_flash_attention_for_cpu" in ops
    assert "aten::_scaled_dot_product_attention_math" not in ops and "aten::bmm" not in ops
