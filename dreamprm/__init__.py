"""dreamprm: process reward model training with bilevel instance reweighting."""

__version__ = "0.1.0"
