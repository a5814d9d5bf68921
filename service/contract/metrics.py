"""Metric names that more than one side reads: the worker records them, the API keeps one of
them on the run (Run.reward), the CLI and the dashboard show them."""

REWARD_MEAN = "reward/mean"  # a step's mean reward over its samples
REWARD_ERRORS = "reward/errors"  # a step's samples a grader could not grade (reward 0 each)
LOSS = "loss"  # a step's training loss (a fine-tuning job's checkpoints show it as train_loss)
EVAL_REWARD_MEAN = "eval/reward_mean"  # the mean reward of an evaluation's completions
# the tokens the run's engines have sampled up to and including a step (the charts' tokens axis)
TOKENS_TOTAL = "tokens/total"
