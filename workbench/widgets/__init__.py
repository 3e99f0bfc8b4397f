"""ipywidgets explorers: thin controllers over the cached `recipe.run`, one module per chapter."""

from .distill import DistillationExplorer
from .pruning import PruningExplorer
from .quant import QuantizationExplorer

__all__ = ["DistillationExplorer", "PruningExplorer", "QuantizationExplorer"]
