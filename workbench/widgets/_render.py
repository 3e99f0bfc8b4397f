"""Drawing an explorer's plotly figures into its Output widgets (shared by every explorer)."""

from __future__ import annotations

from typing import Any, Mapping

import ipywidgets
from IPython import get_ipython

from .. import plots


def render(outputs: Mapping[str, ipywidgets.Output], owner: Any) -> None:
    """Show ``owner.<name>`` (a go.Figure) in ``outputs[name]``, only inside an IPython kernel.

    The figure is set as the Output widget's ``outputs`` state rather than printed inside
    ``with out:``. Capturing with ``with out:`` makes a headless executor (nbclient, under
    nbmake and the book build) send widget updates back to the kernel while the cell still
    runs; with ipykernel 7 that sometimes left the cell waiting forever for its completion.
    In plain Python (tests, scripts) the figures are updated but not shown.
    """
    if get_ipython() is None:
        return
    for name, out in outputs.items():
        out.outputs = ({"output_type": "display_data", "data": plots.bundle(getattr(owner, name)), "metadata": {}},)
