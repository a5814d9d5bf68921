"""Errors the worker reports to the user as they are."""


class RunError(Exception):
    """A failure caused by the run's inputs or its reward model; the message is shown as is."""
