"""deltazip: serve many full-parameter fine-tunes of one base LLM as compressed deltas."""

__version__ = "0.1.0"
