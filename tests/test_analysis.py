"""Analyses: the measures on hand-made inputs with known answers, the one-pass computations
against the per-model ones they replace, and run_analyses end to end on a tiny study."""
import dataclasses
import json
import math

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest
import torch

from bilateral import analysis, cam, data, figures, plan, results_md, train
from bilateral import config as C
from bilateral.analysis import measures as M


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
            plan.run_stage("hemisphere", dataclasses.replace(c, side=side), 0, log=lambda m: None)
        plan.run_stage("bilateral", c, 0, log=lambda m: None)
    plan.run_stage("bilateral_unspecialised", cfg, 0, log=lambda m: None)
    yield cfg
    torch.set_num_threads(threads)


CAPS = dict(cam_images=40, cam_per_scenario=2, probe_iters=50, plot_pairs=300)


@pytest.fixture(scope="module")
def analysed(study):
    lines = []
    res = analysis.run_analyses(study, 0, show=False, log=lines.append, **CAPS)
    return study, res, lines


@pytest.fixture(scope="module")
def loaded(study):
    return analysis.load(study, 0, "B", **CAPS)


# ------------------------------------------------------------------------------ end to end

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
                    "attribution.bilateral.fine.left_contrib.mean",
                    "attribution.bilateral.fine.right_contrib.mean",
                    "attribution.bilateral.fine.uncentred.left_share.mean",
                    "probe.left.fine", "probe.right.fine", "probe.left.coarse", "probe.right.coarse",
                    "probe.differential_specialisation", "probe.n_train", "wall_s",
                    "probe_eqdim.left.fine", "probe_eqdim.differential_specialisation",
                    *[f"scenario.{s}.n_images" for s in analysis.SCENARIOS]}
        assert expected <= set(m), expected - set(m)
        assert sum(m[f"scenario.{s}.n_images"] for s in analysis.SCENARIOS) == 75  # 300 // 4
        assert m["cam.n_images"] == 40
        for k in ("probe.left.fine", "probe.right.coarse", "probe_eqdim.left.coarse"):
            assert 0 <= m[k] <= 1
        for f in ("scenarios.csv", "cam_localisation.csv", "cam_localisation.png",
                  "gradcam_overview.png", "similarity_joint.png", "similarity_scenarios.png",
                  "similarity_medians.csv", "attribution.csv", "attribution.png", "probes.csv"):
            assert (folder / f).stat().st_size > 0, f
        assert list((folder / "gradcam").glob("L*-F*.png"))
    m = json.loads((analysis.out_dir(cfg, "A", 0) / "metrics.json").read_text())
    assert "attribution.bilateral_unspecialised.fine.left_share.mean" in m  # only A has one
    assert "probe_unspecialised.differential_specialisation" in m
    assert "probe_unspecialised_eqdim.differential_specialisation" in m
    mb = json.loads((analysis.out_dir(cfg, "B", 0) / "metrics.json").read_text())
    assert not any(k.startswith("attribution.bilateral_unspecialised") for k in mb)


def test_missing_runs_are_skipped(study):
    lines = []
    cfg = dataclasses.replace(study, conditions=["C"])
    assert analysis.run_analyses(cfg, 0, show=False, log=lines.append) == {}
    assert "skipped" in lines[0]
    assert analysis.ready(study, 0) == ["A", "B"]
    with pytest.raises(FileNotFoundError, match="resnet9-C-left.*missing; make it with"):
        analysis.load(study, 0, "C")


def test_analysis_parameters_are_checked_before_any_work(study):
    with pytest.raises(TypeError, match="cam_imgs.*allowed: cam_images"):
        analysis.load(study, 0, "A", cam_imgs=3)
    with pytest.raises(ValueError, match="max_pairs"):
        analysis.load(study, 0, "A", max_pairs=0)
    with pytest.raises(ValueError, match="cam_frac"):
        analysis.load(study, 0, "A", cam_frac=2)


def test_compare_tabulates_seeds(analysed):
    cfg, _, _ = analysed
    t = analysis.compare(cfg)
    assert t.loc["probe.differential_specialisation", ("count", "A")] == 1


# ------------------------------------------------------ one pass against the passes it replaces

def _models(cfg, cond="A"):
    cfg = dataclasses.replace(cfg, condition=cond)
    hier = data.load_splits(cfg)[0].hierarchy
    left = plan.load_run_model("hemisphere", dataclasses.replace(cfg, side="left"), 0, hier)
    right = plan.load_run_model("hemisphere", dataclasses.replace(cfg, side="right"), 0, hier)
    bil = plan.load_run_model("bilateral", cfg, 0, hier)
    return left, right, bil


def test_batched_gradcam_equals_the_library_kind_by_kind(study):
    """cam_maps (one forward, one backward per target, both hemispheres at once) against the
    grad-cam library's GradCAM called once per kind and hemisphere, as before."""
    left, right, bil = _models(study, "B")
    test = data.load_splits(study)[2]
    x = analysis.condition.normalised(test, torch.arange(10), "cpu")
    with torch.no_grad():
        lo, ro, bo = left(x), right(x), bil(x)
    pred = {"left": lo["fine"].argmax(1), "right": ro["coarse"].argmax(1),
            "fine": bo["fine"].argmax(1), "coarse": bo["coarse"].argmax(1)}
    maps = cam.cam_maps(bil, left.heads["fine"], right.heads["coarse"], x, pred, batch_size=4)
    assert set(maps) == set(cam.CAM_KINDS)
    ref = {"left_hemisphere": cam.gradcam(left, cam.target_layers(left.backbone), x, ["fine"],
                                          pred["left"][:, None], 4),
           "right_hemisphere": cam.gradcam(right, cam.target_layers(right.backbone), x, ["coarse"],
                                           pred["right"][:, None], 4)}
    targets = {"fine": (["fine"], pred["fine"][:, None]), "coarse": (["coarse"], pred["coarse"][:, None]),
               "both": (["fine", "coarse"], torch.stack([pred["fine"], pred["coarse"]], 1))}
    for t, (heads, cls) in targets.items():
        for side in ("left", "right"):
            ref[f"bilateral_{t}.{side}"] = cam.gradcam(bil, cam.target_layers(getattr(bil, side)), x,
                                                       heads, cls, 4)
        ref[f"bilateral_{t}"] = cam.combine(ref[f"bilateral_{t}.left"], ref[f"bilateral_{t}.right"])
    for k in cam.CAM_KINDS:
        assert maps[k].shape == (10, 32, 32), k
        assert maps[k].min() >= 0 and maps[k].max() <= 1 + 1e-6, k
        np.testing.assert_allclose(maps[k], ref[k], atol=1e-6, err_msg=k)
    # the frozen hemispheres stay frozen and collect no gradients; the rest is restored
    assert all(not p.requires_grad and p.grad is None for p in bil.left.parameters())
    assert all(p.requires_grad for p in bil.heads.parameters())
    assert all(p.requires_grad for p in left.parameters())
    assert not bil.training


def test_one_pass_outputs_equal_each_models_own_predictions(study, loaded):
    """The hemisphere models' logits computed on the bilateral model's frozen hemispheres equal
    the hemisphere models' own, and the train-sample features equal their backbones'."""
    c = loaded
    left, right, bil = _models(study, "B")
    dl = analysis.condition.loader(c.test_split, "cpu", 64)
    for model, key, head in ((left, "left_logits", "fine"), (right, "right_logits", "coarse")):
        own = train.predict(model, dl, "cpu", False)[0][head]
        assert torch.allclose(own, c.out[key], atol=1e-5)
        assert torch.equal(own.argmax(1), c.out[key].argmax(1))
    tr = analysis.condition.loader(analysis.condition.subset(c.train_split, c.train_idx), "cpu", 64)
    feats = train.predict(lambda x: {"f": left.backbone(x)}, tr, "cpu", False)[0]["f"]
    assert torch.allclose(feats, c.train_out["left_feat"], atol=1e-5)
    assert len(c.train_idx) == len(c.train_split)  # 10,000 asked for, fewer there
    assert dl.n == len(c.scen)


def test_outcomes_agree_with_the_recorded_accuracies(study, loaded):
    """The outcome scenarios from one pass against the test accuracies each run recorded."""
    c = loaded
    m = analysis.outcomes(c)

    def recorded(stage, cfg):
        return plan.Run(stage, cfg, 0).metrics()["test"]
    cfg = dataclasses.replace(study, condition="B")
    assert m["test_acc.left"] == pytest.approx(
        recorded("hemisphere", dataclasses.replace(cfg, side="left"))["fine_acc"], abs=1e-6)
    assert m["test_acc.right"] == pytest.approx(
        recorded("hemisphere", dataclasses.replace(cfg, side="right"))["coarse_acc"], abs=1e-6)
    bil = recorded("bilateral", cfg)
    assert m["test_acc.bilateral_fine"] == pytest.approx(bil["fine_acc"], abs=1e-6)
    assert m["test_acc.bilateral_coarse"] == pytest.approx(bil["coarse_acc"], abs=1e-6)
    table = analysis.scenario_table(c.scen, margins=True)
    assert table.loc["total", "total"] == len(c.test_split)
    assert [m[f"scenario.{s}.n_images"] for s in analysis.SCENARIOS] == \
        table.drop(index="total", columns="total").to_numpy().ravel().astype(float).tolist()
    # rows L1.. are the images the left hemisphere got right
    assert table.loc[["L1R1", "L1R0"], "total"].sum() == c.right_wrong["left"].sum()


def test_outcome_table_counts_every_image_once():
    t, f = True, False
    right = {k: torch.tensor(v) for k, v in dict(
        left=[t, t, f, f, t], right=[t, f, t, f, t],
        bilateral_fine=[t, t, f, f, f], bilateral_coarse=[t, f, t, f, t]).items()}
    idx = M.scenario_index(right)
    tab = M.scenario_table(idx, margins=True)
    assert tab.loc["L1R1", "F1C1"] == 1 and tab.loc["L1R1", "F0C1"] == 1
    assert tab.loc["L0R0", "F0C0"] == 1 and tab.loc["total", "total"] == 5
    assert list(tab.index[:4]) == list(M.HEMI_CODES) and list(tab.columns[:4]) == list(M.BILAT_CODES)
    assert M.scenario_names(idx)[1] == "L1R0-F1C0"


# -------------------------------------------------------------------------------- measures

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
    share = M.head_attribution(w, feats, n_left=6)
    assert ((share >= 0) & (share <= 1)).all()
    w[:, 6:] = 0  # the right half of the head's weights zeroed: nothing comes from the right
    assert torch.allclose(M.head_attribution(w, feats, n_left=6), torch.ones(50))


def test_centred_attribution_removes_the_offset_of_non_negative_features():
    """A head whose left half sees a constant feature (an offset, the same for every image) and
    whose right half sees the image: centred, all of every decision comes from the right, and
    the signed contributions are known in closed form; uncentred, the offset takes a share."""
    g = torch.Generator().manual_seed(0)
    n = 200
    signal = torch.rand(n, 2, generator=g)                          # the image-dependent part
    train_signal = torch.rand(1000, 2, generator=g)
    feats = torch.cat([torch.full((n, 2), 3.0), signal], 1)         # [left | right], all >= 0
    train_feats = torch.cat([torch.full((1000, 2), 3.0), train_signal], 1)
    w = torch.tensor([[1.0, 1.0, 2.0, 0.0], [0.0, 0.0, 0.0, 2.0], [-1.0, 0.5, 1.0, 1.0]])
    target = torch.tensor([0, 1, 2] * 66 + [0, 1])
    mean = train_feats.mean(0)
    lc, rc = M.head_contributions(w, feats, 2, target, centre=mean)
    assert torch.allclose(lc, torch.zeros(n), atol=1e-5)
    wc = (w - w.mean(0))[target]
    assert torch.allclose(rc, (wc[:, 2:] * (signal - mean[2:])).sum(1), atol=1e-5)
    share = M.head_attribution(w, feats, 2, target, centre=mean)
    assert torch.allclose(share[torch.isfinite(share)], torch.zeros(int(torch.isfinite(share).sum())), atol=1e-5)
    raw = M.head_attribution(w, feats, 2, target)
    assert raw.mean() > 0.3  # the offset's share when uncentred


def test_signed_contributions_add_up_to_the_centred_logit(loaded):
    """On a trained bilateral model: left + right contribution = the target logit minus the
    mean logit, less the same for the mean training feature (the bias cancels)."""
    c = loaded
    feats = torch.cat([c.out["left_feat"], c.out["right_feat"]], 1)
    mean = torch.cat([c.train_out["left_feat"], c.train_out["right_feat"]], 1).mean(0)
    head = c.bil.heads["fine"][-1]
    target = c.out["fine"].argmax(1)
    lc, rc = M.head_contributions(head.weight.detach(), feats, c.bil.left.out_features, target, mean)
    with torch.no_grad():
        z, z0 = head(feats), head(mean[None])
    rel = lambda v: v.gather(1, target[:, None]).squeeze(1) - v.mean(1)  # noqa: E731
    assert torch.allclose(lc + rc, rel(z) - rel(z0.expand_as(z)), atol=1e-4)


def test_probe_on_one_hot_and_random_features():
    g = torch.Generator().manual_seed(0)
    y_tr, y_te = torch.randint(0, 10, (500,), generator=g), torch.randint(0, 10, (500,), generator=g)
    onehot = lambda y: torch.nn.functional.one_hot(y, 10).float()  # noqa: E731
    p = M.fit_probe(onehot(y_tr), y_tr, 10, iters=100)
    assert p.accuracy(onehot(y_te), y_te) > 0.99
    r = M.fit_probe(torch.randn(500, 20, generator=g), y_tr, 10, iters=100)
    assert abs(r.accuracy(torch.randn(500, 20, generator=g), y_te) - 0.1) < 0.06


def test_probe_matches_scikit_learns_logistic_regression():
    """Same objective: mean cross-entropy + l2 |w|^2 = sklearn's with C = 1 / (2 n l2), on the
    probe's standardised features."""
    from sklearn.linear_model import LogisticRegression
    g = torch.Generator().manual_seed(1)
    n, d, k, l2 = 300, 6, 4, 1e-2
    centres = torch.randn(k, d, generator=g)
    y = torch.randint(0, k, (n,), generator=g)
    x = centres[y] + 1.5 * torch.randn(n, d, generator=g)
    probe = M.fit_probe(x, y, k, l2=l2, iters=500)
    z = ((x - probe.mean) / probe.std).double().numpy()
    ref = LogisticRegression(C=1 / (2 * n * l2), tol=1e-10, max_iter=5000).fit(z, y.numpy())

    def objective(w, b):  # float64, on the same standardised features
        zt = torch.from_numpy(z)
        w, b = torch.as_tensor(w).double(), torch.as_tensor(b).double()
        return (torch.nn.functional.cross_entropy(zt @ w + b, y) + l2 * (w ** 2).sum()).item()
    # the same minimum (float32 L-BFGS stops within 1e-7 of it, on a flat bottom)
    assert objective(probe.weight, probe.bias) == pytest.approx(objective(ref.coef_.T, ref.intercept_), rel=1e-6)
    ours = torch.softmax(probe.logits(x).double(), 1).numpy()
    np.testing.assert_allclose(ours, ref.predict_proba(z), atol=2e-3)
    assert (ours.argmax(1) == ref.predict(z)).all()
    assert probe.accuracy(x, y) == pytest.approx(ref.score(z, y.numpy()))


def test_pca_projects_on_the_leading_axes():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(400, 5, generator=g) * torch.tensor([5.0, 3.0, 1.0, 0.5, 0.1])
    pca = M.fit_pca(x, 2)
    z = pca(x)
    assert z.shape == (400, 2)
    assert torch.allclose(pca.axes.T @ pca.axes, torch.eye(2), atol=1e-5)
    assert torch.allclose(pca.axes.abs().argmax(0), torch.tensor([0, 1]))  # largest variances first
    assert z.var(0)[0] > z.var(0)[1] > 1.0
    with pytest.raises(ValueError, match="PCA to 6"):
        M.fit_pca(x, 6)


def test_equal_dimension_probes(loaded):
    """Condition B: the pyramid's left features are narrower than the right's; the equal-
    dimension probes see both at the smaller dimension, and both variants are scored."""
    c = loaded
    m = analysis.probes(c)
    dl, dr = c.bil.left.out_features, c.bil.right.out_features
    assert dl < dr
    assert m["probe.dim.left"] == dl and m["probe.dim.right"] == dr and m["probe_eqdim.dim"] == dl
    df = analysis.probe_table(c)
    assert df.shape == (4, 2)
    rows = pd.read_csv(c.folder / "probes.csv")
    assert set(rows[rows.variant == "eqdim"].dim) == {dl}
    assert set(rows[rows.variant == "raw"].dim) == {dl, dr}
    for v in ("probe", "probe_eqdim"):
        for side in ("left", "right"):
            for level in ("fine", "coarse"):
                assert 0 <= m[f"{v}.{side}.{level}"] <= 1


def test_differential_specialisation_sign():
    spec = {("left", "fine"): 0.7, ("right", "fine"): 0.5, ("left", "coarse"): 0.6, ("right", "coarse"): 0.8}
    d = M.differential_specialisation(spec)
    assert d["gap_fine"] == pytest.approx(0.2) and d["gap_coarse"] == pytest.approx(0.2)
    assert d["differential_specialisation"] == pytest.approx(0.2)
    swapped = {("left", "fine"): 0.5, ("right", "fine"): 0.7, ("left", "coarse"): 0.8, ("right", "coarse"): 0.6}
    assert M.differential_specialisation(swapped)["differential_specialisation"] == pytest.approx(-0.2)
    same = {k: 0.6 for k in spec}
    assert M.differential_specialisation(same)["differential_specialisation"] == 0


def test_scenarios_and_pairs():
    t, f = torch.tensor([True]), torch.tensor([False])
    idx = M.scenario_index({"left": t, "right": t, "bilateral_fine": t, "bilateral_coarse": t})
    assert M.SCENARIOS[int(idx)] == "L1R1-F1C1"
    idx = M.scenario_index({"left": t, "right": f, "bilateral_fine": f, "bilateral_coarse": t})
    assert M.SCENARIOS[int(idx)] == "L1R0-F0C1"
    labels = torch.tensor([0, 1, 0, 0, 1, 2])
    i, j, total = M.same_label_pairs(labels)
    assert total == 4 and (labels[i] == labels[j]).all() and (i < j).all()
    i, j, total = M.same_label_pairs(labels, torch.tensor([0, 2, 4]))
    assert total == 1 and (i.item(), j.item()) == (0, 2)
    i, j, total = M.same_label_pairs(labels, max_pairs=2, generator=torch.Generator().manual_seed(0))
    assert total == 4 and len(i) == 2
    f = torch.tensor([[1.0, 0], [2.0, 0], [0, 1.0]])
    assert torch.allclose(M.pair_cosine(f, torch.tensor([0, 0]), torch.tensor([1, 2])),
                          torch.tensor([1.0, 0.0]))


def test_the_plotted_pairs_are_a_seeded_shuffle_not_the_first_classes():
    labels = torch.arange(5).repeat_interleave(12)              # 5 classes, 66 pairs each
    i, j, total = M.same_label_pairs(labels, max_pairs=1000)    # all 330 kept, in class order
    assert total == 330 and set(labels[i[:60]].tolist()) == {0}  # a plain cut: one class
    keep = M.shuffled(len(i), 60, torch.Generator().manual_seed(7))
    assert len(keep) == 60 and len(set(keep.tolist())) == 60
    assert set(labels[i[keep]].tolist()) == {0, 1, 2, 3, 4}
    assert torch.equal(keep, M.shuffled(len(i), 60, torch.Generator().manual_seed(7)))
    assert not torch.equal(keep, M.shuffled(len(i), 60, torch.Generator().manual_seed(8)))
    assert len(M.shuffled(10, 60, torch.Generator().manual_seed(7))) == 10


def test_spread():
    s = M.spread([1.0, 2.0, 3.0, float("nan")], "x")
    assert s == {"x.mean": 2.0, "x.std": 1.0, "x.median": 2.0, "x.q25": 1.5, "x.q75": 2.5, "x.n": 3.0}
    assert M.spread([float("nan")], "x") == {}


# --------------------------------------------------------------------------------- figures

def test_save_writes_atomically_and_closes_pyplot_figures(tmp_path):
    fig, ax = plt.subplots()
    ax.plot([0, 1], [1, 0])
    n = len(plt.get_fignums())
    lines = []
    assert figures.save(fig, tmp_path / "sub", "line", log=lines.append) is None  # no echo in a cell
    path = tmp_path / "sub" / "line.png"
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(plt.get_fignums()) == n - 1 and lines == [f"saved {path}"]
    assert [p.name for p in (tmp_path / "sub").iterdir()] == ["line.png"]  # no temporary left


def test_accuracy_plots_zoom_to_the_values_in_percent_with_95pc_intervals_and_right_plurals():
    rows = [dict(model=m, fine_acc_mean=f, fine_acc_sd=0.01, fine_acc_n=n,
                 coarse_acc_mean=c, coarse_acc_sd=0.005, coarse_acc_n=n)
            for m, f, c in (("bilateral/resnet9-A", 0.795, 0.894), ("resnet18", 0.816, 0.916),
                            ("unilateral/resnet9", 0.783, 0.895)) for n in (5,)]
    fig = figures.results_plot(pd.DataFrame(rows))
    fine, coarse = fig.axes[:2]
    # zoomed to the values in %, intervals included (78.3 - t(0.975, 4) x 1 / sqrt(5) = 77.06)
    assert 70 < fine.get_xlim()[0] < 77.06 and 82 < fine.get_xlim()[1] < 100
    assert [t.get_text() for t in fine.get_yticklabels()] == [r["model"] for r in rows]
    assert fine.lines and any(abs(line.get_xdata()[0] - 79.5) < 1e-6 for line in fine.lines)  # reference
    title = fig._suptitle.get_text()
    assert "mean over 5 seeds" in title and "95%" in title and "dashed: bilateral/resnet9-A" in title
    plt.close(fig)
    one = pd.DataFrame(rows).assign(fine_acc_n=1, coarse_acc_n=1, fine_acc_sd=float("nan"),
                                    coarse_acc_sd=float("nan"))
    fig = figures.results_plot(one)
    assert "1 seed" in fig._suptitle.get_text() and "1 seeds" not in fig._suptitle.get_text()
    plt.close(fig)
    comp = pd.DataFrame([dict(reference="bilateral/resnet9-A", model=m, **{
        f"{k}_{x}": v for k in ("fine_acc", "coarse_acc")
        for x, v in (("diff", d), ("lo", d - 0.01), ("hi", d + 0.01), ("method", meth))})
        for m, d, meth in (("hemisphere/resnet9-A-left", 0.017, "paired"), ("resnet18", -0.021, "Welch"))])
    fig = results_md.forest_plot(comp)
    fig.canvas.draw()
    legend = fig.legends[0].get_window_extent()
    assert not any(legend.overlaps(ax.get_window_extent()) for ax in fig.axes)  # beside the data
    plt.close(fig)
