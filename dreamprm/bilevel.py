"""MERGE: temporary stand-in for H1's bilevel.py."""
from dreamprm.engine import fused_meta_gradient, meta_update  # noqa
