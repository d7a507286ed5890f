"""MERGE: temporary stand-in for H1's dist.py."""
from dreamprm.engine import all_gather_object, all_reduce_, barrier, broadcast_object, collective_failed, silent_ranks  # noqa
