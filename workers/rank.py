"""One training process of a run larger than one (launcher.py starts them with torchrun):
join the process group, train as rank RANK, and say how it went by exit code.

    python -m workers.rank RUN_ID WORKER_ID     (under torchrun, which sets RANK etc.)

Exit 0 when the run ended the way the lead recorded it (or another worker took it over), 1
otherwise, so that torchrun stops the other ranks instead of leaving them in a collective.
"""

import json
import logging
import os
import signal
import sys

from service.config import Settings
from service.contract.spec import RunSpec
from service.contract.states import RunStatus
from workers.execute import drive
from workers.launcher import LEASE_LOST, SETTINGS_ENV, SPEC_ENV, die_with_parent, rank_files
from workers.records import RunRecorder

CLEAN_EXITS = (RunStatus.SUCCEEDED, RunStatus.CANCELLED, RunStatus.PAUSED, LEASE_LOST)


def rank_main(run_id: str, worker_id: str) -> int:
    die_with_parent(signal.SIGKILL)  # torchrun gone: nobody is left to collect this rank
    rank = int(os.environ["RANK"])
    logging.basicConfig(
        level=logging.INFO, format=f"[rank {rank}] %(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    settings = Settings.model_validate_json(os.environ[SETTINGS_ENV])
    spec = RunSpec.model_validate(json.loads(os.environ[SPEC_ENV]))
    from torch import distributed as dist

    from workers.ranks import gang_broke, join

    try:
        outcome = drive(
            settings,
            RunRecorder(settings, run_id, worker_id),
            spec,
            join(spec.resources.step_timeout_s, spec.rollout.tensor_parallel_size),
        )
    except BaseException as exc:  # one drive() did not record: another rank's, or early
        failed, lost = rank_files(settings, run_id, rank)
        path = lost if spec.resources.nodes > 1 and gang_broke(exc) else failed
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(f"{type(exc).__name__}: {exc}")
        raise
    if dist.is_initialized():
        dist.destroy_process_group()
    return 0 if outcome in CLEAN_EXITS else 1


if __name__ == "__main__":
    if len(sys.argv) != 3:
        raise SystemExit("usage: python -m workers.rank RUN_ID WORKER_ID")
    sys.exit(rank_main(*sys.argv[1:]))
