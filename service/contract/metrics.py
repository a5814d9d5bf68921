"""Metric names that more than one side reads: the worker records them, the API keeps one of
them on the run (Run.reward), the CLI and the dashboard show them."""

REWARD_MEAN = "reward/mean"  # a step's mean reward over its samples
REWARD_ERRORS = "reward/errors"  # a step's samples a grader could not grade (reward 0 each)
