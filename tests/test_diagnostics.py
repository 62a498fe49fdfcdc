"""Guidance diagnostics during training (issue 14): what metrics.jsonl logs is what it claims."""
import json

import matplotlib
import pytest
import torch
from sklearn.metrics import roc_auc_score

import tgdp_core as tg
from tgdp_core import analysis, avdigits, diagnostics, viz
from tgdp_core.avdigits import generate
from tgdp_core.dataset import AVDataset
from tgdp_core.masking import num_kept, random_masking

from conftest import SyntheticAV


@pytest.fixture(scope="module")
def avd(tmp_path_factory):
    return generate(tmp_path_factory.mktemp("avd"), n_train=6, n_test=2, workers=1)


def probe_cfg(root, **train):
    data = {"train_manifest": str(root / "train.json"), "test_manifest": str(root / "test.json"),
            "label_csv": str(root / "labels.csv"), "workers": 0}
    over = dict(steps=3, batch_size=4, log_every=2, warmup_steps=1, probe_every=2)
    over.update(train)
    return tg.Config.preset("tiny", data=data, train=over, teacher={"guidance_warmup_fraction": 0.0})


def test_logged_probe_values_equal_a_direct_computation(avd, tmp_path):
    cfg = probe_cfg(avd)
    result = tg.train(cfg, tmp_path)
    probed = [r for r in result.history if "probe/visual/chance" in r]
    assert [r["step"] for r in probed] == [2, 3]  # every probe_every-th step and the last
    logged = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])
    assert logged == result.history[-1]

    # the same measurement by hand, on the teacher saved after the last step
    teacher = analysis.guide_encoder(result.checkpoint)
    train_set = AVDataset(cfg.data.train_manifest, cfg, train=False)
    pairs = analysis.load_pairs(train_set, avdigits.load_relevance(avd, "train"), range(len(train_set)))
    assert len(pairs.clips) == 6 * cfg.data.frames_per_clip  # fewer clips than PROBE_CLIPS: all of them
    for direction in ("patch_to_global", "global_to_patch"):
        guide = teacher.guide(pairs.fbank, pairs.frames, direction)
        for modality, priority, relevant in (("audio", guide.priority_a, pairs.audio_relevant),
                                             ("visual", guide.priority_v, pairs.visual_relevant)):
            keep = num_kept(priority.shape[1], diagnostics.PROBE_RATIO)
            top = priority.topk(keep, dim=1).indices
            guided = relevant.gather(1, top).float().sum(1) / keep
            _, mask, _ = random_masking(priority.unsqueeze(-1), diagnostics.PROBE_RATIO,
                                        torch.Generator().manual_seed(diagnostics.PROBE_SEED))
            random_share = ((mask == 0) & relevant).float().sum(1) / keep
            rows = [i for i in range(len(relevant)) if 0 < relevant[i].sum() < relevant.shape[1]]
            auc = sum(roc_auc_score(relevant[i].numpy(), priority[i].numpy()) for i in rows) / len(rows)
            key = f"probe/{modality}/{direction}"
            assert logged[f"{key}/guided"] == pytest.approx(guided.mean().item(), abs=1e-6)
            assert logged[f"{key}/random"] == pytest.approx(random_share.mean().item(), abs=1e-6)
            assert logged[f"{key}/auc"] == pytest.approx(auc, abs=1e-6)
            assert logged[f"probe/{modality}/chance"] == pytest.approx(relevant.float().mean().item())

    matplotlib.use("Agg")
    fig = viz.plot_guidance_probe(viz.read_metrics(tmp_path))
    assert len(fig.axes) == 4 and len(fig.axes[0].lines) == 5  # top-k and random per direction, chance


def test_the_probe_leaves_training_unchanged(avd, tmp_path):
    runs = {every: tg.train(probe_cfg(avd, probe_every=every, log_every=1), tmp_path / f"every{every}")
            for every in (0, 1)}
    assert not any("probe/visual/chance" in r for r in runs[0].history)
    assert all("probe/visual/chance" in r for r in runs[1].history)
    for a, b in zip(runs[0].history, runs[1].history):
        assert all(a[k] == b[k] for k in ("loss", "rec", "contrastive", "distill", "grad_norm"))
    a, b = tg.load_model(runs[0].checkpoint), tg.load_model(runs[1].checkpoint)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_no_probe_without_relevance_masks(avd, tmp_path):
    cfg = probe_cfg(avd, probe_every=1)
    (tmp_path / "train.json").write_text((avd / "train.json").read_text())  # the manifest, not its ground truth
    cfg.data.train_manifest = str(tmp_path / "train.json")
    assert diagnostics.probe_for(cfg) is None
    assert diagnostics.probe_for(probe_cfg(avd, probe_every=0)) is None
    plain = tg.Config.preset("tiny", train=dict(steps=2, batch_size=4, log_every=1, probe_every=1), data={"workers": 0})
    history = tg.train(plain, tmp_path / "run", dataset=SyntheticAV(plain)).history
    assert history and not any(k.startswith("probe/") for r in history for k in r)


def test_priority_auc_is_the_mean_roc_auc_of_rows_with_both_classes():
    g = torch.Generator().manual_seed(0)
    priority = torch.rand(6, 20, generator=g)
    priority[0, :4] = priority[0, 4]  # ties count half
    relevant = torch.rand(6, 20, generator=g) < 0.3
    relevant[5] = False  # one class only: left out
    want = sum(roc_auc_score(relevant[i].numpy(), priority[i].numpy()) for i in range(5)) / 5
    assert analysis.priority_auc(priority, relevant) == pytest.approx(want, abs=1e-6)
    assert analysis.priority_auc(relevant.float(), relevant) == 1.0
    assert analysis.priority_auc(priority[5:], relevant[5:]) != analysis.priority_auc(priority[5:], relevant[5:])  # NaN
