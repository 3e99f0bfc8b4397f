"""ipywidgets explorers: thin controllers over the cached `recipe.run`, one module per chapter."""

from .pruning import PruningExplorer

__all__ = ["PruningExplorer"]
