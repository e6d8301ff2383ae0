"""`softcache run`: recipes load into the stage configs; finished stages are skipped, changed ones refused."""
from __future__ import annotations

from click.testing import CliRunner

from softcache.cli import cli
from softcache.pipeline import load_pipeline

RECIPE = """
[defaults]
data = "synthetic:20"
workers = 0
batch_size = 8
device = "cpu"

[teacher]
model = "resnet8"
epochs = {epochs}

[dump]
views = 2
layers = ["layer3"]

[[student]]
name = "kd_at"
student = "resnet8"
loss = ["kd", "at"]
pairs = {{ layer3 = "layer3" }}
epochs = 1
"""


def test_recipe_wires_the_stages_together(tmp_path):
    (tmp_path / "r.toml").write_text(RECIPE.format(epochs=1))
    p = load_pipeline(tmp_path / "r.toml", root=str(tmp_path / "runs"), seed=3)
    assert p.teacher.optim.epochs == 1 and p.teacher.optim.batch_size == 8 and p.teacher.seed == 3
    assert p.dump.teacher == ("resnet8",) and p.dump.weights == (str(tmp_path / "runs" / "teacher" / "model.pt"),)
    name, student = p.students[0]
    assert name == "kd_at" and student.cache == p.dump.out and student.pairs == (("layer3", "layer3"),)
    assert student.out == str(tmp_path / "runs" / "students" / "kd_at") and student.losses == ("kd", "at")


def test_rerun_skips_and_a_changed_stage_is_refused(tmp_path):
    recipe, root = tmp_path / "r.toml", str(tmp_path / "runs")
    recipe.write_text(RECIPE.format(epochs=1))
    first = CliRunner().invoke(cli, ["run", str(recipe), "--root", root])
    assert first.exit_code == 0, first.output
    again = CliRunner().invoke(cli, ["run", str(recipe), "--root", root])
    assert again.exit_code == 0 and again.output.count("skipped") == 3
    recipe.write_text(RECIPE.format(epochs=2))
    changed = CliRunner().invoke(cli, ["run", str(recipe), "--root", root])
    assert changed.exit_code != 0
    assert "holds a finished run made with other settings (optim.epochs differ)" in changed.stderr
    bad = tmp_path / "bad.toml"
    bad.write_text("[teacher]\nmodel = 'resnet8'\ndata = 'synthetic:20'\nepoch = 3\n")
    result = CliRunner().invoke(cli, ["run", str(bad), "--root", root])
    assert result.exit_code != 0 and "unknown key 'epoch' in [teacher]; valid:" in result.stderr


def test_shipped_recipes_load():
    from pathlib import Path
    recipes = sorted((Path(__file__).resolve().parents[1] / "pipelines").glob("*.toml"))
    assert [r.name for r in recipes] == ["cifar10_resnet56_resnet20.toml", "quickstart.toml"]
    cifar = load_pipeline(recipes[0])
    assert cifar.teacher.model == "resnet56" and cifar.dump.views == "all" and cifar.dump.data == "imagefolder:data/cifar10-jpeg"
    assert [s.student for _, s in cifar.students] == ["resnet20", "resnet20"]
    quick = load_pipeline(recipes[1])
    assert quick.teacher.data == "synthetic" and quick.students[1][1].losses == ("kd", "at")
