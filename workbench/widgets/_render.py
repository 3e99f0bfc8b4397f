"""Drawing an explorer's plotly figures into its Output widgets (shared by every explorer)."""

from __future__ import annotations

from typing import Any, Mapping

import ipywidgets
from IPython import get_ipython

from .. import plots


def render(outputs: Mapping[str, ipywidgets.Output], owner: Any) -> None:
    """Show ``owner.<name>`` (a go.Figure) in ``outputs[name]``, only inside an IPython kernel.

    In plain Python (tests, scripts) the figures are updated but not shown.
    """
    if get_ipython() is None:
        return
    for name, out in outputs.items():
        out.clear_output(wait=True)
        with out:
            plots.show(getattr(owner, name))
