"""fusion: knowledge fusion of large language models (FuseLLM) on Ray."""

__version__ = "0.1.0"
