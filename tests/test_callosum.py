"""Callosal connections: identity at initialisation, frozen hemispheres stay frozen, every kind
trains, the stages and analyses run, and bad parameters stop before any work."""
import dataclasses

import pytest
import torch

from bilateral import cam, callosum, callosum_study, config as C, data, models, plan, runs, train

W = 1 / 32
SIDES = {"A": ("resnet9", "resnet9"), "B": ("resnet9_pyramid", "resnet9")}  # B: unequal widths


def pair(cond, seed=0):
    torch.manual_seed(seed)
    left, right = (models.build_backbone(n, W) for n in SIDES[cond])
    return left, right


def synthetic(n):
    return data.load_dataset("synthetic", "train", val_size=0, size=n, seed=0)


def batch(n=48):
    split = synthetic(n)
    dl = data.DeviceLoader(split, n, device="cpu", shuffle=False, augment=False)
    return next(iter(dl))


def trained_bn(backbone, x):
    """Non-trivial BatchNorm statistics, so eval mode differs from the initial identity."""
    backbone.train()
    with torch.no_grad():
        backbone(x)
    return backbone.eval()


@pytest.mark.parametrize("cond", ["A", "B"])
@pytest.mark.parametrize("kind", callosum.KINDS)
def test_untrained_callosal_model_computes_exactly_the_bilateral_outputs(cond, kind):
    x = batch()["x"]
    left, right = (trained_bn(b, x) for b in pair(cond))
    bil = models.Bilateral(left, right, 12, 4).eval()
    ref = bil(x, return_features=True)
    for at in [(d,) for d in callosum.DEPTHS] + [callosum.DEPTHS]:
        m = callosum.Callosal(left, right, 12, 4, kind=kind, at=at)
        m.heads.load_state_dict(bil.heads.state_dict())
        out = m.eval()(x, return_features=True)
        for k in ("fine", "coarse", "features", "left", "right"):
            assert torch.equal(out[k], ref[k]), (kind, at, k)
        assert set(m.state_dict()) - set(bil.state_dict()) == {
            k for k in m.state_dict() if k.startswith("links.")}


def test_links_map_between_unequal_widths():
    left, right = pair("B")
    wl, wr = callosum.depth_widths(left), callosum.depth_widths(right)
    assert wl["prep"] == 16 and wr["prep"] == 2 and wl["layer3"] == 2 and wr["layer3"] == 16
    m = callosum.Callosal(left, right, 12, 4, kind="concat", at=("prep", "layer3"))
    assert m.links["prep"].to_left.proj.weight.shape == (16, 18, 1, 1)
    assert m.links["prep"].to_left.norm.num_features == 16
    assert m.links["prep"].to_right.proj.weight.shape == (2, 18, 1, 1)


def fit_steps(model, b, steps, lr=0.05, optimizer="sgd"):
    hp = train.Hyper(optimizer, lr, 48, 1, 0.0, 0.0, "constant")
    opt = train.make_optimizer(model.param_groups(), hp)
    model.train()
    losses = []
    for _ in range(steps):
        loss = train.loss_fn(model(b["x"]), b, ("fine", "coarse"))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return opt, losses


def _cfg(**kw):
    return C.from_dict(dict(dataset="synthetic", width=W, **kw))


def test_frozen_hemispheres_keep_weights_and_batchnorm_statistics():
    b = batch()
    left, right = (trained_bn(m, b["x"]) for m in pair("B"))
    hier = synthetic(48).hierarchy
    model = callosum.build(_cfg(callosum="gate"), hier, left, right, frozen=True)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt, losses = fit_steps(model, b, 5)
    after = model.state_dict()
    hemis = [k for k in before if k.startswith(("left.", "right."))]
    assert any("running_mean" in k for k in hemis)
    for k in hemis:  # weights, running statistics and num_batches_tracked alike
        assert torch.equal(before[k], after[k]), k
    assert all(p.grad is None for p in [*model.left.parameters(), *model.right.parameters()])
    assert not model.left.training and model.links.training
    assert len(opt.param_groups) == 1  # the frozen group has nothing to train
    changed = [k for k in before if k.startswith("links.") and not torch.equal(before[k], after[k])]
    assert any(k.endswith("norm.weight") for k in changed) and any(k.endswith("proj.weight") for k in changed)


def test_all_mode_fine_tunes_the_hemispheres_at_a_scaled_rate():
    b = batch()
    hier = synthetic(48).hierarchy
    model = callosum.build(_cfg(callosum_train="all", backbone_lr_scale=0.25), hier, *pair("A"),
                           frozen=False)
    w0 = model.left.conv1[0].weight.clone()
    opt, _ = fit_steps(model, b, 2, lr=0.1)
    assert [g["lr"] for g in opt.param_groups] == [0.1, 0.1 * 0.25]
    assert model.left.training and not torch.equal(w0, model.left.conv1[0].weight)


@pytest.mark.parametrize("kind", callosum.KINDS)
def test_every_kind_learns_on_synthetic_data(kind):
    b = batch()
    left, right = (trained_bn(m, b["x"]) for m in pair("A"))
    m = callosum.Callosal(models.freeze(left), models.freeze(right), 12, 4, kind=kind, dropout=0.0)
    _, losses = fit_steps(m, b, 30, lr=0.05, optimizer="adam")
    assert losses[-1] < 0.85 * losses[0]
    tr = callosum_study.traffic(m, [b], "cpu")
    for (depth, d), g in tr["links"].items():
        assert g["ratio"].shape == (48,) and (g["ratio"] > 0).all(), (depth, d)
        if kind == "gate":
            assert ((g["gate"] > 0) & (g["gate"] < 1)).all()


def test_concat_crossing_is_the_part_due_to_the_sender():
    cross = callosum.Crossing("concat", 3, 5)
    torch.nn.init.normal_(cross.norm.weight)
    torch.nn.init.normal_(cross.norm.bias)
    cross.norm.running_var.uniform_(0.5, 2)
    cross.norm.running_mean.normal_()
    cross.eval()
    recv, send = torch.randn(4, 3, 6, 6), torch.randn(4, 5, 6, 6)
    rec = {}
    out = cross(recv, send, rec)
    expected = (out - cross(recv, torch.zeros_like(send))).flatten(1).norm(dim=1)
    assert torch.allclose(rec["cross"], expected, rtol=1e-4, atol=1e-5)


def test_untrained_links_carry_no_traffic_and_gate_is_recorded():
    b = batch()
    m = callosum.Callosal(*pair("B"), 12, 4, kind="gate", at=("layer1", "layer2"))
    tr = callosum_study.traffic(m, [b], "cpu")
    assert set(tr["links"]) == {(d, s) for d in ("layer1", "layer2") for s in callosum.DIRECTIONS}
    assert all((g["ratio"] == 0).all() for g in tr["links"].values())
    assert tr["links"][("layer1", "to_left")]["gate"].shape == (48, 8)  # pyramid layer1: 8 ch
    table = callosum_study.traffic_table(tr, [f"c{i}" for i in range(4)])
    assert set(table.coarse_class) >= {"all"} and (table[table.coarse_class == "all"].n == 48).all()


def test_gradcam_runs_on_each_hemisphere_of_the_callosal_model():
    b = batch(8)
    m = callosum.Callosal(*pair("A"), 12, 4, kind="add")
    for link in m.links.values():  # something must cross for the test to mean anything
        for c in (link.to_left, link.to_right):
            torch.nn.init.normal_(c.norm.weight, std=0.1)
    m.eval()
    cls = torch.zeros(8, 2, dtype=torch.long)
    for side in ("left", "right"):
        maps = cam.gradcam(m, cam.target_layers(getattr(m, side)), b["x"], ["fine", "coarse"], cls)
        assert maps.shape == (8, 32, 32) and maps.max() > 0


def test_callosal_stages_train_record_and_analyse(tmp_path):
    cfg = C.from_dict(dict(experiment="t", out_dir=str(tmp_path), dataset="synthetic",
                           synthetic_size=160, width=W, epochs=1, batch_size=64, progress=False,
                           device="cpu", threads=1, conditions=["B"], condition="B",
                           callosum="concat", callosum_kinds=["concat"]))
    for side in ("left", "right"):
        plan.run_stage("hemisphere", dataclasses.replace(cfg, side=side), 0)
    plan.run_stage("bilateral", cfg, 0)
    m = plan.run_stage("callosal", cfg, 0)
    assert set(m["test"]) == {"fine_acc", "coarse_acc", "fine_as_coarse_acc"}
    hier = data.load_splits(cfg)[0].hierarchy
    model = plan.load_run_model("callosal", cfg, 0, hier)
    hemi = plan.load_run_model("hemisphere", dataclasses.replace(cfg, side="left"), 0, hier).backbone
    for k, v in hemi.state_dict().items():  # trained through, but not into, the hemispheres
        assert torch.equal(model.left.state_dict()[k], v), k
    # the capacity control: no connections, as many trainable parameters (to a head unit)
    mt = plan.run_stage("bilateral_matched", cfg, 0)
    rec = lambda stage: runs.read_json(  # noqa: E731
        runs.run_dir(cfg, stage, "resnet9-B-concat-layer1+layer3", 0) / "config.json")
    per_unit = 2 * (hemi.out_features + model.right.out_features) + 2 + hier.n_fine + hier.n_coarse
    assert abs(rec("bilateral_matched")["trainable_params"] - rec("callosal")["trainable_params"]) <= per_unit / 2
    assert rec("bilateral_matched")["cached_features"] is True and mt["heads"] == ["fine", "coarse"]
    matched = plan.load_run_model("bilateral_matched", cfg, 0, hier)
    assert not hasattr(matched, "links") and len(matched.heads["fine"]) == 4  # dropout, linear, relu, linear
    for k, v in hemi.state_dict().items():
        assert torch.equal(matched.left.state_dict()[k], v), k
    u = plan.run_stage("callosal_unspecialised", dataclasses.replace(cfg, condition="A"), 0)
    assert u["test"]["fine_acc"] >= 0
    metrics = callosum_study.analyse(cfg, 0, cam_images=4, log=lambda *_: None)
    assert "callosum.concat.layer1.to_left.ratio.mean" in metrics
    assert (callosum_study.out_dir(cfg, 0) / "traffic.png").exists()
    from bilateral import results
    comp = callosum.comparison(results.per_seed(results.collect(tmp_path / "t")))
    assert list(comp.model) == ["callosal/resnet9-B-concat-layer1+layer3",
                                "callosal_unspecialised/resnet9-A-concat-layer1+layer3"]
    assert list(comp.reference) == ["bilateral/resnet9-B", "bilateral/resnet9-A"]
    ref = results.per_seed(results.collect(tmp_path / "t"))["bilateral/resnet9-B"]["fine_acc"][0]
    assert comp.fine_acc_diff.iloc[0] == pytest.approx(m["test"]["fine_acc"] - ref)
    assert comp.fine_acc_diff.isna().iloc[1]  # no bilateral run of condition A here
    table = results.comparison_table(results.collect(tmp_path / "t"))
    row = table[table.model.astype(str).str.startswith("bilateral_matched/")]
    assert len(row) >= 1 and set(row.family) == {"callosal"}, table.to_string()


@pytest.mark.parametrize("key, value, allowed", [
    ("callosum", "multiply", "add, gate, concat"),
    ("callosum_at", ["layer4"], "prep, layer1, layer2, layer3"),
    ("callosum_at", ["layer1", "layer1"], "prep, layer1, layer2, layer3"),
    ("callosum_train", "heads", "connections, all"),
    ("callosum_kinds", ["add", "mul"], "add, gate, concat"),
])
def test_bad_values_of_the_new_keys_stop_with_the_allowed_values(key, value, allowed):
    with pytest.raises(C.ConfigError, match=key) as e:
        C.from_dict({key: value})
    assert allowed in str(e.value)


def test_bad_scale_or_backbone_stops_before_any_work():
    with pytest.raises(C.ConfigError, match="backbone_lr_scale"):
        C.from_dict({"backbone_lr_scale": 0})
    with pytest.raises(C.ConfigError, match="ResNet-9"):
        C.from_dict({"backbone": "vgg11", "conditions": ["A"], "callosum_kinds": ["add"]})
    assert C.from_dict({"callosum_at": ["layer3", "prep"]}).callosum_at == ["prep", "layer3"]


def test_run_names_and_unused_fields():
    cfg = C.from_dict({"callosum": "gate", "callosum_train": "all", "backbone_lr_scale": 0.5})
    c = plan.stage_config(cfg, "callosal")
    assert plan.Run("callosal", c, 0).name == "resnet9-A-gate-layer1+layer3-all0.5"
    u = plan.stage_config(cfg, "callosal_unspecialised")
    assert plan.Run("callosal_unspecialised", u, 0).name == "resnet9-A-gate-layer1+layer3"
    h = plan.stage_config(dataclasses.replace(cfg, side="left"), "hemisphere")
    assert (h.callosum, h.callosum_train) == ("add", "connections")  # defaults: same identity


def test_params_rows_count_links_and_heads():
    rows = {m: (t, tr) for m, t, tr in callosum.params_rows()}
    total, trainable = rows["Callosal add at layer1+layer3 (A, C), connections + heads"]
    bn = 2 * (2 * 128 + 2 * 512)  # each direction's BatchNorm: scale and shift
    heads, links = 1024 * 120 + 120, 2 * 128 * 128 + 2 * 512 * 512 + bn
    assert trainable == heads + links and total == 2 * 6_568_000 + heads + links


def test_the_plan_holds_the_callosal_runs_after_their_hemispheres_only_when_kinds_are_set():
    from bilateral import plan
    base = dict(dataset="synthetic", conditions=["A", "B"], baselines=[])
    assert not [r for r in plan.plan(C.from_dict(base), [0]) if r.phase == "callosum"]
    cfg = C.from_dict({**base, "callosum_kinds": ["add", "gate"]})
    runs = plan.plan(cfg, [0])
    keys = [r.key for r in runs]
    ours = [r for r in runs if r.phase == "callosum"]
    assert [r.key for r in ours] == [
        f"{s}/resnet9-{c}-{k}-layer1+layer3/seed=0"
        for s, pairs in (("callosal", [(c, k) for k in ("add", "gate") for c in "AB"]),
                         ("callosal_unspecialised", [("A", "add"), ("A", "gate")]),
                         ("bilateral_matched", [(c, k) for k in ("add", "gate") for c in "AB"]))
        for c, k in pairs]
    for r in ours[:4]:  # each callosal run waits for the two hemispheres of its condition
        ups = [u.key for u in r.upstream()]
        assert ups == [f"hemisphere/resnet9-{r.cfg.condition}-{s}/seed=0" for s in ("left", "right")]
        assert all(keys.index(u) < keys.index(r.key) for u in ups)
    assert ours[4].upstream() == []
    assert plan.phase_runs(cfg, "07_callosum", 0) == ours
    assert "callosal" in tuple(plan.STAGES) and "callosal_unspecialised" in tuple(plan.STAGES)
