"""Analyses: the pieces on hand-made inputs, and run_analyses end to end on a tiny study."""
import dataclasses
import json
import math

import numpy as np
import pytest
import torch

from bilateral import analysis, cam, models, stages
from bilateral import config as C


def tiny(tmp, **kw):
    base = dict(experiment="t", out_dir=str(tmp), dataset="synthetic", synthetic_size=300,
                width=0.0625, epochs=1, batch_size=64, progress=False, device="cpu",
                conditions=["A", "B"], threads=1)  # tiny ops: more threads only contend
    return C.from_dict({**base, **kw})


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    threads = torch.get_num_threads()  # run_stage and run_analyses apply cfg.threads
    cfg = tiny(tmp_path_factory.mktemp("analysis"))
    for cond in ("A", "B"):
        c = dataclasses.replace(cfg, condition=cond)
        for side in ("left", "right"):
            stages.run_stage("hemisphere", dataclasses.replace(c, side=side), 0, log=lambda m: None)
        stages.run_stage("bilateral", c, 0, log=lambda m: None)
    stages.run_stage("bilateral_unspecialised", cfg, 0, log=lambda m: None)
    yield cfg
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def analysed(study):
    lines = []
    res = analysis.run_analyses(study, 0, show=False, log=lines.append, cam_images=40,
                                cam_per_scenario=2, probe_iters=50)
    return study, res, lines


def test_run_analyses_writes_metrics_and_figures(analysed):
    cfg, res, lines = analysed
    assert len(lines) == 2 and all(line.startswith("[analysis") for line in lines)
    for cond in ("A", "B"):
        folder = analysis.out_dir(cfg, cond, 0)
        m = json.loads((folder / "metrics.json").read_text())
        assert all(isinstance(v, float) and math.isfinite(v) for v in m.values())
        assert {k: v for k, v in res.items() if k.startswith(f"{cond}/")} == {
            f"{cond}/{k}": v for k, v in m.items()}
        expected = {"cam.area.left_hemisphere.mean", "cam.area.right_hemisphere.std",
                    "cam.area.bilateral_both.median", "cam.area.left_minus_right.mean",
                    "cam.n_images", "similarity.all.median_left", "similarity.all.median_right",
                    "similarity.all.median_bilateral",
                    "attribution.bilateral.fine.left_share.mean",
                    "attribution.bilateral.coarse.right_share.mean",
                    "probe.left.fine", "probe.right.fine", "probe.left.coarse", "probe.right.coarse",
                    "probe.differential_specialisation", "probe.n_train", "wall_s",
                    *[f"scenario.{s}.n_images" for s in analysis.SCENARIOS]}
        assert expected <= set(m), expected - set(m)
        assert sum(m[f"scenario.{s}.n_images"] for s in analysis.SCENARIOS) == 75  # 300 // 4
        assert m["cam.n_images"] == 40
        for k in ("probe.left.fine", "probe.right.coarse"):
            assert 0 <= m[k] <= 1
        for f in ("scenarios.csv", "cam_localisation.csv", "cam_localisation.png",
                  "gradcam_overview.png", "similarity_joint.png", "similarity_medians.csv",
                  "attribution.csv", "attribution.png", "probes.csv"):
            assert (folder / f).stat().st_size > 0, f
        assert list((folder / "gradcam").glob("L*-F*.png"))
    m = json.loads((analysis.out_dir(cfg, "A", 0) / "metrics.json").read_text())
    assert "attribution.bilateral_unspecialised.fine.left_share.mean" in m  # only A has one
    assert "probe_unspecialised.differential_specialisation" in m
    mb = json.loads((analysis.out_dir(cfg, "B", 0) / "metrics.json").read_text())
    assert not any(k.startswith("attribution.bilateral_unspecialised") for k in mb)


def test_missing_runs_are_skipped(study):
    lines = []
    cfg = dataclasses.replace(study, conditions=["C"])
    assert analysis.run_analyses(cfg, 0, show=False, log=lines.append) == {}
    assert "skipped" in lines[0]


def test_compare_tabulates_seeds(analysed):
    cfg, _, _ = analysed
    t = analysis.compare(cfg)
    assert t.loc["probe.differential_specialisation", ("count", "A")] == 1


def _models(cfg):
    hier = stages.load_splits(cfg)[0].hierarchy
    left = stages.load_run_model("hemisphere", dataclasses.replace(cfg, side="left"), 0, hier)
    right = stages.load_run_model("hemisphere", dataclasses.replace(cfg, side="right"), 0, hier)
    bil = stages.load_run_model("bilateral", cfg, 0, hier)
    return left, right, bil


def test_gradcam_maps_have_image_shape_and_unit_range(study):
    left, right, bil = _models(study)
    test = stages.load_splits(study)[2]
    idx = torch.arange(6)
    x = analysis._normalised(test, idx, "cpu")
    out = analysis._collect(analysis._bilateral_outputs(bil, left.heads["fine"], right.heads["coarse"]),
                            analysis._loader(analysis._subset(test, idx), "cpu", 64), "cpu", False)
    maps = analysis.cam_maps(left, right, bil, x, out, torch.arange(6), batch_size=4)
    assert set(maps) == set(analysis.CAM_KINDS)
    for k, m in maps.items():
        assert m.shape == (6, 32, 32), k
        assert m.min() >= 0 and m.max() <= 1 + 1e-6, k
    # the frozen hemispheres stay frozen and collect no gradients; the rest is restored
    assert all(not p.requires_grad and p.grad is None for p in bil.left.parameters())
    assert all(p.requires_grad for p in bil.heads.parameters())
    assert all(p.requires_grad for p in left.parameters())


def test_outcomes_agree_with_the_outcomes_module(analysed):
    outcomes = pytest.importorskip("bilateral.outcomes")
    cfg, _, _ = analysed
    preds = outcomes.predictions(dataclasses.replace(cfg, condition="A"), 0)
    idx = analysis.scenario_index(preds)
    m = json.loads((analysis.out_dir(cfg, "A", 0) / "metrics.json").read_text())
    counts = torch.bincount(idx, minlength=16)
    assert [m[f"scenario.{s}.n_images"] for s in analysis.SCENARIOS] == counts.float().tolist()


def test_localisation_measure():
    one = np.zeros((32, 32), np.float32)
    one[5, 7] = 1.0
    uniform = np.ones((32, 32), np.float32)
    half = np.zeros((32, 32), np.float32)
    half[:, :16] = 0.8
    a = cam.localisation(np.stack([one, uniform, half, np.zeros((32, 32))]))
    assert a[0] == pytest.approx(1 / 1024) and a[1] == 1.0 and a[2] == 0.5
    assert np.isnan(a[3])


def test_head_attribution_shares():
    torch.manual_seed(0)
    feats = torch.rand(50, 10)
    w = torch.randn(3, 10)
    share = analysis.head_attribution(w, feats, n_left=6)
    assert ((share >= 0) & (share <= 1)).all()
    w[:, 6:] = 0  # the right half of the head's weights zeroed: nothing comes from the right
    assert torch.allclose(analysis.head_attribution(w, feats, n_left=6), torch.ones(50))


def test_head_attribution_on_a_bilateral_model_with_zeroed_right_weights(study):
    _, _, bil = _models(study)
    test = stages.load_splits(study)[2]
    n_left = bil.left.out_features
    with torch.no_grad():
        bil.heads["coarse"][-1].weight[:, n_left:] = 0
    out = analysis._collect(analysis._bilateral_outputs(bil), analysis._loader(test, "cpu", 64),
                            "cpu", False)
    feats = torch.cat([out["left_feat"], out["right_feat"]], 1)
    left = analysis.head_attribution(bil.heads["coarse"][-1].weight, feats, n_left, out["coarse"].argmax(1))
    ok = torch.isfinite(left)
    assert ok.float().mean() > 0.9 and torch.allclose(left[ok], torch.ones(int(ok.sum())))
    fine = analysis.head_attribution(bil.heads["fine"][-1].weight, feats, n_left, out["fine"].argmax(1))
    fine = fine[torch.isfinite(fine)]
    assert 0 < fine.mean() < 1


def test_probe_on_one_hot_and_random_features():
    g = torch.Generator().manual_seed(0)
    y_tr, y_te = torch.randint(0, 10, (500,), generator=g), torch.randint(0, 10, (500,), generator=g)
    onehot = lambda y: torch.nn.functional.one_hot(y, 10).float()  # noqa: E731
    p = analysis.fit_probe(onehot(y_tr), y_tr, 10, iters=100)
    assert p.accuracy(onehot(y_te), y_te) > 0.99
    r = analysis.fit_probe(torch.randn(500, 20, generator=g), y_tr, 10, iters=100)
    assert abs(r.accuracy(torch.randn(500, 20, generator=g), y_te) - 0.1) < 0.06


def test_differential_specialisation_sign():
    spec = {("left", "fine"): 0.7, ("right", "fine"): 0.5, ("left", "coarse"): 0.6, ("right", "coarse"): 0.8}
    d = analysis.differential_specialisation(spec)
    assert d["gap_fine"] == pytest.approx(0.2) and d["gap_coarse"] == pytest.approx(0.2)
    assert d["differential_specialisation"] == pytest.approx(0.2)
    swapped = {("left", "fine"): 0.5, ("right", "fine"): 0.7, ("left", "coarse"): 0.8, ("right", "coarse"): 0.6}
    assert analysis.differential_specialisation(swapped)["differential_specialisation"] == pytest.approx(-0.2)
    same = {k: 0.6 for k in spec}
    assert analysis.differential_specialisation(same)["differential_specialisation"] == 0


def test_scenarios_and_pairs():
    t, f = torch.tensor([True]), torch.tensor([False])
    idx = analysis.scenario_index({"left": t, "right": t, "bilateral_fine": t, "bilateral_coarse": t})
    assert analysis.SCENARIOS[int(idx)] == "L1R1-F1C1"
    idx = analysis.scenario_index({"left": t, "right": f, "bilateral_fine": f, "bilateral_coarse": t})
    assert analysis.SCENARIOS[int(idx)] == "L1R0-F0C1"
    labels = torch.tensor([0, 1, 0, 0, 1, 2])
    i, j, total = analysis.same_label_pairs(labels)
    assert total == 4 and (labels[i] == labels[j]).all() and (i < j).all()
    i, j, total = analysis.same_label_pairs(labels, torch.tensor([0, 2, 4]))
    assert total == 1 and (i.item(), j.item()) == (0, 2)
    i, j, total = analysis.same_label_pairs(labels, max_pairs=2, generator=torch.Generator().manual_seed(0))
    assert total == 4 and len(i) == 2
    f = torch.tensor([[1.0, 0], [2.0, 0], [0, 1.0]])
    assert torch.allclose(analysis.pair_cosine(f, torch.tensor([0, 0]), torch.tensor([1, 2])),
                          torch.tensor([1.0, 0.0]))
