"""Recipes: the one source of a bundle's hyper-parameters, ordered by what they read, resumable stage by stage."""

import json
import os
from dataclasses import replace
from pathlib import Path

import pytest

from softdimo.sampler import SamplerSettings
from softdimo.train.recipe import RecipeError, build, load_recipe, order, run_all
from softdimo.train.teacher import TeacherTraining
from softdimo.train.tokenizer import TokenizerTraining
from softdimo.transformer import TransformerConfig

RECIPES = Path(__file__).parents[2] / "recipes"

TINY_TOKENIZER_RECIPE = """
stage = "tokenizer"
out = "{out}"
run_dir = "{run}"

[tokenizer]
encoder = "dictionary"
dictionary_size = 32
dictionary_dim = 4
stem = 8
channels = [16]
blocks = 1

[training]
steps = 3
batch_size = 4
dictionary_images = 8
eval_images = 5
eval_every = 3
"""


def test_tables_fill_dataclasses_and_overrides_win(tmp_path):
    path = tmp_path / "r.toml"
    path.write_text(
        'stage = "teacher"\nout = "w/t"\n[inputs]\ntokenizer = "w/tok"\n[training]\nsteps = 10\nlr = 3e-4\n'
    )
    recipe = load_recipe(path, overrides=["training.steps=20", "training.schedule=arccos"])
    training = build(TeacherTraining, recipe.table("training"))
    assert (training.steps, training.lr, training.schedule) == (20, 3e-4, "arccos")
    assert training.batch_size == TeacherTraining().batch_size  # left out: the dataclass default
    assert recipe.inputs == {"tokenizer": Path("w/tok")} and recipe.run_dir == Path("runs/t")


def test_unknown_fields_stages_and_inputs_are_refused(tmp_path):
    path = tmp_path / "r.toml"
    path.write_text('stage = "teacher"\nout = "w/t"\n[training]\nstepz = 10\n')
    with pytest.raises(RecipeError, match="no field stepz"):
        build(TeacherTraining, load_recipe(path).table("training"))
    path.write_text('stage = "painter"\nout = "w/t"\n')
    with pytest.raises(RecipeError, match="stage must be one of"):
        load_recipe(path)
    path.write_text('stage = "teacher"\nout = "w/t"\n[inputs]\nteacherr = "x"\n')
    with pytest.raises(RecipeError, match="unknown inputs teacherr"):
        load_recipe(path)


def test_cpu_teacher_comparisons_each_change_the_shipped_text_teacher_only_where_they_say():
    shipped = load_recipe(RECIPES / "shapes-teacher-text.toml")
    base = load_recipe(RECIPES / "text-teacher-cpu" / "base.toml")
    same = lambda recipe: {k: v for k, v in recipe.data.items() if k not in ("out", "training")}  # noqa: E731
    assert same(base) == same(shipped)
    changes = {
        "kinds": {"kind_weights"},
        "grid": {"position_init"},
        "kinds-grid": {"kind_weights", "position_init"},
        "batch32": {"steps", "batch_size"},
    }
    assert {path.stem for path in (RECIPES / "text-teacher-cpu").glob("*.toml")} == {"base", *changes}
    for name, keys in changes.items():
        variant = load_recipe(RECIPES / "text-teacher-cpu" / f"{name}.toml")
        assert {k for k, v in variant.table("training").items() if base.table("training").get(k) != v} == keys, name
        build(TeacherTraining, variant.table("training"))
    with pytest.raises(ValueError, match="random or grid"):
        TeacherTraining(position_init="sincos")


def _shipped_config(recipe) -> dict:
    return json.loads((RECIPES.parent / recipe.data["out"] / "config.json").read_text())


@pytest.mark.parametrize("name", ["shapes-teacher-text", "shapes-teacher-text-medium", "shapes-teacher-class"])
def test_teacher_recipes_with_todays_defaults_build_the_shipped_teachers(name):
    """A table key a recipe leaves out takes the dataclass default: a default that drifts from what shipped fails."""
    recipe = load_recipe(RECIPES / f"{name}.toml")
    shipped = _shipped_config(recipe)
    sizes = {
        k: shipped["transformer"][k] for k in ("codebook_size", "tokens", "text_vocab", "text_length", "num_classes")
    }
    assert build(TransformerConfig, recipe.table("transformer"), **sizes) == TransformerConfig.from_dict(
        shipped["transformer"]
    )
    assert build(TeacherTraining, recipe.table("training")) == TeacherTraining(**shipped["training"])
    assert build(SamplerSettings, recipe.table("sampler")) == SamplerSettings(**shipped["sampler"])


def test_the_tokenizer_recipe_with_todays_defaults_builds_the_shipped_tokenizer():
    recipe = load_recipe(RECIPES / "shapes-tokenizer.toml")
    assert build(TokenizerTraining, recipe.table("training")) == TokenizerTraining(
        **_shipped_config(recipe)["training"]
    )


@pytest.mark.parametrize(
    "name", ["shapes-softdimo-text", "shapes-teacher-text", "shapes-teacher-text-medium", "shapes-teacher-class"]
)
def test_the_models_draw_under_the_check_their_recipes_state(name):
    from softdimo.draw_check import DrawCheck

    recipe = load_recipe(RECIPES / f"{name}.toml")
    shipped = _shipped_config(recipe)
    assert DrawCheck(**shipped["check"]) == build(DrawCheck, recipe.table("check"))
    assert shipped["rewards"] == [os.path.relpath(recipe.inputs["reward"], recipe.out)]


def test_config_defaults_are_the_shipped_models_settings():
    """SamplerSettings, TransformerConfig and TeacherTraining default to the shipped text teacher's (contrast
    guidance aside, which class prompts cannot take), TokenizerTraining to the shipped tokenizer's training."""
    text = _shipped_config(load_recipe(RECIPES / "shapes-teacher-text.toml"))
    assert TeacherTraining() == TeacherTraining(**text["training"])
    assert replace(SamplerSettings(), contrast=True) == SamplerSettings(**text["sampler"])
    default = TransformerConfig(text_vocab=1)
    assert (default.width, default.depth, default.heads) == tuple(
        text["transformer"][k] for k in ("width", "depth", "heads")
    )
    assert TokenizerTraining() == TokenizerTraining(
        **_shipped_config(load_recipe(RECIPES / "shapes-tokenizer.toml"))["training"]
    )


def test_shipped_recipes_run_in_dependency_order():
    recipes = order([load_recipe(p) for p in sorted(RECIPES.glob("*.toml"))])
    position = {r.out.resolve(): i for i, r in enumerate(recipes)}
    for i, recipe in enumerate(recipes):
        for bundle in recipe.inputs.values():
            if bundle.resolve() in position:
                assert position[bundle.resolve()] < i, f"{recipe.path} runs before the {bundle} it reads"
    assert {r.out.name for r in recipes} >= {
        "shapes-tokenizer",
        "shapes-features",
        "shapes-clip",
        "shapes-teacher-text",
        "shapes-teacher-text-medium",
        "shapes-teacher-class",
        "shapes-softdimo-text",
        "shapes-softdimo-class",
    }


def test_a_stage_runs_once_is_skipped_when_done_and_guards_its_run(tmp_path, capsys, one_thread):
    import torch

    path = tmp_path / "tokenizer.toml"
    path.write_text(TINY_TOKENIZER_RECIPE.format(out=tmp_path / "bundle", run=tmp_path / "run"))
    run_all([path], torch.device("cpu"))
    assert (tmp_path / "bundle" / "manifest.json").exists()
    first = capsys.readouterr().out
    assert "training tokenizer" in first and "all stages" in first
    run_all([path], torch.device("cpu"))
    assert ": done (" in capsys.readouterr().out
    with pytest.raises(RecipeError, match="another version"):  # same run folder, other training values
        run_all([path], torch.device("cpu"), overrides=["training.lr=0.5"])
    run_all([path], torch.device("cpu"), overrides=["training.steps=5"])  # longer: the run goes on from its checkpoint
    assert "resuming tokenizer from step 3" in capsys.readouterr().out


def test_a_variant_states_only_what_differs_from_its_base(tmp_path):
    (tmp_path / "base.toml").write_text(
        'stage = "distill"\nout = "w/a"\nrun_dir = "runs/a"\n[training]\nsteps = 10\ngan_weight = 0.1\n'
    )
    (tmp_path / "variant.toml").write_text('base = "base.toml"\nout = "w/b"\n[training]\ngan_weight = 0.0\n')
    variant = load_recipe(tmp_path / "variant.toml")
    assert variant.table("training") == {"steps": 10, "gan_weight": 0.0}
    assert variant.out == Path("w/b") and variant.run_dir == Path("runs/b")  # never the base's run folder


def test_ablation_recipes_differ_from_the_shipped_recipe_only_where_they_say():
    ablations = sorted((RECIPES / "ablations").glob("*.toml"))
    assert {path.stem.split("-")[0] for path in ablations} == {"class", "text"}
    for path in ablations:
        conditioning = path.stem.split("-")[0]  # class-gan.toml: shapes-softdimo-class
        shipped = load_recipe(RECIPES / f"shapes-softdimo-{conditioning}.toml")
        variant = load_recipe(path)
        assert variant.inputs == shipped.inputs and variant.table("generator") == shipped.table("generator")
        changed = {k for k, v in variant.table("training").items() if shipped.table("training").get(k) != v}
        assert changed and changed <= {"dimo_weight", "gan_weight", "reward_weight", "relaxation"}, path


def test_independent_stages_train_side_by_side_and_a_failed_one_names_its_log(tmp_path, capsys):
    from softdimo.train.recipe import run_parallel

    paths = []
    for name in ("a", "b"):
        paths.append(tmp_path / f"{name}.toml")
        paths[-1].write_text(TINY_TOKENIZER_RECIPE.format(out=tmp_path / name / "bundle", run=tmp_path / name / "run"))
    run_parallel(paths, "cpu", jobs=2)
    printed = capsys.readouterr().out
    assert (tmp_path / "a" / "bundle" / "manifest.json").exists() and (
        tmp_path / "b" / "bundle" / "manifest.json"
    ).exists()
    threads = max(1, (os.cpu_count() or 1) // 2)
    assert printed.count("training tokenizer") == 2 and f"({threads} threads" in printed and "2 at a time" in printed
    run_parallel(paths, "cpu", jobs=2)  # done stages are skipped, as by run_all
    assert capsys.readouterr().out.count(": done (") == 2

    broken = tmp_path / "broken.toml"
    broken.write_text(
        TINY_TOKENIZER_RECIPE.format(out=tmp_path / "c" / "bundle", run=tmp_path / "c" / "run").replace(
            "steps = 3", "steps = 0"
        )
    )
    with pytest.raises(RecipeError, match="training.steps must be a whole number of at least 1"):
        load_recipe(broken)
    child = tmp_path / "teacher.toml"  # a well-formed recipe whose stage fails: the bundle it reads is not there
    child.write_text(
        f'stage = "teacher"\nout = "{tmp_path / "c" / "bundle"}"\nrun_dir = "{tmp_path / "c" / "run"}"\n'
        f'conditioning = "class"\n[inputs]\ntokenizer = "{tmp_path / "missing"}"\n'
    )
    with pytest.raises(RecipeError, match="1 stage"):
        run_parallel([child], "cpu", jobs=2)
    assert "see " + str(tmp_path / "c" / "run" / "train.log") in capsys.readouterr().out
    assert "missing" in (tmp_path / "c" / "run" / "train.log").read_text()


def test_profiling_times_a_stage_without_training_or_writing_it(tmp_path, capsys, one_thread):
    from softdimo.cli import main
    from tests.tiny_bundles import write_tokenizer

    tokenizer = tmp_path / "tokenizer.toml"
    tokenizer.write_text(TINY_TOKENIZER_RECIPE.format(out=tmp_path / "tokenizer", run=tmp_path / "tokenizer-run"))
    teacher = tmp_path / "teacher.toml"
    teacher.write_text(
        f'stage = "teacher"\nout = "{tmp_path / "teacher"}"\nrun_dir = "{tmp_path / "teacher-run"}"\n'
        'conditioning = "class"\n'
        f'[inputs]\ntokenizer = "{write_tokenizer(tmp_path / "tiny-tokenizer")}"\n'
        "[transformer]\nwidth = 16\ndepth = 1\nheads = 2\n"
        "[training]\nsteps = 1000\nbatch_size = 2\neval_every = 300\neval_prompts = 2\n[sampler]\nsteps = 2\n"
    )
    assert main(["train", str(tokenizer), str(teacher), "--profile", "2", "--device", "cpu"]) == 0
    lines = {
        line.split(": ")[0]: line for line in capsys.readouterr().out.splitlines()
    }  # stages print their own lines too
    assert "x 3 steps, 1 evaluations x" in lines[str(tokenizer)]
    assert "x 1,000 steps, 4 evaluations x" in lines[str(teacher)] and "model_ms" in lines[str(teacher)]
    assert "2 stages one after another" in lines
    for name in ("tokenizer", "tokenizer-run", "teacher", "teacher-run"):  # nothing trained, nothing written
        assert not (tmp_path / name).exists()


def test_a_timed_run_reports_its_measured_cost_in_place_of_training(tmp_path):
    from softdimo.train import loop

    calls = []
    with pytest.raises(loop.Timed) as timed, loop.timed(3):
        loop.run(
            run_dir=tmp_path / "run",
            modules={},
            optimizers={},
            step_fn=lambda step: calls.append(step) or {},
            steps=50,
            eval_fn=lambda step: calls.append(f"eval {step}") or {},
            eval_every=20,
        )
    assert calls == [0, 1, 2, 3, "eval 50"]  # one warm-up step, three timed, one evaluation
    cost = timed.value.cost
    assert (cost.steps, cost.evaluations) == (50, 3)  # at 20, 40 and the last step
    assert cost.total_s == pytest.approx(cost.setup_s + 50 * cost.step_s + 3 * cost.eval_s)
    assert not (tmp_path / "run").exists()
