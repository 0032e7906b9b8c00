"""Errors raised by the data layer."""


class DataError(Exception):
    """A user-facing data problem: says what was wrong, where, and what to do."""
