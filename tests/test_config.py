"""Typed configuration: presets and key=value overrides."""

import pytest
import yaml

from tdm.cli import main
from tdm.config import PRESETS, Config, dump, resolve
from tdm.families import ONLY


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


def test_config_file_sections_then_overrides(tmp_path):
    """A --config file: nested sections, dotted keys and top-level fields; a text field reads its value as written
    (YAML would make `no` False); the command line wins; a later key wins; values checked as overrides are."""
    f = tmp_path / "run.yaml"
    f.write_text("preset: toy-gmm-cond\nstudent:\n  steps: 2\n  unify: [1, 2]\ntrain:\n  mixed_precision: no\n"
                 "  iterations: 7\n  seed: 3\noptim.lr_fake: 3e-4\ntrain.seed: 4\n")
    cfg = resolve(None, ["train.iterations=9"], config_file=f)
    assert cfg.preset == "toy-gmm-cond" and cfg.teacher.guidance == 2.0  # the preset, from the file
    assert cfg.student.steps == 2 and cfg.student.unify == [1, 2] and cfg.train.mixed_precision == "no"
    assert cfg.optim.lr_fake == 3e-4 and cfg.train.seed == 4 and cfg.train.iterations == 9
    assert resolve("toy-gmm-cond", ["student.steps=2", "student.unify=[1,2]", "train.mixed_precision=no",
                                    "optim.lr_fake=3e-4", "train.seed=4", "train.iterations=9"]) == cfg
    # an override fixes a value the file got wrong: the final config is what is checked
    f.write_text("train:\n  keep_checkpoints: 0\n")
    assert resolve("toy-gmm", ["train.keep_checkpoints=3"], config_file=f).train.keep_checkpoints == 3
    with pytest.raises(ValueError, match=r"run.yaml:2: train.keep_checkpoints=0"):
        resolve("toy-gmm", config_file=f)


def test_presets_show_is_a_config_file_of_the_fields_read(tmp_path, capsys):
    """`tdm presets --show NAME` prints what the family reads (tdm.families.ONLY) and is itself a --config file."""
    for name in PRESETS:
        assert main(["presets", "--show", name]) == 0
        f = tmp_path / f"{name}.yaml"
        f.write_text(capsys.readouterr().out)
        assert resolve(None, config_file=f) == resolve(name), name
        shown = yaml.safe_load(f.read_text())
        family, keys = shown["teacher"]["family"], {f"{s}.{k}" for s, v in shown.items() if isinstance(v, dict)
                                                    for k in v}
        assert {k for k, fams in ONLY.items() if family not in fams}.isdisjoint(keys), name
        assert {k for k, fams in ONLY.items() if family in fams} <= keys, name
        assert not {"dmd2", "consistency"} & set(shown), name  # the method that runs is tdm
    sdxl = yaml.safe_load((tmp_path / "sdxl.yaml").read_text())
    assert "net" not in sdxl and "mixture" not in sdxl["teacher"] and "unify" in sdxl["student"]
    assert sdxl["lora"]["rank"] == 64 and "validation_prompts" in sdxl["train"]
