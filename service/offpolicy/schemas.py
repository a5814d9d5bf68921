from typing import Any, Literal

from pydantic import BaseModel, Field

from service.contract.limits import Strict

MAX_GROUPS_PER_REQUEST = 1000


class GroupsPost(Strict):
    """Each group is checked as an offpolicy file's line is (service/contract/groups.py); its
    text is bounded by the request's size and, where the API sees the model, by its context."""

    groups: list[dict[str, Any]] = Field(
        min_length=1,
        max_length=MAX_GROUPS_PER_REQUEST,
        description='groups as in an offpolicy file: {"prompt", "completions": [k strings], '
        '"rewards"?: [k numbers], "source"?: label or [k labels], "answer"?}, or as chat: '
        '{"messages": [prompt messages], "tools"?, "episodes": [k lists of messages after '
        'the prompt, each starting and ending with an assistant message], "rewards"?, '
        '"source"?, "answer"?, ...}, or episodes of completions served with metadata.gvpo_episode: '
        '{"episodes": [{"completion_ids": ["cmpl_…", ...], "reward": number}, ...], "source"?}',
    )


class GroupsStatus(BaseModel):
    object: Literal["run.groups"] = "run.groups"
    run_id: str
    accepted: int = Field(0, description="groups this request added")
    pending: int = Field(description="posted groups no step has taken yet")
    trained: int = Field(description="posted groups taken by a step")
    slots_per_step: int = Field(
        description="off-policy slots in each step (posted groups are "
        "taken in multiples of the rollout engines)"
    )
