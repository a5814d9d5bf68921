"""Generated from runs.proto and rewards.proto by proto/generate.py: never edited by hand."""
