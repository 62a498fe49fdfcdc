"""Probes on frozen features: the kNN vote, the probe command, the feature cache (issue 15)."""
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.metrics import average_precision_score
from sklearn.neighbors import KNeighborsClassifier

import tgdp_core as tg
from tgdp_core import checkpoint as ckpt
from tgdp_core import evaluate as ev
from tgdp_core import probe
from tgdp_core.dataset import AVDataset

from test_dataset import make_clips


# ---------------------------------------------------------------------- the kNN probe
def direct_knn_scores(train_x, votes, test_x, k, temperature):
    """The weighted vote written out, one test clip at a time."""
    train = F.normalize(train_x, dim=1)
    out = []
    for q in F.normalize(test_x, dim=1):
        sim = train @ q
        nearest = sorted(range(len(sim)), key=lambda j: -sim[j].item())[:k]
        out.append(sum(torch.exp(sim[j] / temperature) * votes[j] for j in nearest))
    return torch.stack(out)


def test_knn_single_label_matches_a_direct_vote_and_scikit_learn():
    g = torch.Generator().manual_seed(0)
    centroids = torch.randn(5, 16, generator=g)
    train_y, test_y = torch.randint(0, 5, (300,), generator=g), torch.randint(0, 5, (80,), generator=g)
    train_x = centroids[train_y] + 2.0 * torch.randn(300, 16, generator=g)
    test_x = centroids[test_y] + 2.0 * torch.randn(80, 16, generator=g)
    got = ev.knn_probe(train_x, train_y, test_x, test_y, multilabel=False)["top1"]
    scores = direct_knn_scores(train_x, F.one_hot(train_y, 5).float(), test_x, 20, 0.07)
    assert got == pytest.approx(100 * (scores.argmax(1) == test_y).float().mean().item())
    knn = KNeighborsClassifier(n_neighbors=20, metric="cosine", weights=lambda d: np.exp((1 - d) / 0.07))
    knn.fit(train_x.numpy(), train_y.numpy())
    assert got == pytest.approx(100 * (knn.predict(test_x.numpy()) == test_y.numpy()).mean())
    assert 50 < got < 95  # informative features, not a trivial set (chance 20)
    with pytest.raises(ValueError, match="k >= 1"):
        ev.knn_probe(train_x, train_y, test_x, test_y, multilabel=False, k=0)


def test_knn_multi_label_scores_are_the_weighted_votes():
    g = torch.Generator().manual_seed(1)
    train_x, test_x = torch.randn(200, 12, generator=g), torch.randn(60, 12, generator=g)
    directions = torch.randn(12, 4, generator=g)
    train_y, test_y = (train_x @ directions > 0.5).long(), (test_x @ directions > 0.5).long()
    got = ev.knn_probe(train_x, train_y, test_x, test_y, multilabel=True, k=7, temperature=0.1)["mAP"]
    scores = direct_knn_scores(train_x, train_y.float(), test_x, 7, 0.1)
    assert got == pytest.approx(100 * average_precision_score(test_y.numpy(), scores.numpy(), average="macro"))


# ---------------------------------------------------------------------- the probe on a checkpoint
@pytest.fixture
def probe_setup(tmp_path):
    cfg = tg.Config.preset("tiny", data={"workers": 0})
    train, test = make_clips(tmp_path / "train", n=6), make_clips(tmp_path / "test", n=4)
    model = tg.build_model(cfg).eval()
    path = ckpt.save_checkpoint(ckpt.model_payload(model), tmp_path / "model.pt")
    return path, model, cfg, train, test


def direct_features(model, cfg, manifest):
    """Every clip's K pairs through encode_audio / encode_visual, without the probe's code."""
    data = AVDataset(manifest, cfg, train=False)
    items = [data[i] for i in range(len(data))]
    with torch.no_grad():
        audio = torch.stack([model.encode_audio(item["fbank"]) for item in items])  # (N, K, D)
        visual = torch.stack([model.encode_visual(item["frames"]) for item in items])
    return audio, visual, torch.stack([item["labels"] for item in items]).argmax(1)


def test_probe_results_equal_the_probes_on_directly_computed_features(probe_setup, tmp_path):
    path, model, cfg, train, test = probe_setup
    result = probe.run_probes(path, train, test, kinds=("knn", "linear", "attention"), features=("audio", "both"),
                              options={"knn": {"k": 3}, "linear": {"epochs": 3}, "attention": {"epochs": 2}},
                              progress=False)
    assert result["task"] == "single-label (top-1)" and result["train clips"] == 6 and result["test clips"] == 4
    ta, tv, ty = direct_features(model, cfg, train)
    sa, sv, sy = direct_features(model, cfg, test)
    expected = {
        "knn audio": ev.knn_probe(ta.mean(1), ty, sa.mean(1), sy, multilabel=False, k=3),
        "knn both": ev.knn_probe(torch.cat([ta.mean(1), tv.mean(1)], 1), ty, torch.cat([sa.mean(1), sv.mean(1)], 1),
                                 sy, multilabel=False, k=3),
        "linear audio": ev.linear_probe(ta.mean(1), ty, sa.mean(1), sy, multilabel=False, epochs=3),
        "attention both": ev.attention_probe(torch.cat([ta, tv], 1), ty, torch.cat([sa, sv], 1), sy,
                                             multilabel=False, epochs=2),
    }
    for row, metrics in expected.items():
        assert result["rows"][row] == pytest.approx(metrics, abs=1e-9), row
    assert len(result["rows"]) == 6
    assert len(list((tmp_path / "train" / ".tgdp_cache" / "probe_features").glob("*.safetensors"))) == 1


def test_frozen_features_are_computed_once_per_checkpoint(probe_setup, tmp_path, monkeypatch):
    path, model, cfg, train, test = probe_setup
    calls = []
    real = ev.embed_clips
    monkeypatch.setattr(ev, "embed_clips", lambda *a, **k: calls.append(1) or real(*a, **k))
    first = probe.run_probes(path, train, test, kinds=("knn",), progress=False)
    assert len(calls) == 2  # train and test
    second = probe.run_probes(path, train, test, kinds=("knn",), features=("visual",), progress=False)
    assert len(calls) == 2  # another probe setting reads the same cached features
    assert probe.run_probes(path, train, test, kinds=("knn",), progress=False) == first
    probe.run_probes(path, train, test, kinds=("knn",), cache=False, progress=False)
    assert len(calls) == 4
    # a retrained checkpoint at the same path gets fresh features
    other = tg.build_model(cfg)
    ckpt.save_checkpoint(ckpt.model_payload(other), path)
    probe.run_probes(path, train, test, kinds=("knn",), progress=False)
    assert len(calls) == 6
    assert second["rows"].keys() == {"knn visual"}


def test_probe_targets_and_inputs():
    single = torch.eye(3)[torch.tensor([0, 2, 1])]
    multi = torch.tensor([[1.0, 1.0, 0.0], [0.0, 1.0, 0.0]])
    y, _, multilabel = probe.probe_targets(single, single)
    assert not multilabel and y.tolist() == [0, 2, 1]
    _, y, multilabel = probe.probe_targets(single, multi)
    assert multilabel and torch.equal(y, multi)
    emb = ev.ClipEmbeddings(torch.randn(2, 4, 8), torch.randn(2, 4, 8), single[:2], torch.zeros(2, 4))
    assert probe.probe_inputs(emb, "attention", "both").shape == (2, 8, 8)
    assert probe.probe_inputs(emb, "knn", "both").shape == (2, 16)
    assert torch.equal(probe.probe_inputs(emb, "linear", "visual"), emb.visual.mean(1))


def test_labels_missing_from_the_label_csv_are_a_clear_error(probe_setup, tmp_path):
    path, _, _, train, test = probe_setup
    data = json.loads(test.read_text())
    data["data"][1]["labels"] = "c1,c7"
    bad = test.with_name("bad.json")
    bad.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=r"bad.json: 1 label\(s\) not in the label CSV .*train/labels.csv: "
                                         r"'c7' \(clip clip1\); add them to the CSV"):
        probe.run_probes(path, train, bad, progress=False)
    with pytest.raises(ValueError, match="a probe needs the clips' labels.*--labels"):
        probe.run_probes(path, train, test, label_csv=tmp_path / "none.csv", progress=False)


def test_probe_command_prints_a_table_and_writes_json(probe_setup, tmp_path):
    path, _, _, train, test = probe_setup
    out = tmp_path / "probe.json"
    result = subprocess.run([sys.executable, "-m", "tgdp_core", "probe", str(path), str(train), str(test),
                             "--kind", "knn", "linear", "--features", "visual", "--epochs", "2", "--k", "3",
                             "--out", str(out), "--device", "cpu"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "| knn visual |" in result.stdout and "| linear visual |" in result.stdout and "top1" in result.stdout
    saved = json.loads(out.read_text())
    assert saved["rows"].keys() == {"knn visual", "linear visual"} and 0 <= saved["rows"]["knn visual"]["top1"] <= 100
    assert saved["options"]["knn"] == {"k": 3, "temperature": 0.07} and saved["checkpoint"] == str(path)
