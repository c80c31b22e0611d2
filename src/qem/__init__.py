"""qem: differentially private fine-tuning by exact sampling from a quadratic exponential
mechanism (see docs/theory.md)."""

__version__ = "0.1.0"
