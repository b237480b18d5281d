"""edu-filter: educational-value filters for LLM pretraining data (FineWeb-Edu / Python-Edu style)."""

__version__ = "0.1.0"
