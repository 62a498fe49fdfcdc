"""The notebooks' measurements (tgdp_core.analysis) and plot helpers against direct computations."""
import math

import nbformat
import numpy as np
import pytest
import torch
from conftest import SyntheticAV, tiny_batch
from nbformat.v4 import new_code_cell, new_notebook, new_output
from scipy.stats import pearsonr, rankdata

import tgdp_core as tg
from tgdp_core import analysis, experiments, viz
from tgdp_core.masking import num_kept
from tgdp_core.trainer import make_teacher


# ---------------------------------------------------------------------- scale and runs
def test_scale_comes_from_the_environment_and_keeps_tests_off_the_readme_figures(monkeypatch, tmp_path):
    monkeypatch.setenv("TGDP_NOTEBOOK_ROOT", str(tmp_path))
    monkeypatch.delenv("TGDP_NOTEBOOK_SCALE", raising=False)
    full = analysis.notebook_scale()
    assert full.name == "full" and full.figure_dir == tmp_path / "docs" / "figures"
    monkeypatch.setenv("TGDP_NOTEBOOK_SCALE", "smoke")
    smoke = analysis.notebook_scale()
    assert smoke.name == "smoke" and smoke.train["steps"] < 10 and smoke.data_clips is not None
    assert smoke.runs_dir in smoke.figure_dir.parents
    with pytest.raises(ValueError, match="unknown notebook scale 'huge'"):
        analysis.notebook_scale("huge")


def test_run_key_follows_the_config_and_the_data(tmp_path, tiny_cfg):
    (tmp_path / "train.json").write_text("{}")
    (tmp_path / "avdigits.json").write_text('{"version": "1"}')
    tiny_cfg.data.train_manifest = str(tmp_path / "train.json")
    key = analysis.run_key(tiny_cfg)
    assert analysis.run_key(tg.Config.from_dict(tiny_cfg.to_dict())) == key
    (tmp_path / "avdigits.json").write_text('{"version": "2"}')  # regenerated set
    assert analysis.run_key(tiny_cfg) != key
    tiny_cfg.train.steps += 1
    assert len({key, analysis.run_key(tiny_cfg)}) == 2


def test_step_zero_teacher_is_the_run_start_and_guide_encoder_reads_the_teacher(tmp_path, tiny_cfg):
    # momentum 1: the teacher never moves, so after a step it still holds the initial weights
    cfg = tg.Config.preset("tiny", teacher={"momentum_start": 1.0, "momentum_end": 1.0},
                           train={"steps": 1, "batch_size": 4, "warmup_steps": 1}, data={"workers": 0})
    result = tg.train(cfg, tmp_path, dataset=SyntheticAV(cfg))
    start = analysis.initial_model(cfg).encoder.state_dict()
    teacher = analysis.guide_encoder(result.checkpoint).state_dict()
    student = tg.load_model(result.checkpoint).encoder.state_dict()
    assert all(torch.equal(start[k], teacher[k]) for k in start)
    assert not all(torch.equal(start[k], student[k]) for k in start)
    assert analysis.snapshots(tmp_path) == [(1, tmp_path / "step0000001.pt")]


# ---------------------------------------------------------------------- selection and relevance
def test_kept_relevant_share_of_a_guided_mask_is_a_direct_count():
    g = torch.Generator().manual_seed(0)
    priority = torch.rand(5, 36, generator=g)
    relevant = torch.rand(5, 36, generator=g) < 0.2
    masks = analysis.select_tokens(priority, 0.5)
    keep = num_kept(36, 0.5)
    top = priority.topk(keep, dim=1).indices
    direct = torch.tensor([relevant[b, top[b]].sum().item() / keep for b in range(5)])
    assert torch.allclose(analysis.kept_relevant_share(masks["guided"], relevant), direct)
    for mask in masks.values():
        assert (mask.sum(1) == 36 - keep).all()
    assert torch.equal(analysis.select_tokens(priority, 0.5)["random"], masks["random"])  # seeded


def _pairs(audio_relevant, visual_relevant):
    P = audio_relevant.shape[0]
    return analysis.Pairs(clips=list(range(P)), frame=[0] * P, fbank=torch.zeros(P, 1, 1), frames=torch.zeros(P, 1),
                          images=np.zeros((P, 1, 1, 3), np.uint8), audio_relevant=audio_relevant,
                          visual_relevant=visual_relevant, start_s=[0.0] * P)


def test_relevance_report_a_teacher_that_ranks_the_relevant_tokens_first():
    g = torch.Generator().manual_seed(1)
    relevant_v = torch.zeros(64, 36, dtype=torch.bool)
    relevant_v[:, :6] = True  # 6 of 36 tokens hold the digit
    relevant_a = torch.rand(64, 32, generator=g) < 0.4
    priority = (relevant_a.float() + 0.01 * torch.rand(64, 32, generator=g),
                relevant_v.float() + 0.01 * torch.rand(64, 36, generator=g))
    report = analysis.relevance_report(priority, _pairs(relevant_a, relevant_v), ratio=0.75)
    kept = num_kept(36, 0.75)  # 9 kept, 6 of them the digit
    assert report["visual"]["guided"] == pytest.approx(6 / kept)
    assert report["visual"]["chance"] == pytest.approx(6 / 36)
    assert abs(report["visual"]["random"] - 6 / 36) < 0.05  # 64 x 9 draws
    assert report["audio"]["guided"] > report["audio"]["random"]
    assert set(report["audio"]) == {"guided", "random", "probabilistic", "chance"}


# ---------------------------------------------------------------------- embedding geometry
def test_modality_gap_and_alignment():
    g = torch.Generator().manual_seed(0)
    a = torch.nn.functional.normalize(torch.randn(50, 16, generator=g), dim=-1)
    same = analysis.embedding_stats(a, a)
    assert same["gap"] == pytest.approx(0, abs=1e-6) and same["paired cos"] == pytest.approx(1)
    v = torch.nn.functional.normalize(torch.randn(50, 16, generator=g), dim=-1)
    stats = analysis.embedding_stats(3 * a, v)  # scale does not matter: embeddings are normalised
    sim = (a @ v.T).numpy()
    off = ~np.eye(50, dtype=bool)
    assert stats["gap"] == pytest.approx(np.linalg.norm(a.mean(0).numpy() - v.mean(0).numpy()), rel=1e-5)
    assert stats["paired cos"] == pytest.approx(sim.diagonal().mean(), abs=1e-6)
    assert stats["unpaired cos"] == pytest.approx(sim[off].mean(), abs=1e-6)
    assert stats["margin"] == pytest.approx(stats["paired cos"] - stats["unpaired cos"])
    # opposite clouds: the centroids are as far apart as they can be for these points
    assert analysis.modality_gap(a + 5, -(a + 5)) == pytest.approx(2, abs=1e-2)


def test_correlations_against_scipy_and_ranks():
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(4, 30, generator=g), torch.rand(4, 30, generator=g)
    y[0] = x[0] ** 3  # monotone: Spearman 1
    out = analysis.correlations(x, y)
    pearson = np.mean([np.corrcoef(a, b)[0, 1] for a, b in zip(x.numpy(), y.numpy())])
    spearman = np.mean([pearsonr(rankdata(a), rankdata(b)).statistic for a, b in zip(x.numpy(), y.numpy())])
    assert out["pearson"] == pytest.approx(pearson, rel=1e-6) and out["spearman"] == pytest.approx(spearman, rel=1e-6)
    assert analysis.correlations(x[:1], y[:1])["spearman"] == pytest.approx(1)
    constant = torch.ones(1, 30)  # no correlation defined: the row is left out
    assert analysis.correlations(torch.cat([x[:1], constant]), torch.cat([y[:1], y[1:2]]))["spearman"] == pytest.approx(1)
    assert math.isnan(analysis.correlations(constant, y[:1])["pearson"])


# ---------------------------------------------------------------------- attributions
def test_patch_scores_follow_the_models_token_order(tiny_cfg):
    m, p = tiny_cfg.model, tiny_cfg.model.patch_size
    rows, cols = m.audio_grid
    t, f = torch.meshgrid(torch.arange(m.audio_frames), torch.arange(m.mel_bins), indexing="ij")
    audio = ((f // p) * cols + t // p).float()[None]  # element (t, f) holds its token id, frequency-major
    g = m.visual_grid[1]
    y, x = torch.meshgrid(torch.arange(m.image_size), torch.arange(m.image_size), indexing="ij")
    visual = ((y // p) * g + x // p).float().expand(1, 3, -1, -1)
    sa, sv = analysis.patch_scores(audio, visual, p, reduce="mean")
    assert torch.equal(sa[0], torch.arange(rows * cols).float()) and torch.equal(sv[0], torch.arange(g * g).float())


def test_attributions_integrated_gradients_add_up_and_occlusion_is_a_patch_drop(tiny_cfg):
    model = tg.build_model(tiny_cfg).eval()
    fbank, frames = tiny_batch(tiny_cfg, batch=2, generator=torch.Generator().manual_seed(0))
    f = analysis.pair_similarity(model)
    sa, sv = analysis.similarity_attributions(model, fbank, frames, "integrated_gradients", steps=64)
    assert sa.shape == (2, tiny_cfg.model.num_audio_patches) and sv.shape == (2, tiny_cfg.model.num_visual_patches)
    with torch.no_grad():
        gain = f(fbank, frames) - f(torch.zeros_like(fbank), torch.zeros_like(frames))
    assert torch.allclose(sa.sum(1) + sv.sum(1), gain, atol=2e-2 * gain.abs().max().item())  # completeness
    oa, ov = analysis.similarity_attributions(model, fbank, frames, "occlusion")
    p, g = tiny_cfg.model.patch_size, tiny_cfg.model.visual_grid[1]
    occluded = frames.clone()
    occluded[:, :, p:2 * p, 2 * p:3 * p] = 0  # visual token (row 1, column 2)
    cut = fbank.clone()
    cut[:, 3 * p:4 * p, p:2 * p] = 0  # audio token (frequency row 1, time column 3)
    with torch.no_grad():
        assert torch.allclose(ov[:, g + 2], f(fbank, frames) - f(fbank, occluded), atol=1e-5)
        assert torch.allclose(oa[:, tiny_cfg.model.audio_grid[1] + 3], f(fbank, frames) - f(cut, frames), atol=1e-5)
    with pytest.raises(ValueError, match="unknown attribution method"):
        analysis.similarity_attributions(model, fbank, frames, "saliency")


# ---------------------------------------------------------------------- tables, files, plots
def test_step_loss_table_adds_up_to_the_models_loss(tiny_cfg):
    model = tg.build_model(tiny_cfg)
    fbank, frames = tiny_batch(tiny_cfg)
    teacher = make_teacher(model)
    out = model(fbank, frames, teacher(fbank, frames, "patch_to_global"))
    table = analysis.step_loss_table(out.parts, tiny_cfg)
    assert f"**{out.loss.item():.4f}**" in table and "| distill |" in table


def test_read_ablation_csv_reads_what_ablate_writes(tmp_path):
    summary = {"TG-DP: contrastive 0.50, guided": {"A->V R@1": 1.5, "A->V R@1 sd": 0.25},
               "random instead of guided": {"A->V R@1": 0.5, "A->V R@1 sd": 0.0}}
    experiments.write_csv(tmp_path / "ablation.csv", summary)
    assert analysis.read_ablation_csv(tmp_path / "ablation.csv") == summary


def test_strip_widget_outputs_keeps_figures_and_drops_widgets(tmp_path):
    nb = new_notebook(cells=[new_code_cell("x", outputs=[
        new_output("display_data", data={analysis.WIDGET_VIEW: {"model_id": "1"}, "text/plain": "0%|"}),
        new_output("display_data", data={"image/png": "iVBORw0KGgo=", "text/plain": "<Figure>"})])])
    nb.metadata["widgets"] = {"application/vnd.jupyter.widget-state+json": {"state": {}}}
    path = tmp_path / "n.ipynb"
    nbformat.write(nb, path)
    analysis.strip_widget_outputs(path)
    saved = nbformat.read(path, as_version=4)
    assert "widgets" not in saved.metadata
    assert [list(o.data) for o in saved.cells[0].outputs] == [["image/png", "text/plain"]]


def test_live_losses_collects_records_and_redraws(tmp_path):
    live = viz.LiveLosses(keys=("loss", "rec"), every=2)
    for step in range(1, 5):
        live({"step": step, "loss": 1.0 / step, "rec": 2.0 / step})
    assert len(live.records) == 4 and len(live.axes[0].lines) == 1
    live.show([{"step": 1, "loss": 1.0, "rec": 2.0}])
    assert live.axes[1].lines[0].get_xdata().tolist() == [1]
    path = viz.save_figure(live.fig, tmp_path, "losses")
    assert path.read_bytes()[:4] == b"\x89PNG"
