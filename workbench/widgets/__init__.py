"""ipywidgets explorers: thin controllers over the cached `recipe.run`, one module per chapter."""

from .decoding import DecodingExplorer
from .distill import DistillationExplorer
from .llm import LLMExplorer
from .lr import LRExplorer
from .pruning import PruningExplorer
from .quant import QuantizationExplorer
from .tradeoff import TradeoffExplorer

__all__ = ["DecodingExplorer", "DistillationExplorer", "LLMExplorer", "LRExplorer", "PruningExplorer", "QuantizationExplorer", "TradeoffExplorer"]
