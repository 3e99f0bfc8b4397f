"""The pipeline's table of steps: every Recipe field belongs to one step, and a new technique is one entry."""

import dataclasses
from dataclasses import dataclass

import pytest
import torch
from torch import nn

from workbench import Recipe, WorkbenchError, load, run
from workbench.recipe import cache as cache_mod
from workbench.recipe import steps as steps_mod
from workbench.recipe.steps import Context, Step

FAST = dict(model="mlp", dataset="digits", epochs=2, latency_repeats=5, model_options={"hidden": [32]})


def test_every_recipe_field_belongs_to_exactly_one_step():
    owners = [f for s in steps_mod.STEPS for f in s.fields]
    assert sorted(owners) == sorted(f.name for f in dataclasses.fields(Recipe))
    assert len(owners) == len(set(owners))
    compress = [s for s in steps_mod.STEPS if s.kind == "compress" and s.apply is not None]
    assert [s.name for s in compress] == ["prune", "share", "fold_bn", "quantize", "ort_quant"]
    assert all(s.record is not None for s in compress)


def test_a_field_that_belongs_to_no_step_is_refused():
    @dataclass(frozen=True)
    class Orphan(Recipe):
        clip_weights: float = 0.0

    with pytest.raises(WorkbenchError, match="clip_weights belong to no step"):
        steps_mod.check_table(Orphan)
    twice = steps_mod.STEPS + (Step("again", "compress", ("prune_amount",), lambda r: False, lambda r: None),)
    with pytest.raises(WorkbenchError, match="claimed by two steps"):
        steps_mod.check_table(Recipe, twice)
    ghost = steps_mod.STEPS + (Step("ghost", "train", ("no_such_field",), lambda r: False, lambda r: None),)
    with pytest.raises(WorkbenchError, match="does not have"):
        steps_mod.check_table(Recipe, ghost)


def test_derived_views_follow_the_table():
    r = Recipe(**FAST, prune_amount=0.5, finetune_lr=0.01, fold_bn=False, weight_bits=8)
    assert r.active_steps() == ("train", "measure", "finetune", "prune", "quantize")
    assert r.compressed and not r.dense().compressed
    assert set(steps_mod.COMPRESSION_FIELDS) == {f for s in steps_mod.STEPS if s.kind == "compress" for f in s.fields}
    assert r.without("quantize") == Recipe(**FAST, prune_amount=0.5, finetune_lr=0.01)
    with pytest.raises(WorkbenchError, match="unknown pipeline step 'prunning'"):
        r.without("prunning")


def test_settings_of_a_step_that_is_off_do_not_enter_the_key():
    base = Recipe(**FAST)
    # prune_kind/finetune_lr configure steps that are off here: the same training, the same key.
    for off in (dict(prune_kind="structured"), dict(finetune_lr=0.5), dict(quant_granularity="per-tensor"),
                dict(kd_temperature=2.0), dict(share_bits_conv=4)):
        assert cache_mod.key(base.replace(**off), "zoo:mlp", "d") == cache_mod.key(base, "zoo:mlp", "d"), off
    # ... while every setting of an active step does.
    for on in (dict(epochs=3), dict(lr_schedule="cosine"), dict(threads=2)):
        assert cache_mod.key(base.replace(**on), "zoo:mlp", "d") != cache_mod.key(base, "zoo:mlp", "d"), on
    pruned = base.replace(prune_amount=0.5)
    assert (cache_mod.key(pruned.replace(prune_kind="structured"), "zoo:mlp", "d")
            != cache_mod.key(pruned, "zoo:mlp", "d"))


def test_a_cache_hit_carries_the_recipe_that_was_asked_for(tmp_path):
    first = run(Recipe(**FAST, export_onnx=False), cache=tmp_path, progress=False)
    other = Recipe(**FAST, export_onnx=False, prune_kind="structured")  # pruning is off: same run
    hit = run(other, cache=tmp_path, progress=False)
    assert hit.cached and hit.key == first.key and hit.recipe == other


# --- Adding a technique: what it takes. ---------------------------------------------------------
# Before the table, a step took about 11 edits in recipe.py and cli.py, three of them silent if
# missed (COMPRESSION_FIELDS, `compressed`, the cache key's omit list). Now it takes two: the field
# on Recipe, and one Step entry (fields, active, validate, apply, record). Here both are made in a
# test, not in the product: a `clip_weights` step that clamps every weight to +-c.

@dataclass(frozen=True)
class ClipRecipe(Recipe):
    clip_weights: float = 0.0  # edit 1 of 2: the setting


@dataclass(frozen=True)
class ClipRecord:
    clipped: int

    def to_dict(self):
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d):
        return cls(**d)


def _validate_clip(r):
    if not (isinstance(r.clip_weights, (int, float)) and r.clip_weights >= 0):
        raise WorkbenchError(f"Recipe.clip_weights must be >= 0, got {r.clip_weights!r}")


def _apply_clip(ctx: Context) -> ClipRecord:
    c = ctx.recipe.clip_weights
    clipped = 0
    with torch.no_grad():
        for m in ctx.net.modules():
            if isinstance(m, nn.Linear):
                clipped += int((m.weight.abs() > c).sum())
                m.weight.clamp_(-c, c)
    return ClipRecord(clipped)


CLIP = Step("clip", "compress", ("clip_weights",), lambda r: r.clip_weights > 0, _validate_clip, _apply_clip,
            ClipRecord)  # edit 2 of 2: the step, in the table


def test_adding_a_step_is_one_field_and_one_table_entry(monkeypatch, tmp_path):
    dense = run(Recipe(**FAST), cache=tmp_path, progress=False)  # cached before the step existed
    table = steps_mod.STEPS[:-1] + (CLIP,) + steps_mod.STEPS[-1:]  # before the ONNX step, like any model step
    monkeypatch.setattr(steps_mod, "STEPS", table)
    steps_mod.check_table(ClipRecipe)
    # Every existing key is unchanged: a step that is off does not enter it.
    assert run(ClipRecipe(**FAST), cache=tmp_path, progress=False).cached
    r = ClipRecipe(**FAST, clip_weights=0.05)
    assert r.compressed and r.dense() == ClipRecipe(**FAST) and "clip" in r.active_steps()
    with pytest.raises(WorkbenchError, match="clip_weights must be >= 0"):
        ClipRecipe(**FAST, clip_weights=-1.0)
    clipped = run(r, cache=tmp_path, progress=False)
    assert not clipped.cached and clipped.dense_accuracy == dense.accuracy
    assert clipped.steps["clip"].clipped > 0
    model = clipped.load_model()
    limit = float(torch.tensor(0.05))  # clamp_ bounds by the float32 nearest to 0.05
    assert max(float(m.weight.detach().abs().max()) for m in model.modules() if isinstance(m, nn.Linear)) <= limit
    ds = load("digits")
    with torch.no_grad():
        assert clipped.test_correct == int((model(ds.X_test).argmax(1) == ds.y_test).sum())
    again = run(r, cache=tmp_path, progress=False)
    assert again.cached and again.steps["clip"] == clipped.steps["clip"] and again.recipe == r
