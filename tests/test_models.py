import math

import pytest
import torch
import torch.nn as nn

from bilateral.models import (BACKBONES, HEAD_NAMES, KWTA, Bilateral, Ensemble, Head, Unilateral,
                              build_backbone, count_total, count_trainable, freeze,
                              load_state_strict, params_table, set_kwta_eval)

META = torch.device("meta")
NF, NC = 100, 20


def uni(name, width=1.0, heads=HEAD_NAMES):
    return Unilateral(build_backbone(name, width), NF, NC, heads)


# ------------------------------------------------------------------- exact SPEC counts
@pytest.mark.parametrize("make, expected", [
    (lambda: build_backbone("resnet9"), 6_568_000),
    (lambda: build_backbone("resnet9_pyramid"), 2_818_688),
    (lambda: build_backbone("vgg11"), 128_766_336),
    (lambda: uni("resnet9"), 6_629_560),
    (lambda: Bilateral(build_backbone("resnet9"), build_backbone("resnet9"), NF, NC), 13_259_000),
    (lambda: uni("resnet18"), 11_230_392),
    (lambda: uni("resnet34"), 21_338_552),
    (lambda: Ensemble([uni("resnet9") for _ in range(2)]), 13_259_120),
    (lambda: Ensemble([uni("resnet9") for _ in range(5)]), 33_147_800),
], ids=["resnet9", "pyramid", "vgg11", "unilateral", "bilateral", "resnet18", "resnet34",
        "ensemble2", "ensemble5"])
def test_spec_param_counts(make, expected):
    with META:
        assert count_trainable(make()) == expected


def test_meta_count_equals_real_count():
    with META:
        meta = count_trainable(uni("resnet9"))
    assert meta == count_trainable(uni("resnet9"))


def test_params_table_has_spec_numbers():
    table = params_table()
    for n in (6_568_000, 2_818_688, 128_766_336, 6_629_560, 13_259_000, 11_230_392, 21_338_552,
              13_259_120, 33_147_800):
        assert f"| {n:,} |" in table
    # frozen bilateral ResNet-9: 13,259,000 in all, its heads on 1024 features trained
    assert "| Bilateral ResNet-9 (A, C), specialised (frozen hemispheres) | 13,259,000 | 123,000 |" \
        in table
    assert "| Bilateral ResNet-9 (A, C), end to end | 13,259,000 | 13,259,000 |" in table


def test_total_counts_frozen_parameters():
    with META:
        bi = Bilateral(freeze(build_backbone("resnet9")), freeze(build_backbone("resnet9")), NF, NC)
        assert count_total(bi) == 13_259_000 and count_trainable(bi) == 123_000


# ------------------------------------------------------------------- every backbone
@pytest.mark.parametrize("name", sorted(BACKBONES))
def test_backbone_forward_backward(name):
    torch.manual_seed(0)
    m = build_backbone(name, 0.125)
    x = torch.randn(3, 3, 32, 32)
    y = m(x)
    assert y.shape == (3, m.out_features)
    y.square().mean().backward()
    assert all(p.grad is not None for p in m.parameters())


@pytest.mark.parametrize("name, full", [("resnet9", 512), ("resnet9_pyramid", 64), ("vgg11", 4096),
                                        ("resnet18", 512), ("resnet34", 512)])
def test_width_scales_out_features(name, full):
    with META:
        assert build_backbone(name).out_features == full
        assert build_backbone(name, 0.25).out_features == full // 4
        assert build_backbone(name, 1e-6).out_features == 1  # never zero channels


def test_resnet9_cam_targets():
    m = build_backbone("resnet9", 0.125)
    maps = {}
    for n in ("res1", "res2"):
        getattr(m, n).register_forward_hook(lambda mod, i, o, n=n: maps.__setitem__(n, o.shape))
    m(torch.randn(2, 3, 32, 32))
    assert maps == {"res1": (2, 16, 16, 16), "res2": (2, 64, 4, 4)}


def test_unknown_backbone_lists_names():
    with pytest.raises(ValueError) as e:
        build_backbone("resnet50")
    assert all(n in str(e.value) for n in BACKBONES)


@pytest.mark.parametrize("name", ["vgg11", "resnet18", "resnet34"])
def test_kwta_only_on_resnet9(name):
    with pytest.raises(ValueError, match="k-WTA"):
        build_backbone(name, 0.125, k=0.9)


@pytest.mark.parametrize("name", ["resnet9", "resnet9_pyramid", "resnet18", "resnet34"])
def test_bn_momentum(name):
    bns = lambda m: [b for b in m.modules() if isinstance(b, nn.BatchNorm2d)]
    assert bns(build_backbone(name, 0.125))
    assert all(b.momentum == 0.1 for b in bns(build_backbone(name, 0.125)))
    assert all(b.momentum == 0.9 for b in bns(build_backbone(name, 0.125, bn_momentum=0.9)))


# ------------------------------------------------------------------- k-WTA
@pytest.mark.parametrize("k, k_batch", [(0.9, 0.9), (0.7, 0.7), (0.5, 1.0), (1.0, 0.3)])
def test_kwta_counts(k, k_batch):
    torch.manual_seed(0)
    B, C, H, W = 4, 3, 5, 6
    x = torch.randn(B, C, H, W)
    n1 = math.ceil(round(k * H * W, 6))
    m = KWTA(k, k_batch, channels=C).eval()
    assert ((m(x) != 0).sum((2, 3)) == n1).all()
    y = m.train()(x)
    stage1 = KWTA(k, k_batch, channels=C).eval()(x)
    assert ((y != 0).sum((0, 2, 3)) == math.ceil(round(k_batch * n1 * B, 6))).all()
    assert ((y == 0) | (y == stage1)).all()  # stage-2 survivors are stage-1 winners, unchanged


def _kwta_reference(m, x):
    """The two stages written the plain way (masks, -inf fill, torch's kthvalue), as KWTA did
    before it selected with numpy in place: the fast path must give exactly this."""
    B, C, H, W = x.shape
    kth = lambda v, k: v.kthvalue(v.shape[-1] - k + 1, dim=-1, keepdim=True).values  # noqa: E731
    flat = x.detach().flatten(2)
    n1 = math.ceil(m.k * H * W - 1e-9)
    mask = flat >= kth(flat, n1)
    t = None
    if m.training or m.eval_rule == "batch":
        score = flat.masked_fill(~mask, float("-inf")).transpose(0, 1).reshape(C, -1)
        t = kth(score, math.ceil(m.k_batch * n1 * B - 1e-9))
        mask = (score >= t).view(C, B, H * W).transpose(0, 1)
    elif m.eval_rule == "threshold":
        mask &= flat >= m.running_threshold.view(1, C, 1)
    return x * mask.reshape(B, C, H, W), t


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("channels_last", [False, True])
def test_kwta_matches_the_plain_two_stage_selection(dtype, channels_last):
    """Every rule, both memory formats, with the ties a padded image makes (a constant border
    gives the same conv output at many positions of many samples): same output, gradient and
    tracked threshold as the reference, and the output keeps the input's memory format."""
    g = torch.Generator().manual_seed(0)
    B, C, H, W = 6, 5, 8, 8
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    m = KWTA(0.7, 0.8, channels=C, momentum=0.5)
    ref = KWTA(0.7, 0.8, channels=C, momentum=0.5)
    for step in range(3):
        x = torch.randn(B, C, H, W, generator=g, dtype=dtype)
        x[:, :, :2] = 0.25  # tied rows, as a zero-padded border
        x[::2, :, :, -1] = x[0, :, 0, 0].view(1, C, 1)  # ties across samples too
        x = x.contiguous(memory_format=fmt).requires_grad_(True)
        for rule in ("train", *KWTA.EVAL_RULES):
            m.train(rule == "train"), ref.train(rule == "train")
            m.eval_rule = ref.eval_rule = "threshold" if rule == "train" else rule
            x.grad = None
            y = m(x)
            y.backward(torch.arange(y.numel(), dtype=dtype).view(y.shape))
            gy = x.grad
            x.grad = None
            want, t = _kwta_reference(ref, x)
            want.backward(torch.arange(y.numel(), dtype=dtype).view(y.shape))
            if rule == "train":
                ref._track(t.reshape(C).float())
            assert torch.equal(y, want), (step, rule)
            assert torch.equal(gy, x.grad), (step, rule)
            assert y.is_contiguous(memory_format=fmt)
        assert torch.equal(m.running_threshold, ref.running_threshold)


def test_kwta_keeps_largest_and_every_tie_at_the_threshold():
    x = torch.arange(10.0).view(1, 1, 2, 5)
    y = KWTA(0.3, eval_rule="map_only", channels=1).eval()(x)
    assert y.flatten().tolist() == [0] * 7 + [7, 8, 9]
    # a tie at the threshold is kept whole rather than broken by memory order
    x = torch.tensor([1.0, 2, 2, 2, 3]).view(1, 1, 1, 5)
    assert KWTA(0.4, channels=1).eval()(x).flatten().tolist() == [0, 2, 2, 2, 3]
    assert (KWTA(0.5, channels=3).eval()(torch.ones(2, 3, 4, 4)) == 1).all()


def test_kwta_gradient_only_through_winners():
    x = torch.randn(4, 3, 6, 6, requires_grad=True)
    y = KWTA(0.7, channels=3).train()(x)
    y.sum().backward()
    assert torch.equal(x.grad != 0, y.detach() != 0)


def test_kwta_eval_batch_dependence():
    torch.manual_seed(0)
    x, other = torch.randn(1, 2, 6, 6), torch.randn(3, 2, 6, 6)
    for rule, depends in (("threshold", False), ("map_only", False), ("batch", True)):
        m = KWTA(0.5, 0.5, rule, channels=2)
        m.train()(torch.randn(8, 2, 6, 6))  # a tracked threshold, so "threshold" acts
        m.eval()
        alone = m(x)[0]
        in_batch = m(torch.cat([x, other]))[0]
        assert torch.equal(alone, in_batch) != depends, rule


def test_kwta_threshold_keeps_the_training_sparsity_at_eval():
    """The issue's check: on a fixed batch, the share of activations that survive in eval mode
    with the tracked thresholds is the training share within one point; the per-map stage
    alone keeps about k, far more."""
    g = torch.Generator().manual_seed(0)
    C = 8
    scale = torch.linspace(0.5, 2.0, C).view(1, C, 1, 1)  # channels of different spread
    draw = lambda: torch.randn(32, C, 8, 8, generator=g) * scale + 0.3  # noqa: E731
    m = KWTA(0.9, 0.9, "threshold", channels=C)
    m.train()
    for _ in range(50):  # running thresholds settle, as BatchNorm's statistics do
        m(draw())
    fixed = draw()
    alive = lambda y: (y != 0).float().mean().item()  # noqa: E731
    train_rate = alive(m(fixed))
    m.eval()
    eval_rate = alive(m(fixed))
    assert train_rate == pytest.approx(0.81, abs=0.01)
    assert abs(eval_rate - train_rate) < 0.01
    m.eval_rule = "map_only"
    assert alive(m(fixed)) == pytest.approx(0.9, abs=0.01)


def test_kwta_threshold_is_tracked_with_momentum_and_saved():
    m = KWTA(0.5, 0.5, channels=2, momentum=0.25).train()
    assert torch.isinf(m.running_threshold).all()  # untrained: eval acts as map_only
    x = torch.arange(2 * 2 * 4, dtype=torch.float).view(2, 2, 2, 2)
    # channel 0 holds 0-3 (sample 0) and 8-11 (sample 1): stage 1 keeps 2-3 and 10-11, stage 2
    # the top 2 of those, so its threshold is 10; channel 1: 14
    m(x)
    assert m.running_threshold.tolist() == [10.0, 14.0]  # the first batch sets it
    m(x + 4)
    assert m.running_threshold.tolist() == [10 + 0.25 * 4, 14 + 0.25 * 4]
    bb = build_backbone("resnet9", 0.125, k=0.9)
    bb.train()(torch.randn(4, 3, 32, 32))
    state = bb.state_dict()
    keys = [k for k in state if k.endswith("running_threshold")]
    assert len(keys) == 8 and all(torch.isfinite(state[k]).all() for k in keys)
    fresh = build_backbone("resnet9", 0.125, k=0.9)
    load_state_strict(fresh, state)
    assert all(torch.equal(fresh.state_dict()[k], state[k]) for k in keys)
    missing = {k: v for k, v in state.items() if k not in keys}
    with pytest.raises(ValueError, match="8 missing keys"):
        load_state_strict(build_backbone("resnet9", 0.125, k=0.9), missing)


def test_set_kwta_eval_switches_every_layer_and_rejects_unknown_rules():
    bb = build_backbone("resnet9", 0.125, k=0.9, kwta_eval="batch")
    assert set_kwta_eval(bb, "map_only") == "batch"
    assert {m.eval_rule for m in bb.modules() if isinstance(m, KWTA)} == {"map_only"}
    assert set_kwta_eval(build_backbone("resnet9", 0.125), "batch") is None
    for bad in (lambda: set_kwta_eval(bb, "sometimes"),
                lambda: build_backbone("resnet9", 0.125, k=0.9, kwta_eval="sometimes"),
                lambda: KWTA(0.9, eval_rule="sometimes", channels=1)):
        with pytest.raises(ValueError, match="allowed: threshold, map_only, batch"):
            bad()


def test_kwta_backbone_default_k_batch_and_train():
    m = build_backbone("resnet9", 0.125, k=0.9)
    kw = [mod for mod in m.modules() if isinstance(mod, KWTA)]
    assert len(kw) == 8 and all(k.k_batch == 0.9 and k.eval_rule == "threshold" for k in kw)
    m(torch.randn(4, 3, 32, 32)).sum().backward()
    # same keys with and without sparsity, but for k-WTA's running thresholds
    keys = [k for k in m.state_dict() if not k.endswith(".running_threshold")]
    assert keys == list(build_backbone("resnet9", 0.125).state_dict())


@pytest.mark.parametrize("k, k_batch", [(0.0, None), (1.5, None), (0.9, 0.0)])
def test_kwta_rejects_bad_k(k, k_batch):
    with pytest.raises(ValueError):
        KWTA(k, k_batch, channels=1)


# ------------------------------------------------------------------- models
def test_unilateral_heads_and_features():
    m = uni("resnet9", 0.125)
    out = m(torch.randn(2, 3, 32, 32), return_features=True)
    assert out["fine"].shape == (2, NF) and out["coarse"].shape == (2, NC)
    assert out["features"].shape == (2, 64)
    fine_only = uni("resnet9", 0.125, heads=("fine",))
    assert set(fine_only(torch.randn(2, 3, 32, 32))) == {"fine"}
    with pytest.raises(ValueError):
        uni("resnet9", 0.125, heads=("middle",))
    assert isinstance(m.heads["fine"], Head) and isinstance(m.heads["fine"][0], nn.Dropout)


def test_bilateral_shapes_and_keys():
    left, right = build_backbone("resnet9_pyramid", 0.125), build_backbone("resnet9", 0.125)
    m = Bilateral(left, right, NF, NC).eval()
    x = torch.randn(2, 3, 32, 32)
    out = m(x, return_features=True)
    assert out["left"].shape == (2, 8) and out["right"].shape == (2, 64)
    assert torch.equal(out["features"], torch.cat([out["left"], out["right"]], 1))
    assert torch.allclose(m.classify(m.features(x))["fine"], out["fine"])
    assert m.heads["coarse"][1].in_features == 72
    assert {k.split(".")[0] for k in m.state_dict()} == {"left", "right", "heads"}


def test_frozen_hemispheres_stay_fixed():
    torch.manual_seed(0)
    m = Bilateral(freeze(build_backbone("resnet9", 0.125)), freeze(build_backbone("resnet9", 0.125)),
                  NF, NC)
    assert count_trainable(m.left) == count_trainable(m.right) == 0
    before = {k: v.clone() for k, v in m.state_dict().items() if not k.startswith("heads")}
    m.train()
    assert not m.left.training and not m.right.training and m.heads.training
    assert not any(mod.training for mod in m.left.modules())
    opt = torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.1)
    x = torch.randn(4, 3, 32, 32, requires_grad=True)
    out = m(x)
    (out["fine"].logsumexp(1) + out["coarse"].logsumexp(1)).sum().backward()
    opt.step()
    after = m.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in before.items())  # BN stats and weights
    assert x.grad is not None and x.grad.abs().sum() > 0  # Grad-CAM still possible


def test_ensemble_averages_logits():
    torch.manual_seed(0)
    a, b = uni("resnet9", 0.125).eval(), uni("resnet9", 0.125, heads=("fine",)).eval()
    x = torch.randn(2, 3, 32, 32)
    out = Ensemble([a, b]).eval()(x)
    assert set(out) == {"fine"}
    assert torch.allclose(out["fine"], (a(x)["fine"] + b(x)["fine"]) / 2)


# ------------------------------------------------------------------- load_state_strict
def test_load_state_strict_matching_loads_exactly():
    src, dst = uni("resnet9", 0.125), uni("resnet9", 0.125)
    load_state_strict(dst, src.state_dict())
    assert all(torch.equal(v, dst.state_dict()[k]) for k, v in src.state_dict().items())


@pytest.mark.parametrize("case, expect", [
    ("width", ["shape mismatch", "saved (16, 3, 3, 3) vs model (8, 3, 3, 3)"]),
    ("arch", ["missing keys", "unexpected keys"]),
    ("missing", ["1 missing keys", "heads.fine.1.bias"]),
    ("unexpected", ["1 unexpected keys", "extra.weight"]),
])
def test_load_state_strict_errors(case, expect):
    dst = uni("resnet9", 0.125)
    state = {"width": lambda: uni("resnet9", 0.25).state_dict(),
             "arch": lambda: uni("resnet18", 0.125).state_dict(),
             "missing": lambda: {k: v for k, v in dst.state_dict().items() if k != "heads.fine.1.bias"},
             "unexpected": lambda: {**dst.state_dict(), "extra.weight": torch.zeros(1)}}[case]()
    with pytest.raises(ValueError) as e:
        load_state_strict(dst, state, what="hemisphere left")
    msg = str(e.value)
    assert msg.startswith("hemisphere left: ")
    assert all(s in msg for s in expect), msg


# ------------------------------------------------------------------- against a reference
def test_vgg11_has_torchvisions_keys_and_shapes():
    """Our VGG-11 is torchvision's vgg11 (weights=None: nothing downloaded) without its last
    Linear, so its checkpoints load into torchvision's and back, key for key."""
    from torchvision.models import vgg11
    with META:  # shapes only: no 500 MB of weights to fill
        ours = build_backbone("vgg11").state_dict()
        ref = vgg11(weights=None).state_dict()
    shapes = lambda sd: {k: tuple(v.shape) for k, v in sd.items()}
    assert {k for k in ref if k.startswith("features.")} == {k for k in ours if k.startswith("features.")}
    assert shapes(ours) == {k: s for k, s in shapes(ref).items() if not k.startswith("classifier.6.")}
    assert set(ref) - set(ours) == {"classifier.6.weight", "classifier.6.bias"}  # the 1000-class Linear
