"""Typed configuration: presets and key=value overrides."""

import pytest

from tdm.config import Config, dump, resolve


def test_overrides_set_typed_fields():
    cfg = resolve("toy-gmm", ["student.steps=2", "optim.lr_fake=3e-4", "student.unify=[1,2,4]",
                              "teacher.guidance=2"])
    assert cfg.student.steps == 2 and type(cfg.student.steps) is int
    assert cfg.optim.lr_fake == 3e-4 and type(cfg.optim.lr_fake) is float  # YAML 1.1 reads '3e-4' as a string
    assert cfg.student.unify == [1, 2, 4] and all(type(k) is int for k in cfg.student.unify)
    assert cfg.teacher.guidance == 2.0 and type(cfg.teacher.guidance) is float
    assert cfg.preset == "toy-gmm" and cfg.tdm.importance_weight == "none"  # the preset applied
    assert cfg.tdm.interval == "separate"  # defaults kept


def test_presets_are_independent_and_round_trip():
    a = resolve("toy-gmm", ["student.unify=[1,2]"])
    b = resolve("toy-gmm")
    assert b.student.unify == [] and a.student.unify == [1, 2]
    c = resolve("toy-gmm-cond", ["tdm.huber_c=null", "optim.betas=[0.0, 0.999]"])
    assert c.teacher.guidance == 2.0 and c.tdm.huber_c is None and c.optim.betas == [0.0, 0.999]
    assert Config.from_dict(c.to_dict()) == c
    assert "toy-gmm-cond" in dump(c)


def test_unknown_preset():
    with pytest.raises(KeyError, match="unknown preset"):
        resolve("sdxl-nonexistent")


@pytest.mark.parametrize("override,exc", [
    ("student.stepz=2", KeyError),          # unknown field
    ("nosection.steps=2", KeyError),        # unknown section
    ("student=2", KeyError),                # a section is not a field
    ("student.steps=abc", ValueError),      # bad type
    ("student.steps=2.5", ValueError),
    ("student.steps=true", ValueError),     # bool is not an int here
    ("optim.lr_fake=fast", ValueError),
    ("student.unify=4", ValueError),        # list expected
    ("student.unify=[1,x]", ValueError),
    ("tdm.interval=foo", ValueError),       # bad choice
    ("net.prediction_type=score", ValueError),
    ("student.steps=0", ValueError),
    ("teacher.guidance=0.5", ValueError),
    ("student.steps", ValueError),          # no '='
])
def test_bad_overrides(override, exc):
    with pytest.raises(exc):
        resolve("toy-gmm", [override])
