"""The contract between the API (service/) and the workers (workers/): what both sides share
and nothing else. It imports neither side's code (tests/test_architecture.py checks), so the API
can import it without a model library and the worker without the web service.

- spec.py: the run spec (POST /v1/runs) and its parts; rewards.py: the built-in rewards' names
  and parameters; tracking.py: the experiment trackers a run may log to.
- states.py: run (and rescore, notification) states and their legal moves; events.py: the
  types of run events.
- tasks.py: the broker, the task names and the payloads of the tasks that answer requests.
- webhooks.py, outbound.py: the webhook protocol: bodies, and calling a URL safely. Its
  signatures are gvpo_client.signing, in the client's distribution, which a reward model
  installs alone.
- groups.py: off-policy groups; files.py: dataset files (JSONL) and their purposes;
  storage.py: where checkpoints are kept.
"""
