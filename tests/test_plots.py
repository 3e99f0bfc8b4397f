"""plots: the static slider figure (the explorers' twin on the site) and the bar labels."""

import plotly.graph_objects as go
import pytest

from workbench import plots


def _panels(k: float) -> list[go.Figure]:
    left = go.Figure([go.Scatter(x=[1, 2, 3], y=[k, 2 * k, 3 * k], name=f"k = {k}"),
                      go.Bar(x=["a", "b"], y=[k, k + 1])])
    left.update_layout(title=f"left {k}", xaxis=dict(title="x", type="log"), yaxis=dict(title="y"))
    right = go.Figure([go.Scatter(x=[0, 1], y=[k, k], yaxis="y"), go.Scatter(x=[0, 1], y=[1, k], yaxis="y2")])
    right.update_layout(title=f"right {k}", yaxis=dict(title="loss", type="log"),
                        yaxis2=dict(title="accuracy", overlaying="y", side="right", tickformat=".0%"))
    return [left, right]


def test_slider_figure_restyles_every_trace_and_the_titles():
    fig = plots.slider_figure([(f"{k}", f"k is {k}", _panels(k)) for k in (1, 2, 5)], prefix="k: ", active=1)
    steps = fig.layout.sliders[0].steps
    assert len(steps) == 3 and fig.layout.sliders[0].active == 1 and len(fig.data) == 4
    assert all(s.method == "update" for s in steps)
    assert fig.layout.title.text == "k is 2" and fig.data[0].y == (2, 4, 6)  # drawn at the active step
    assert steps[2].args[1] == {"title.text": "k is 5", "annotations[0].text": "left 5",
                                "annotations[1].text": "right 5"}
    assert plots.step_traces(fig, 2)[0]["y"] == [5, 10, 15] and plots.step_traces(fig, 0)[3]["y"] == [1, 1]
    assert plots.step_traces(fig, 2)[0]["name"] == "k = 5"
    # axes come along: the log x of the left panel, the right panel's second y axis
    assert fig.layout.xaxis.type == "log" and fig.layout.yaxis.title.text == "y"
    assert fig.data[3].yaxis != fig.data[2].yaxis
    assert {fig.layout[a].title.text for a in ("yaxis2", "yaxis3")} == {"loss", "accuracy"}
    html = plots.bundle(fig)["text/html"]
    assert "cdn.plot.ly" not in html and "Plotly.newPlot" in html  # drawn by the site's local plotly.js


def test_slider_figure_refuses_mismatched_steps():
    one, two = _panels(1), _panels(2)
    two[0].add_scatter(x=[1], y=[1])
    with pytest.raises(ValueError, match="same number of traces"):
        plots.slider_figure([("1", "", one), ("2", "", two)])
    with pytest.raises(ValueError, match="must place"):
        plots.slider_figure([("1", "", one)], rows=(3,))


def test_rows_of_panels():
    fig = plots.slider_figure([("1", "t", _panels(1) + [go.Figure(go.Scatter(x=[1], y=[1]))])], rows=(2, 1))
    assert len(fig.data) == 5 and fig.layout.height > 2 * 330


@pytest.mark.parametrize("n_series", [2, 5])
def test_bar_labels_do_not_overlap(n_series):
    fig = plots.bars(["0%", "50%", "90%"], {f"s{i}": [1000.0, 500.0, 100.0] for i in range(n_series)}, y_title="KB")
    assert fig.layout.uniformtext.mode == "hide"  # a label that does not fit is hidden, not overlapped
    assert all(t.textangle == (-90 if n_series > 3 else 0) for t in fig.data)  # many narrow bars: vertical labels
    assert fig.layout.yaxis.range[1] > 1000  # room for the labels above the tallest bar
