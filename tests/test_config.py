from pathlib import Path

import pytest

from bilateral import config as C
from bilateral import plan  # noqa: F401  (registers the stages: the stage_epochs check)
from bilateral import runs

PARAMS = sorted((Path(__file__).parents[1] / "params").glob("*.yaml"))


@pytest.mark.parametrize("path", PARAMS, ids=lambda p: p.name)
def test_every_preset_loads(path):
    cfg = C.load(path)
    assert cfg.experiment == path.stem


@pytest.mark.parametrize("values, words", [
    ({"epochz": 3}, ["epochz", "allowed", "epochs"]),
    ({"dataset": "imagenet"}, ["dataset", "imagenet", "cifar100", "fashion_mnist", "synthetic"]),
    ({"backbone": "resnet50"}, ["backbone", "resnet50", "resnet9", "vgg11"]),
    ({"condition": "E"}, ["condition", "'E'", "A, B, C, D"]),
    ({"recipe": "slow"}, ["recipe", "original", "fast"]),
    ({"conditions": ["A", "X"]}, ["conditions", "'X'"]),
    ({"epochs": "ten"}, ["epochs", "expected int", "'ten'"]),
    ({"epochs": 2.5}, ["epochs", "expected int"]),
    ({"augment": "yes"}, ["augment", "expected bool"]),
    ({"width": True}, ["width", "expected float"]),
    ({"epochs": 0}, ["epochs", "positive"]),
    ({"kwta_k": 1.5}, ["kwta_k", "(0, 1]"]),
    ({"backbone": "vgg11", "conditions": ["A", "C"]}, ["vgg11", "condition A only"]),
    ({"ensemble_sizes": [2, 12]}, ["12", "pool of 10"]),
    ({"device": "tpu"}, ["device", "cuda"]),
    ({"kwta_eval": "sometimes"}, ["kwta_eval", "'sometimes'", "threshold, map_only, batch"]),
    ({"stage_epochs": {"resnet50": 3}}, ["stage_epochs", "'resnet50'", "resnet34"]),
    ({"stage_epochs": {"ensemble": 3}}, ["stage_epochs", "'ensemble'", "hemisphere"]),
    ({"stage_epochs": {"resnet34": 0}}, ["stage_epochs", "resnet34", "positive"]),
    ({"stage_epochs": {"resnet34": 2.5}}, ["stage_epochs", "expected int"]),
    ({"stage_epochs": [12]}, ["stage_epochs", "expected a mapping"]),
    ({"weight_decay_equal": "yes"}, ["weight_decay_equal", "expected bool"]),
    ({"precision": "fp16"}, ["precision", "'fp16'", "auto, fp32, bf16"]),
    ({"precision": "float32"}, ["precision", "allowed: auto, fp32, bf16"]),
    ({"amp": False}, ["amp: false is replaced by precision: fp32"]),
])
def test_bad_parameters_stop_with_a_message_naming_them(values, words):
    with pytest.raises(C.ConfigError) as e:
        C.from_dict(values)
    for w in words:
        assert w in str(e.value)


def test_types_are_converted_where_safe_and_overrides_read_as_yaml(tmp_path):
    p = tmp_path / "x.yaml"
    p.write_text("experiment: x\nwidth: 1\nbn_momentum: null\n")
    cfg = C.load(p, ["epochs=3", "lr=0.05", "conditions=[A, C]", "precision=bf16", "amp=true"])
    assert cfg.width == 1.0 and isinstance(cfg.width, float)
    assert (cfg.epochs, cfg.lr, cfg.conditions, cfg.precision) == (3, 0.05, ["A", "C"], "bf16")
    with pytest.raises(C.ConfigError, match="key=value"):
        C.load(p, ["epochs"])
    with pytest.raises(C.ConfigError, match="not found"):
        C.load(tmp_path / "missing.yaml")


def test_yaml_is_loaded_safely(tmp_path):
    p = tmp_path / "evil.yaml"
    p.write_text("experiment: !!python/object/apply:os.system ['true']\n")
    with pytest.raises(Exception) as e:
        C.load(p)
    assert "python/object" in str(e.value)


def test_identity_ignores_where_and_how_verbosely(tmp_path):
    a, b = C.Config(), C.Config(out_dir="elsewhere", progress=False, device="cpu")
    assert C.identity(a) == C.identity(b)
    assert C.diff(C.identity(a), C.identity(C.Config(epochs=3))) == ["epochs: None -> 3"]


def test_prepare_refuses_a_different_config_and_force_clears_it(tmp_path):
    d = tmp_path / "run"
    assert runs.prepare(d, {"a": 1}) == "new"
    runs.write_json(d / "config.json", {"config": {"a": 1}})
    runs.write_json(d / "metrics.json", {"test": {}})
    assert runs.prepare(d, {"a": 1}) == "done"
    with pytest.raises(runs.RunConflict, match="a: 1 -> 2"):
        runs.prepare(d, {"a": 2})
    assert (d / "metrics.json").exists()
    assert runs.prepare(d, {"a": 2}, force=True) == "new"
    assert not (d / "metrics.json").exists()


def test_atomic_write_leaves_no_partial_file(tmp_path, monkeypatch):
    target = tmp_path / "m.json"
    runs.write_json(target, {"old": 1})

    def broken_replace(src, dst):
        raise OSError("disk full")
    monkeypatch.setattr(runs.os, "replace", broken_replace)
    with pytest.raises(OSError):
        runs.write_json(target, {"new": 2})
    assert runs.read_json(target) == {"old": 1}
    assert [f.name for f in tmp_path.iterdir()] == ["m.json"]


def test_equal_weight_decay_preset_is_the_paper_preset_but_for_the_switch():
    root = Path(__file__).parents[1] / "params"
    a, b = C.load(root / "paper_resnet9.yaml"), C.load(root / "paper_resnet9_equal_wd.yaml")
    assert C.diff(C.identity(a), C.identity(b)) == [
        "experiment: 'paper_resnet9' -> 'paper_resnet9_equal_wd'", "weight_decay_equal: False -> True"]


def test_a_field_added_later_at_its_default_keeps_earlier_runs():
    """A record written before a Config field existed still matches while the field holds its
    default; any other value of it is a difference."""
    new = C.identity(C.Config(epochs=3))
    old = {k: v for k, v in new.items() if k != "dropout"}  # as if dropout came later
    assert C.diff(old, new) == []
    assert C.diff(old, C.identity(C.Config(epochs=3, dropout=0.1))) == ["dropout: 0.6 -> 0.1"]


def test_a_record_without_precision_reads_as_float32_and_amp_is_not_identity():
    """Records written before `precision` (no key, amp: true) are float32 runs: they match an
    identity whose resolved precision is fp32, not a bf16 one (runner.identity resolves it)."""
    old = {k: v for k, v in C.identity(C.Config()).items() if k != "precision"}
    old["amp"] = True
    assert "amp" not in C.identity(C.Config())
    assert C.diff(old, {**C.identity(C.Config()), "precision": "fp32"}) == []
    assert C.diff(old, {**C.identity(C.Config()), "precision": "bf16"}) == ["precision: 'fp32' -> 'bf16'"]
