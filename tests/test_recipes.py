"""Bundled recipes and `--set KEY=VALUE` overrides, checked against TRL's and peft's dataclasses."""

import pytest

from ftlaunch.plan import recipe as recipes
from ftlaunch.errors import UserError

BUNDLED = sorted(recipes.recipe_paths())


def test_bundled_recipes_exist():
    assert {"default", "demo"} <= set(BUNDLED)
    assert "models" not in BUNDLED  # model facts are not a recipe


@pytest.mark.parametrize("name", BUNDLED)
def test_bundled_recipe_loads_and_validates(name):
    recipe = recipes.load_recipe(name)
    assert recipe.name == name
    assert recipe.method in recipes.METHODS
    assert recipe.seq_len >= 1 and recipe.global_batch_size >= 1
    checked = recipes.validate(recipe)
    assert set(checked.training) == set(recipe.training)
    assert set(checked.lora) == set(recipe.lora)
    if "learning_rate" in checked.training:
        assert isinstance(checked.training["learning_rate"], float)
    assert not set(checked.training) & set(recipes.PLAN_OWNED)


def test_recipe_loads_from_a_path(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("method: lora\nseq_len: 256\nglobal_batch_size: 4\n"
                    "training:\n  learning_rate: 1.0e-5\nlora:\n  r: 4\n", encoding="utf-8")
    recipe = recipes.validate(recipes.load_recipe(str(path)))
    assert recipe.name == "mine"
    assert (recipe.method, recipe.seq_len, recipe.global_batch_size) == ("lora", 256, 4)
    assert recipe.training["learning_rate"] == 1e-5
    assert recipe.lora["r"] == 4


@pytest.mark.parametrize("text, needle", [
    ("method: lora\nbogus: 1\n", "bogus"),
    ("method: sometimes\n", "method"),
    ("seq_len: -3\n", "seq_len"),
    ("- just\n- a list\n", "mapping"),
])
def test_bad_recipe_files(tmp_path, text, needle):
    path = tmp_path / "bad.yaml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(UserError) as info:
        recipes.load_recipe(str(path))
    assert needle in str(info.value)


def test_unknown_recipe_name():
    with pytest.raises(UserError) as info:
        recipes.load_recipe("no-such-recipe")
    assert "no-such-recipe" in str(info.value)


def _default_with(*sets):
    return recipes.apply_overrides(recipes.load_recipe("default"), list(sets))


def test_learning_rate_override_becomes_a_float():
    recipe = recipes.validate(_default_with("learning_rate=1e-4"))
    value = recipe.training["learning_rate"]
    assert isinstance(value, float)
    assert value == 1e-4


def test_lora_rank_override():
    recipe = recipes.validate(_default_with("lora.r=32"))
    assert recipe.lora["r"] == 32
    assert isinstance(recipe.lora["r"], int)
    assert recipe.lora["lora_alpha"] == recipes.load_recipe("default").lora["lora_alpha"]


def test_data_system_prompt_override():
    recipe = recipes.validate(_default_with("data.system_prompt=Hi"))
    assert recipe.data["system_prompt"] == "Hi"


def test_overrides_do_not_change_the_original():
    original = recipes.load_recipe("default")
    recipes.apply_overrides(original, ["learning_rate=1e-4", "lora.r=64"])
    assert original.lora["r"] == 16
    assert original.training["learning_rate"] == 2.0e-4


@pytest.mark.parametrize("override, named", [
    ("learning_rat=1", "learning_rat"),  # unknown training key
    ("lora.rank=8", "rank"),  # unknown LoRA key
    ("data.shuffle=true", "shuffle"),  # unknown data key
    ("max_steps=abc", "max_steps"),  # wrong type
])
def test_bad_override_is_a_user_error_naming_the_key(override, named):
    with pytest.raises(UserError) as info:
        recipes.validate(_default_with(override))
    assert named in str(info.value)


@pytest.mark.parametrize("assignment, needle", [
    ("foo", "--set 'foo' must look like KEY=VALUE"),
    ("=5", "--set '=5' must look like KEY=VALUE"),
    ("", "--set '' must look like KEY=VALUE"),
    ("max_length=5", "--set max_length is decided by --seq-len"),  # the plan owns it
    ("training.learning_rate=1e-4", "only lora.* and data.* keys are nested"),
])
def test_rejected_set_is_a_user_error(assignment, needle):
    with pytest.raises(UserError) as info:
        _default_with(assignment)
    assert needle in str(info.value)


def test_a_recipe_finds_its_files_beside_it_from_any_folder(tmp_path, monkeypatch):
    (tmp_path / "proj" / "data").mkdir(parents=True)
    recipe_file = tmp_path / "proj" / "r.yaml"
    recipe_file.write_text("data:\n  eval_data: data/eval.jsonl\n", encoding="utf-8")
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    recipe = recipes.load_recipe(str(recipe_file))
    assert recipe.data["eval_data"] == str(tmp_path / "proj" / "data" / "eval.jsonl")


def test_a_recipe_without_lora_settings_trains_what_the_plan_counts(tmp_path):
    """peft's own defaults (r 8, per-model targets) would train another adapter than the
    plan's: a recipe that leaves LoRA out gets ftlaunch's, the bundled recipes' values."""
    from ftlaunch.plan import job as job_mod

    path = tmp_path / "bare.yaml"
    path.write_text("description: no lora section\nmethod: lora\ntraining:\n  learning_rate: 1e-4\n")
    recipe = recipes.load_recipe(str(path))
    assert recipe.lora == recipes.LORA_DEFAULTS == recipes.load_recipe("default").lora
    with_bare = job_mod.resolve(job_mod.Options(model="llama-8b", recipe=str(path),
                                              hardware="1xH100-80GB"))
    bundled = job_mod.resolve(job_mod.Options(model="llama-8b", hardware="1xH100-80GB"))
    assert with_bare.plan.trainable_parameters == bundled.plan.trainable_parameters
