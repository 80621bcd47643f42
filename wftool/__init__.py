"""wft: turn full-precision LLMs into 1.58-bit (ternary) models and ship them."""

__version__ = "0.1.0"
