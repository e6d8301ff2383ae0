"""`softcache run`: recipes load into the stage configs; finished stages are skipped, changed ones refused."""
from __future__ import annotations

import json
import math
import re

import pytest
from click.testing import CliRunner

from softcache.cli import cli
from softcache.errors import SoftcacheError
from softcache.pipeline import load_pipeline
from softcache.store import open_cache
from softcache.store.manifest import stored_params

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


def accuracy_table(stdout: str) -> str:
    """The accuracy table `softcache run` prints (before the cost table)."""
    return next(block for block in stdout.split("\n\n") if block.startswith("run "))


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


def test_set_seeds_and_online_students(tmp_path):
    recipe = tmp_path / "r.toml"
    recipe.write_text(RECIPE.format(epochs=3) + '\n[[student]]\nname = "kd"\nstudent = "resnet8"\nseeds = [0, 4]\n'
                      '\n[[student]]\nname = "live"\nonline = true\nstudent = "resnet8"\nloss = ["kd"]\n')
    p = load_pipeline(recipe, root=str(tmp_path / "runs"), sets={"epochs": 1, "data": "synthetic:30", "lr": 0.2})
    assert p.teacher.optim.epochs == 1 and p.teacher.data == "synthetic:30" and p.dump.data == "synthetic:30"
    names = [name for name, _ in p.students]
    assert names == ["kd_at", "kd_s0", "kd_s4", "live"]
    students = dict(p.students)
    assert [students["kd_s0"].seed, students["kd_s4"].seed] == [0, 4]
    assert students["kd_s4"].out == str(tmp_path / "runs" / "students" / "kd_s4")
    assert all(s.optim.epochs == 1 and s.optim.lr == 0.2 for s in students.values())
    live = students["live"]  # train-online: the dump's teacher, weights, data and policy
    assert type(live).__name__ == "OnlineConfig" and live.teacher == "resnet8" and live.augment == p.dump.augment
    assert live.teacher_weights == str(tmp_path / "runs" / "teacher" / "model.pt") and live.data == "synthetic:30"
    for sets, message in [({"epoch": 1}, r"--set epoch: no stage has the key 'epoch'; valid: .*epochs"),
                          ({"epochs": "x"}, r"\[--set epochs\] epochs = \"x\" is a string; expected an integer")]:
        with pytest.raises(SoftcacheError, match=message):
            load_pipeline(recipe, sets=sets)
    with pytest.raises(SoftcacheError, match=r"--seed 3 would give every run of \[student kd\]"):
        load_pipeline(recipe, seed=3)
    result = CliRunner().invoke(cli, ["run", str(recipe), "--set", "epochs"])
    assert result.exit_code == 2 and "'epochs' is not KEY=VALUE" in result.stderr


def test_shipped_recipes_load():
    from pathlib import Path
    recipes = sorted((Path(__file__).resolve().parents[1] / "pipelines").glob("*.toml"))
    recipes.remove(recipes[0].parent / "cifar100_table.toml")  # run tiny below
    assert [r.name for r in recipes] == ["cifar10_function_matching.toml", "cifar10_resnet50_to_deit.toml",
                                         "cifar10_resnet56_resnet20.toml", "cifar10_vit_to_resnet18.toml",
                                         "quickstart.toml", "seed_resnet34_resnet18.toml"]
    deit = load_pipeline(recipes.pop(1))
    students = dict(deit.students)
    assert deit.teacher.model == "timm:resnet50,pretrained=true" and deit.dump.image_size == 224
    assert students["deit_hard"].losses == ("deit",) and students["deit_hard"].alpha == 0.5
    assert (students["deit_soft"].alpha, students["deit_soft"].temperature) == (0.1, 3.0)
    vit = load_pipeline(recipes.pop(2))
    assert vit.dump.layers == ("embedding", "blocks.11")
    assert vit.dump.weights == ("runs/cifar10_vit_to_resnet18/teacher/model.pt",)  # the fine-tuned teacher's
    assert dict(dict(vit.students)["vit_tiny_fitnets"].pairs) == {"blocks.11": "blocks.11"}
    matching = load_pipeline(recipes.pop(0))
    dumps = dict(matching.dumps)
    matched = dumps["matching"]
    assert (matched.auto_augment, matched.mixup, matched.cutmix, matched.reprob) == ("rand-m9-n2", 0.8, 1.0, 0.25)
    assert dumps["plain"].auto_augment == "" and dumps["plain"].mixup is None
    fm = dict(matching.students)["function_matching_s1"]
    assert (fm.alpha, fm.temperature, fm.losses) == (1.0, 1.0, ("kd",))
    cifar = load_pipeline(recipes[0])
    assert (cifar.teacher.model == "resnet56" and cifar.dump.views == "all"
            and cifar.dump.data == "imagefolder:data/cifar10-jpeg")
    assert {s.student for _, s in cifar.students} == {"resnet20"}
    assert [name for name, _ in cifar.students] == ["ce", "kd", "at", "kd_at", "fitnets", "sp", "rkd", "pkt", "crd"]
    seed = load_pipeline(recipes[2])
    assert seed.teacher.model == "resnet34" and len(seed.born_again.runs) == 3
    combined = dict(seed.students)["combined"]
    assert combined.alpha == 0.7 and dict(combined.weights) == {"fitnets": 0.5, "at": 0.3, "rkd": 0.2}
    quick = load_pipeline(recipes[1])
    assert quick.teacher.data == "synthetic" and quick.students[1][1].losses == ("kd", "at")


def test_an_interrupted_stage_resumes(tmp_path, monkeypatch):
    import torch
    from softcache.training import loop as train
    recipe = tmp_path / "r.toml"
    head, _, tail = RECIPE.format(epochs=1).rpartition("epochs = 1\n")
    recipe.write_text(head + "epochs = 3\n" + tail)  # the teacher trains 1 epoch, the student 3
    whole = CliRunner().invoke(cli, ["run", str(recipe), "--root", str(tmp_path / "whole")])
    assert whole.exit_code == 0, whole.output

    evaluate, calls = train.evaluate, []

    def interrupted(*args, **kwargs):  # Ctrl-C during the student's second epoch (the teacher evaluates once)
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return evaluate(*args, **kwargs)

    monkeypatch.setattr(train, "evaluate", interrupted)
    root = tmp_path / "runs"
    stopped = CliRunner().invoke(cli, ["run", str(recipe), "--root", str(root)])
    assert stopped.exit_code != 0 and len(calls) == 3
    student = root / "students" / "kd_at"
    assert (student / "checkpoint.pt").exists() and len((student / "metrics.jsonl").read_text().splitlines()) == 1
    monkeypatch.setattr(train, "evaluate", evaluate)
    again = CliRunner().invoke(cli, ["run", str(recipe), "--root", str(root)])
    assert again.exit_code == 0, again.output
    assert again.output.count("skipped") == 2 and "(resuming an unfinished run)" in again.output
    expected = torch.load(tmp_path / "whole" / "students" / "kd_at" / "model.pt", weights_only=True)
    resumed = torch.load(student / "model.pt", weights_only=True)
    assert all(torch.equal(expected[k], resumed[k]) for k in expected)
    assert [line.count('"epoch"') for line in (student / "metrics.jsonl").read_text().splitlines()] == [1, 1, 1]


@pytest.mark.parametrize("text, message", [
    ('[[student]]\nstudent = "resnet8"\ncache = "c"\nloss = "kd,at"\n',
     r'\[student student0\] loss = "kd,at" is a string; expected a list of strings, e.g. \["kd", "at"\]'),
    ('[teacher]\nmodel = "resnet8"\ndata = "synthetic"\nepochs = "3"\n',
     r'\[teacher\] epochs = "3" is a string; expected an integer'),
    ('[defaults]\nlr = true\n[teacher]\nmodel = "resnet8"\ndata = "synthetic"\n',
     r"\[defaults\] lr = true is a boolean; expected a number"),
    ('[[student]]\nname = "a"\nstudent = "resnet8"\ncache = "c"\npairs = ["layer3"]\n',
     r"\[student a\] pairs = \[\"layer3\"\] is a list; expected a table of strings"),
    ('[dump]\nteacher = "resnet8"\nweights = "w.pt"\ndata = "synthetic"\nviews = 2.5\n',
     r'\[dump\] views = 2.5 is a number; expected an integer or "all"'),
    ('[teacher]\nmodel = "resnet8"\n', r"\[teacher\] needs 'data' \(a string\), here or in \[defaults\]"),
    ('[[student]]\nstudent = "resnet8"\n', r"\[student student0\] needs 'cache' \(a string\), or a \[dump\]"),
    ('[dump]\nteacher = "resnet8"\ndata = "synthetic"\n', r"\[dump\] needs 'weights' \(a string or a list"),
    ('[defaults]\nseed = 1\n',
     r"has no stage; add a \[teacher\], a \[dump\], a \[\[student\]\] or a \[born_again\] section"),
    ('[student]\nstudent = "resnet8"\n', r"\[student\] must be an array of tables: write each student as"),
    ('[[student]]\nname = "a"\nstudent = "resnet8"\ncache = "c"\nseeds = [0, 0]\n', r"seeds = \[0, 0\] repeats a seed"),
    ('[[student]]\nname = "a"\nstudent = "resnet8"\ncache = "c"\nseeds = 2\n',
     r"\[student a\] seeds = 2 is an integer; expected a list of integers, e.g. \[0, 1\]"),
    ('[[student]]\nname = "a"\nstudent = "resnet8"\ncache = "c"\nonline = true\n',
     r"\[student a\] online = true needs cache = the \[\[dump\]\] whose teacher it runs"),
    ('[defaults]\nepoch = 1\n[teacher]\nmodel = "resnet8"\ndata = "synthetic"\n',
     r"unknown key 'epoch' in \[defaults\]; valid: root, alpha, augment, auto_augment, batch_size"),
    ('[defaults]\nroot = 5\n[teacher]\nmodel = "resnet8"\ndata = "synthetic"\n',
     r"\[defaults\] root = 5 is not a string; expected a folder"),
    # values are checked for every stage before the first one runs (the teacher would train for minutes)
    ('[teacher]\nmodel = "resnet8"\ndata = "synthetic"\n[dump]\nviews = -3\n',
     r"--views must be a positive number or 'all', got -3"),
    ('[teacher]\nmodel = "resnet8"\ndata = "synthetic"\n[dump]\nlogits = "topk:0"\n', r"bad --logits 'topk:0'"),
    ('[teacher]\nmodel = "resnet8"\ndata = "synthetic"\n[dump]\naugment = "imagenet"\ndata_path = "resident"\n',
     r"--data-path resident needs crop-only views \(cifar, none\)"),
    ('[teacher]\nmodel = "resnet8"\ndata = "synthetic"\n[dump]\n[[student]]\nstudent = "resnet8"\nloss = ["kdd"]\n',
     r"unknown loss 'kdd'; valid: "),
    ('[teacher]\nmodel = "resnet8"\ndata = "synthetic"\nepochs = 0\n', r"epochs = 0: it must be at least 1"),
    ('[teacher]\nmodel = "resnet8"\ndata = "synthetic"\ndevice = "cuda:7"\n'
     if not __import__("torch").cuda.is_available()
     else '[teacher]\nmodel = "resnet8"\ndata = "synthetic"\ndevice = "tpu"\n',
     r"device '.*' asks for CUDA, which this machine does not have|'tpu' is not a torch device"),
])
def test_recipe_values_of_the_wrong_type_are_one_line(tmp_path, text, message):
    recipe = tmp_path / "r.toml"
    recipe.write_text(text)
    result = CliRunner().invoke(cli, ["run", str(recipe), "--root", str(tmp_path / "runs")])
    assert result.exit_code != 0 and isinstance(result.exception, SystemExit), result.output
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.output
    assert re.search(message, result.stderr), result.stderr
    assert not (tmp_path / "runs").exists()


def test_a_recipe_that_is_not_utf8_is_one_line(tmp_path):
    recipe = tmp_path / "r.toml"
    recipe.write_bytes('[teacher]\nmodel = "resnet8"  # caf\u00e9\n'.encode("latin-1"))
    result = CliRunner().invoke(cli, ["run", str(recipe), "--root", str(tmp_path / "runs")])
    assert result.exit_code != 0 and isinstance(result.exception, SystemExit), result.output
    assert result.stderr.strip().splitlines() == [f"Error: '{recipe}' is not UTF-8 text (byte 34); a recipe is a TOML "
                                                  "file, which is UTF-8: save it as such"]


def test_run_with_a_device_this_machine_lacks_is_one_line(tmp_path):
    recipe = tmp_path / "r.toml"
    recipe.write_text('[teacher]\nmodel = "resnet8"\ndata = "synthetic"\n')
    device = "cuda" if not __import__("torch").cuda.is_available() else "nonsense"
    result = CliRunner().invoke(cli, ["run", str(recipe), "--root", str(tmp_path / "runs"), "--device", device])
    assert result.exit_code != 0 and isinstance(result.exception, SystemExit), result.output
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.output
    assert not (tmp_path / "runs").exists()


BORN_AGAIN = """
[defaults]
data = "synthetic:60"
workers = 0
batch_size = 16
device = "cpu"

[born_again]
model = "resnet8"
generations = 3
epochs = 2
views = 2
"""


def test_born_again_generations_and_their_ensemble(tmp_path):
    import numpy as np
    import torch
    from softcache.data import load_source
    from softcache.device import normalize
    from softcache.models import build_model
    recipe, root = tmp_path / "ban.toml", tmp_path / "runs"
    recipe.write_text(BORN_AGAIN)
    first = CliRunner().invoke(cli, ["run", str(recipe), "--root", str(root)])
    assert first.exit_code == 0, first.output
    table = accuracy_table(first.stdout)
    assert [line.split()[0] for line in table.splitlines()[2:]] == ["gen1", "gen2", "gen3", "ensemble"]
    gens = [root / "born_again" / f"gen{k}" for k in (1, 2, 3)]
    assert json.loads((gens[1] / "config.json").read_text())["cache"] == str(root / "born_again" / "gen1_cache")
    again = CliRunner().invoke(cli, ["run", str(recipe), "--root", str(root)])
    assert again.exit_code == 0 and again.output.count("skipped") == 5  # 3 generations, 2 caches

    # the ensemble by hand: every generation's softmax on the test split (the whole image is the eval view)
    test = load_source("synthetic:60", "test")
    images = torch.stack([test[i][0] for i in range(len(test))])
    probs = []
    for run in gens:
        model = build_model("resnet8", 10)
        model.load_state_dict(torch.load(run / "model.pt", weights_only=True))
        with torch.no_grad():
            probs.append(torch.softmax(model.eval()(normalize(images, test.mean, test.std)), dim=1).numpy())
    by_hand = 100.0 * float((np.mean(probs, axis=0).argmax(1) == test.labels).mean())
    listed = float(table.splitlines()[-1].split()[4].rstrip("%"))
    assert listed == pytest.approx(by_hand, abs=1e-9)
    saved = tmp_path / "ban.npz"
    result = CliRunner().invoke(cli, ["ensemble", *map(str, gens), "--save", str(saved), "--workers", "0"])
    assert result.exit_code == 0, result.output
    assert result.output.splitlines()[-1].startswith(f"{by_hand:7.2f}%  ensemble of 3")
    stored = np.load(saved)
    assert np.allclose(stored["probs"], np.stack(probs), atol=1e-5) and (stored["labels"] == test.labels).all()


def test_several_caches_and_students_naming_them(tmp_path):
    recipe = tmp_path / "r.toml"
    recipe.write_text(RECIPE.format(epochs=1).replace(
        '[dump]\nviews = 2\nlayers = ["layer3"]\n',
        '[[dump]]\nname = "logits"\nviews = 2\n\n[[dump]]\nname = "maps"\nviews = 2\nlayers = ["layer3"]\n'
        'targets = "attention"\n').replace('loss = ["kd", "at"]', 'cache = "maps"\nloss = ["kd", "at"]')
        + '\n[[student]]\nname = "kd"\nstudent = "resnet8"\ncache = "logits"\nepochs = 1\n')
    p = load_pipeline(recipe, root=str(tmp_path / "runs"))
    assert [name for name, _ in p.dumps] == ["logits", "maps"]
    assert [s.cache for _, s in p.students] == [str(tmp_path / "runs" / "caches" / "maps"),
                                                str(tmp_path / "runs" / "caches" / "logits")]
    ran = CliRunner().invoke(cli, ["run", str(recipe), "--root", str(tmp_path / "runs")])
    assert ran.exit_code == 0, ran.output
    recipe.write_text(recipe.read_text().replace('cache = "logits"', 'cache = "lgits"'))
    bad = CliRunner().invoke(cli, ["run", str(recipe), "--root", str(tmp_path / "runs")])
    assert bad.exit_code != 0 and bad.stderr.strip().splitlines() == [
        f"Error: [student kd] cache = \"lgits\" names no [[dump]] of this recipe (defined: logits, maps) and no cache "
        f"under '{tmp_path / 'runs'}'"]


def _run_tiny_recipe(name: str, tmp_path, cifar_subset, replace: dict[str, str] | None = None):
    """A shipped recipe on the CIFAR subset, 1 epoch a stage, 2 views a cache, on CPU: its `softcache run`."""
    from pathlib import Path
    text = (Path(__file__).resolve().parents[1] / "pipelines" / name).read_text()
    text = re.sub(r"epochs = \d+", "epochs = 1", text)
    text = re.sub(r"views = \d+", "views = 2", text)
    text = re.sub(r"batch_size = \d+", "batch_size = 40", text).replace("workers = 8", "workers = 0")
    for old, new in {**(replace or {}),
                     'data = "imagefolder:data/cifar10-jpeg"': f'data = "imagefolder:{cifar_subset}"'}.items():
        text = text.replace(old, new)
    (tmp_path / name).write_text(text)
    result = CliRunner().invoke(cli, ["run", str(tmp_path / name), "--root", str(tmp_path / "runs"),
                                      "--device", "cpu"])
    assert result.exit_code == 0, result.output
    return result


@pytest.mark.slow
def test_the_function_matching_recipe_runs_end_to_end_on_real_images(tmp_path, cifar_subset):
    """pipelines/cifar10_function_matching.toml on 12 images per class, 1 epoch a stage, 2 views a cache."""
    result = _run_tiny_recipe("cifar10_function_matching.toml", tmp_path, cifar_subset,
                              {'model = "resnet56"': 'model = "resnet8"',
                               'student = "resnet20"': 'student = "resnet8"'})
    rows = [line.split()[0] for line in accuracy_table(result.stdout).splitlines()[2:]]
    assert rows[0] == "teacher" and len(rows) == 7 and "function_matching" in " ".join(rows)
    cache = open_cache(tmp_path / "runs" / "caches" / "matching")
    assert cache.manifest["augment"]["mix"] == {"mixup": 0.8, "cutmix": 1.0, "prob": 1.0, "switch_prob": 0.5}
    plain = open_cache(tmp_path / "runs" / "caches" / "plain")
    assert "views/crc" in cache.names() and "views/crc" not in plain.names()


@pytest.mark.slow
def test_the_seed_recipe_runs_end_to_end_on_real_images(tmp_path, cifar_subset):
    """pipelines/seed_resnet34_resnet18.toml on 12 images per class, 1 epoch a stage, 2 views a cache."""
    result = _run_tiny_recipe("seed_resnet34_resnet18.toml", tmp_path, cifar_subset)
    rows = [line.split()[0] for line in accuracy_table(result.stdout).splitlines()[2:]]
    assert rows == ["teacher", "ce", "kd", "fitnets", "at", "rkd", "combined", "gen1", "gen2", "gen3", "ensemble"]
    metrics = json.loads((tmp_path / "runs" / "students" / "combined" / "metrics.jsonl").read_text().splitlines()[0])
    assert {"train_kd", "train_ce", "train_fitnets", "train_at", "train_rkd"} <= set(metrics)


def test_recipes_take_view_streams_pixel_work_and_mixing(tmp_path):
    recipe = tmp_path / "streams.toml"
    recipe.write_text('[teacher]\nmodel = "resnet8"\ndata = "synthetic"\n'
                      + '[dump]\naugment = "cifar"\nviews = 2\nmixup = 0.8\n'
                        'streams = { strong = "aa=rand-m9-n2,reprob=0.25" }\n'
                        '[[student]]\nname = "s"\nstudent = "resnet8"\nstream = "strong"\ntarget_stream = "main"\n')
    pipeline = load_pipeline(recipe)
    assert pipeline.dump.streams == (("strong", "aa=rand-m9-n2,reprob=0.25"),) and pipeline.dump.mixup == 0.8
    student = dict(pipeline.students)["s"]
    assert (student.stream, student.target_stream) == ("strong", "main")
    recipe.write_text(recipe.read_text().replace('streams = { strong = "aa=rand-m9-n2,reprob=0.25" }',
                                                 'streams = ["strong"]'))
    with pytest.raises(SoftcacheError, match=r"\[dump\] streams = \[\"strong\"\] is .*expected a table of strings"):
        load_pipeline(recipe)
    recipe.write_text(recipe.read_text().replace('streams = ["strong"]', 'streams = { strong = "aa=rand-m9-n2" }')
                      .replace('stream = "strong"', 'stream = "strnog"'))
    with pytest.raises(SoftcacheError, match=r"\[student s\] stream = \"strnog\" is not a view stream of its cache; "
                                             "its \\[dump\\] has: main, strong"):
        load_pipeline(recipe)


TINY = "depth={depth},img_size=32,patch_size=8,embed_dim={dim},num_heads=2"


@pytest.mark.slow
def test_the_cnn_to_deit_recipe_runs_end_to_end_on_real_images(tmp_path, cifar_subset):
    """pipelines/cifar10_resnet50_to_deit.toml at 32 px with small timm models and no downloads: the wiring of a
    timm teacher, its cache and DeiT students with the distillation head."""
    result = _run_tiny_recipe("cifar10_resnet50_to_deit.toml", tmp_path, cifar_subset, {
        'model = "timm:resnet50,pretrained=true"': 'model = "timm:resnet10t"',
        "timm:deit_tiny_distilled_patch16_224,pretrained=true":
            "timm:deit_tiny_distilled_patch16_224," + TINY.format(depth=1, dim=32),
        "timm:vit_tiny_patch16_224,pretrained=true": "timm:vit_tiny_patch16_224," + TINY.format(depth=1, dim=32),
        "image_size = 224": "image_size = 32"})
    rows = [line.split()[0] for line in accuracy_table(result.stdout).splitlines()[2:]]
    assert rows[0] == "teacher" and sorted(rows[1:]) == ["deit_hard", "deit_soft", "vit_ce", "vit_kd"]
    cache = open_cache(tmp_path / "runs" / "cache")
    assert cache.manifest["teachers"][0]["input"]["mean"] == [0.485, 0.456, 0.406]  # timm's, not CIFAR's
    hard = json.loads((tmp_path / "runs" / "students" / "deit_hard" / "metrics.jsonl").read_text().splitlines()[-1])
    assert {"train_ce", "train_deit"} <= set(hard)


@pytest.mark.slow
def test_the_vit_to_cnn_recipe_runs_end_to_end_on_real_images(tmp_path, cifar_subset):
    """pipelines/cifar10_vit_to_resnet18.toml at 32 px with 12-block but narrow timm ViTs and no downloads."""
    result = _run_tiny_recipe("cifar10_vit_to_resnet18.toml", tmp_path, cifar_subset, {
        "timm:vit_small_patch16_224,pretrained=true": "timm:vit_small_patch16_224," + TINY.format(depth=12, dim=32),
        "timm:vit_tiny_patch16_224,pretrained=true": "timm:vit_tiny_patch16_224," + TINY.format(depth=12, dim=16),
        "timm:resnet18,pretrained=true": "timm:resnet18", "image_size = 224": "image_size = 32"})
    rows = [line.split()[0] for line in accuracy_table(result.stdout).splitlines()[2:]]
    assert sorted(rows[1:]) == ["resnet18_ce", "resnet18_kd", "resnet18_kd_rkd", "vit_tiny_fitnets"]
    cache = open_cache(tmp_path / "runs" / "cache")
    assert cache.shape("features/blocks.11") == (120, 2, 17, 32) and cache.shape("features/embedding") == (120, 2, 32)
    metrics = (tmp_path / "runs" / "students" / "vit_tiny_fitnets" / "metrics.jsonl").read_text()
    fitnets = json.loads(metrics.splitlines()[-1])
    assert math.isfinite(fitnets["train_fitnets"])


@pytest.mark.slow
def test_the_cifar100_table_recipe_runs_end_to_end_on_real_images(tmp_path, cifar_subset):
    """pipelines/cifar100_table.toml on the CIFAR-10 subset (the recipe is class-count blind), 1 epoch a stage
    and 1 initialisation epoch, 2 views a cache, one seed, with the teachers' widths kept (ResNet-8x4 for 32x4,
    ResNet-8 for 56): every method of the table trains from its cache, for both pairs."""
    result = _run_tiny_recipe("cifar100_table.toml", tmp_path, cifar_subset, {
        'data = "cifar100:data/cifar100"': f'data = "imagefolder:{cifar_subset}"', "resnet32x4": "resnet8x4",
        "resnet56": "resnet8", 'views = "all"': "views = 2", "seeds = [0, 1, 2]": "seeds = [0]",
        "init_epochs = 30": "init_epochs = 1"})
    rows = [line.split()[0] for line in accuracy_table(result.stdout).splitlines()[2:]]
    methods = ["ce", "kd", "fitnets", "at", "sp", "cc", "vid", "rkd", "pkt", "ab", "ft", "fsp", "nst", "crd", "kdsvd",
               "ofd", "reviewkd", "simkd", "dkd", "dist", "kd_ls", "ctkd", "mlkd"]
    assert rows == ["teacher", "teacher"] + [f"{pair}_{m}_s0" for pair in ("r32x4", "r56") for m in methods]
    students = tmp_path / "runs" / "students"
    for run, terms in {"r32x4_reviewkd": {"train_ce", "train_reviewkd"}, "r56_ofd": {"train_ofd"},
                       "r32x4_simkd": {"train_simkd"}, "r56_dkd": {"train_dkd"}, "r32x4_fsp": {"train_ce"}}.items():
        records = [json.loads(line) for line in (students / f"{run}_s0" / "metrics.jsonl").read_text().splitlines()]
        assert terms <= set(records[-1]) and all(math.isfinite(r["train_loss"]) for r in records), run
    ab = [json.loads(line) for line in (students / "r56_ab_s0" / "metrics.jsonl").read_text().splitlines()]
    assert [r.get("stage", "main") for r in ab] == ["init", "main"] and "train_ab" in ab[0]
    assert "classifier/weight" in stored_params(open_cache(tmp_path / "runs" / "caches" / "stages_r32x4").manifest)
