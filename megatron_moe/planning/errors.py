"""The dry run's own error kind (pretrain_moe.py gives it an exit code)."""


class LayoutDoesNotFit(Exception):
    """Some rank of the planned layout needs more memory than the device has (one sentence per rank)."""
