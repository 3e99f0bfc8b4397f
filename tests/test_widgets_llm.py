"""LLMExplorer: weight bits x group size x method on a tiny GPT in a temporary cache, and its static twin."""

import html

import pytest
import torch

from workbench import Recipe, WorkbenchError, plots
from workbench import presets as P
from workbench.llm import closed_form_bits_per_weight
from workbench.widgets import LLMExplorer
from workbench.widgets.llm import FLOOR, label, recipe_for, static_figure

# One block of width 32 (MLP 128 wide), 20 steps: trains in about a second. Group sizes must divide
# 32 and 128: 16 does, the chapter's 128 does not (a setting the widget must refuse, in words).
TINY = P.LLM_BASE.replace(model_options=dict(block_size=16, n_layer=1, n_head=2, n_embd=32, steps=20, batch_size=8,
                                             warmup_steps=2))
BITS, GROUPS = (4, 2), (0, 16, 128)


@pytest.fixture(scope="module")
def explorer(tmp_path_factory):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model: more threads only fight over a shared machine's cores
    try:
        yield LLMExplorer(TINY, cache=tmp_path_factory.mktemp("llm-cache"), bits=BITS, groups=GROUPS)
    finally:
        torch.set_num_threads(threads)


def test_grid_recipes_are_the_chapters():
    for b in P.LLM_BITS:
        for g in P.LLM_GROUPS:
            for m in P.LLM_QUANT_METHODS:
                assert recipe_for(P.LLM_BASE, b, g, m) == P.llm_quant(b, g, m)  # one cache with the bench
    assert label(3, 0, "rtn") == "int3 per channel RTN" and label(4, 32, "gptq") == "int4 g32 GPTQ"
    with pytest.raises(WorkbenchError, match="method must be one of rtn, gptq, awq"):
        recipe_for(P.LLM_BASE, 4, 32, "smoothquant")
    with pytest.raises(WorkbenchError, match="bits must be an integer from 2 to 8"):
        recipe_for(P.LLM_BASE, 16, 32, "rtn")
    with pytest.raises(WorkbenchError, match="needs a GPT Recipe"):
        LLMExplorer(Recipe(model="cnn"))


def test_controls_move_the_current_point(explorer):
    assert explorer.controls() == {"bits": 4, "group": 0, "method": "gptq"}
    res = explorer.results[explorer.recipe()]
    assert explorer.curve.data[-1].x == (res.bits_per_weight,)
    assert explorer.curve.data[-1].y == (max(res.delta_bpc, FLOOR),)
    explorer.set_controls(group=16, method="rtn")
    res = explorer.results[explorer.recipe()]
    assert res.recipe == recipe_for(TINY, 4, 16, "rtn")
    # bits per weight from the packed bytes: 4-bit codes and a float32 scale per 16 weights
    assert res.bits_per_weight == closed_form_bits_per_weight(4, 16, symmetric=True) == 6.0
    assert explorer.curve.data[-1].x == (6.0,)
    rtn_line = explorer.curve.data[1]
    assert rtn_line.name == "RTN, g16" and rtn_line.x == (6.0,)
    explorer.bits.value = 2  # the control itself: the RTN line at g16 now has both widths, by bits/weight
    assert explorer.curve.data[1].x == (4.0, 6.0)
    assert explorer.curve.data[0].x == tuple(r.bits_per_weight for r in explorer.results.values()
                                             if r.recipe.weight_bits)  # every computed point in gray
    # the numbers and the same prompt continued by this model and by fp32
    sampled = explorer.results[explorer.recipe()].samples["sampled"]
    assert html.escape(sampled) in explorer.info.value
    assert html.escape(explorer.fp32.samples["sampled"]) in explorer.info.value
    assert "int2 g16 RTN" in explorer.headline and "4.00 bits/weight" in explorer.headline
    assert f"{explorer.results[explorer.recipe()].val_bpc:.4f} bits/char" in explorer.headline


def test_a_group_that_does_not_divide_is_refused_in_words(explorer):
    before = explorer.drawn()
    assert explorer.set_controls(group=128) is None
    assert "Cannot run this setting" in explorer.info.value and "does not divide" in explorer.info.value
    assert explorer.drawn() == before  # the last good figure stays
    explorer.set_controls(group=16)
    assert "Cannot run" not in explorer.info.value


def test_precompute_and_static_figure(explorer):
    results = explorer.precompute()
    assert len(results) == len(BITS) * 2 * len(P.LLM_QUANT_METHODS)  # group 128 cannot run: left out
    fig = static_figure(explorer)
    steps = fig.layout.sliders[0].steps
    grid = explorer.static_grid()
    assert len(steps) == len(grid) == 12 and all(s["group"] != 128 for s in grid)
    assert [s.label for s in steps[:3]] == ["int4 per channel RTN", "int4 per channel GPTQ", "int4 per channel AWQ"]
    assert len(fig.data) == 1 + 3 + 3  # every point, a line per method, unigram, fp32, current
    a = plots.step_traces(fig, 0)
    for k, setting in enumerate(grid):  # one definition: the widget draws exactly the step
        explorer.set_controls(**setting)
        assert explorer.drawn(list(a[0])) == plots.step_traces(fig, k)
        res = explorer.results[explorer.recipe()]
        title = steps[k].args[1]["title.text"]
        assert title.startswith(explorer.label(setting)) and f"{res.val_bpc:.4f} bits/char" in title
        assert html.escape(res.samples["sampled"][:20].replace("\n", "\u23ce"), quote=False) in title
    assert plots.step_traces(fig, 0) != plots.step_traces(fig, 7)  # the current point moves
