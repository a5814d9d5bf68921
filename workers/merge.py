"""A LoRA checkpoint as a whole model: its adapter merged into the base model's weights, saved
with the tokenizer so that it loads with AutoModelForCausalLM (the `merged` checkpoint download).

Written beside the checkpoint in the same store (storage.merged_path), where the API packs it;
written once: a merge already there is kept, and it is removed with its checkpoint.
"""

import logging
import shutil
import tempfile
from pathlib import Path

from service.contract import storage
from service.contract.tasks import MergeTask, TaskAnswer, TaskProblem

log = logging.getLogger(__name__)


def merge_checkpoint(task: MergeTask) -> TaskAnswer:
    if storage.exists(task.target):
        return TaskAnswer(result={"path": task.target})
    with tempfile.TemporaryDirectory() as tmp:
        source = storage.fetch(task.checkpoint_path, Path(tmp) / "stored")
        out = Path(tmp) / "merged"
        try:
            _merge(source, out)
        except (OSError, ValueError) as exc:  # the base model is not on this worker
            # What the libraries say names server folders: the worker's log keeps it.
            log.warning("merging checkpoint %s: %s", task.checkpoint_id, exc)
            return TaskAnswer(
                problem=TaskProblem(
                    kind="conflict",
                    message=f"cannot merge checkpoint {task.checkpoint_id}: its base model "
                    f"could not be loaded by the worker ({type(exc).__name__}); download the "
                    "adapter instead",
                )
            )
        _put(out, task.target)
    return TaskAnswer(result={"path": task.target})


def _merge(source: Path, out: Path) -> None:
    from peft import AutoPeftModelForCausalLM
    from transformers import AutoTokenizer

    model = AutoPeftModelForCausalLM.from_pretrained(source)
    model.merge_and_unload().save_pretrained(out)
    AutoTokenizer.from_pretrained(source).save_pretrained(out)


def _put(folder: Path, target: str) -> None:
    """Move the merged model to `target` whole: a local folder by rename (another merge that
    won the race is kept), or an upload that marks itself complete last."""
    if storage.is_remote(target):
        storage.upload(folder, target)
        return
    staging = Path(tempfile.mkdtemp(prefix=".merging-", dir=Path(target).parent))
    shutil.move(str(folder), staging / "model")
    try:
        (staging / "model").rename(target)
    except OSError:  # a concurrent merge put its (identical) folder there first
        pass
    finally:
        shutil.rmtree(staging, ignore_errors=True)
