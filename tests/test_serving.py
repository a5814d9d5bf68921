"""Serving through the official `openai` SDK (issue 21's acceptance), against the embedded
stack's real processes: the API, a training worker, and an inference worker running vLLM's own
OpenAI server (the CPU build) for each model.

One run trains only on the traffic posted to it (training.wait_for_groups) and publishes its
weights every step: the tests sample it live at step 0, post a group of the episodes they
played through the SDK, and sample the newer weights it published once it has trained on them;
its checkpoints are served too. The run never moves without a posted group, so the tests know
which weights serve each request.
"""

import asyncio
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import openai
import pytest
import torch
from transformers import AutoModelForCausalLM

from service.stack import stack_env

from factories import auth, copy_rows, upload, wait_until
from services import cli, stack_settings, start_stack

pytestmark = pytest.mark.slow

K = 4
LOAD_S = 600.0  # a model's first request: vLLM starts (tens of seconds on a loaded machine)
TRAIN_S = 300.0
SPEC = {
    "algorithm": {"group_size": K},
    "sampling": {"max_new_tokens": 8},
    "optimizer": {"lr": 1e-2},  # weights that visibly move in one step
    "training": {
        "steps": 50,
        "prompts_per_step": 1,
        "mini_batches": 1,
        "offpolicy_fraction": 1.0,
        "wait_for_groups": True,
    },
    "serving": {"sync_every_steps": 1},
    "checkpoint": {"every_steps": 1, "keep_last": None},
    "reward": {"type": "builtin", "name": "char_accuracy"},  # unused: the agent scores
}
# Small: the tiny model's template spends most of its 256-token context on the tools' schemas
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "lookup",
            "parameters": {"type": "object", "properties": {"x": {"type": "integer"}}},
        },
    }
]


class Served:
    def __init__(self, stack, key: str, run_id: str) -> None:
        self.stack, self.key, self.run_id = stack, key, run_id
        self.http = httpx.Client(base_url=stack.url, headers=auth(key), timeout=LOAD_S)
        self.sdk = openai.OpenAI(base_url=f"{stack.url}/v1", api_key=key, timeout=LOAD_S)

    def run(self) -> dict:
        return self.http.get(f"/v1/runs/{self.run_id}").json()

    def published(self, step: int) -> dict:
        """The run's model once it lists weights of `step`."""
        return wait_until(
            lambda: next(
                (
                    m
                    for m in self.sdk.models.list().data
                    if m.id == self.run_id and m.model_extra["step"] >= step
                ),
                None,
            ),
            TRAIN_S,
            f"run {self.run_id} to publish the weights of step {step}",
            every=0.5,
        )


@pytest.fixture(scope="module")
def served(tmp_path_factory, tiny_model_dir):
    settings = stack_settings(tmp_path_factory.mktemp("stack"))
    cli(settings, "db", "upgrade")
    stack = start_stack(settings, settings.resolved_data_dir / "logs")
    run_id = None
    try:
        key = cli(settings, "api-key", "create", "--project", "serving")
        http = httpx.Client(base_url=stack.url, headers=auth(key), timeout=60)
        train = upload(http, None, copy_rows(16), filename="t.jsonl")
        body = {"model": {"path": str(tiny_model_dir)}, "dataset": {"train_file": train}, **SPEC}
        created = http.post("/v1/runs", json=body)
        assert created.status_code == 201, created.text
        run_id = created.json()["id"]
        yield Served(stack, key, run_id)
    finally:
        stack.stop()
    # the inference worker's vLLM servers (process groups of their own) end with it
    if run_id:
        wait_until(lambda: not serving(run_id), 60, "the vLLM servers to end with the stack")


def serving(model: str) -> list[int]:
    """The processes whose command line serves `model` (vLLM servers of an inference worker)."""
    found = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and model.encode() in (proc / "cmdline").read_bytes():
                found.append(int(proc.name))
        except OSError:
            continue
    return found


def hf_logprobs(folder: str | Path, prompt_ids: list[int], token_ids: list[int]) -> torch.Tensor:
    """log pi(token | prefix) of each sampled token, by transformers on the folder's weights."""
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    ids = torch.tensor([prompt_ids + token_ids])
    with torch.no_grad():
        logits = model(ids).logits[0, len(prompt_ids) - 1 : -1].float()
    return torch.log_softmax(logits, -1).gather(-1, torch.tensor(token_ids)[:, None])[:, 0]


def sampled(served: Served, model: str, **extra) -> tuple[list[int], list[tuple]]:
    """(the prompt's ids, [(token ids, served log-probs), ...] per choice) of a chat request."""
    answer = served.sdk.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": "abc="}],
        max_tokens=6,
        logprobs=True,
        extra_body={"return_token_ids": True, "ignore_eos": True},
        **extra,
    )
    choices = [
        (c.model_extra["token_ids"], torch.tensor([t.logprob for t in c.logprobs.content]))
        for c in answer.choices
    ]
    return answer.model_extra["prompt_token_ids"], choices


def weights_folder(served: Served) -> str:
    from service.db import session_scope
    from service.models import Run

    with session_scope(served.stack.settings.resolved_database_url) as session:
        return session.get(Run, served.run_id).weights_path


def test_a_live_run_is_served_through_the_sdk(served, tiny_model_dir):
    model = served.published(0)
    assert model.owned_by == "gvpo" and model.model_extra["step"] == 0
    prompt, choices = sampled(served, served.run_id, n=3, seed=1)
    assert len(choices) == 3
    for tokens, logprobs in choices:  # the starting weights: the tiny model's
        assert len(tokens) == 6
        assert torch.allclose(logprobs, hf_logprobs(tiny_model_dir, prompt, tokens), atol=1e-4)

    stream = served.sdk.chat.completions.create(
        model=served.run_id,
        messages=[{"role": "user", "content": "abc="}],
        max_tokens=5,
        n=2,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"ignore_eos": True},
    )
    texts, usage = {0: "", 1: ""}, None
    for chunk in stream:
        for choice in chunk.choices:
            texts[choice.index] += choice.delta.content or ""
        usage = chunk.usage or usage
    assert usage.completion_tokens == 10 and all(texts.values())

    called = served.sdk.chat.completions.create(
        model=served.run_id,
        messages=[{"role": "user", "content": "a"}],
        tools=TOOLS,
        tool_choice="required",  # vLLM constrains the output to a call
        max_tokens=200,
        seed=1,  # a random model's call must also end before the context does
    )
    assert called.choices[0].finish_reason == "tool_calls", called.choices[0]
    call = called.choices[0].message.tool_calls[0]
    assert call.type == "function" and call.function.name == "lookup"

    text = served.sdk.completions.create(model=served.run_id, prompt="abc=", max_tokens=3)
    assert text.usage.completion_tokens == 3 and text.choices[0].text is not None

    # the project's usage counts what vLLM said it served, per run
    tokens = 3 * 6 + 10 + called.usage.completion_tokens + 3
    wait_until(
        lambda: (
            served.http.get(f"/v1/runs/{served.run_id}/usage").json()["total"][
                "inference_completion_tokens"
            ]
            == tokens
        ),
        30,
        f"the run's usage to count {tokens} completion tokens served",
    )
    assert (
        served.http.get(f"/v1/runs/{served.run_id}/usage").json()["total"]["inference_requests"]
        == 4
    )


def play_episode(served: Served, name: str) -> tuple[list[str], float]:
    """Two turns of an agent's episode through the SDK, recorded: (its completion ids, its
    reward: the share of 'a' in what it said)."""
    messages = [{"role": "user", "content": "say a"}]
    ids, said = [], ""
    for _ in range(2):
        answer = served.sdk.chat.completions.create(
            model=served.run_id,
            messages=messages,
            max_tokens=4,
            metadata={"gvpo_episode": name},
        )
        content = answer.choices[0].message.content or ""
        assert answer.id == answer.choices[0].model_extra["completion_id"]
        assert answer.id.startswith("cmpl_")
        ids.append(answer.id)
        said += content
        messages += [{"role": "assistant", "content": content}, {"role": "user", "content": "more"}]
    return ids, said.count("a") / max(len(said), 1)


def test_traffic_trains_the_run_and_its_newer_weights_are_served(served):
    before_prompt, before = sampled(served, served.run_id, seed=2)
    episodes = [play_episode(served, f"e{i}") for i in range(K)]
    group = {
        "episodes": [
            {"completion_ids": ids, "reward": reward + (i == 0)}  # rewards that differ
            for i, (ids, reward) in enumerate(episodes)
        ]
    }
    posted = served.sdk.post(
        f"/runs/{served.run_id}/groups", body={"groups": [group]}, cast_to=httpx.Response
    )
    assert posted.status_code == 202, posted.text
    served.published(1)
    folder = weights_folder(served)
    prompt, choices = sampled(served, served.run_id, seed=2)
    tokens, logprobs = choices[0]
    now = hf_logprobs(folder, prompt, tokens)
    assert torch.allclose(logprobs, now, atol=1e-4)  # the new weights serve
    old_tokens, _ = before[0]
    moved = hf_logprobs(folder, before_prompt, old_tokens) - before[0][1]
    assert moved.abs().max() > 1e-3  # and they are not the old ones
    recorded = served.sdk.chat.completions.create(
        model=served.run_id,
        messages=[{"role": "user", "content": "a"}],
        max_tokens=2,
        metadata={"gvpo_episode": "after"},
    )
    assert recorded.model_extra["weights_step"] == 1
    metrics = served.http.get(f"/v1/runs/{served.run_id}/metrics").json()["metrics"]
    assert metrics["offpolicy/staleness_mean"][0][1] == 0  # served by the weights it trained


def test_checkpoints_are_served_and_gone_ones_are_named(served, tmp_path):
    served.published(1)
    ckpts = served.http.get(f"/v1/runs/{served.run_id}/checkpoints").json()["data"]
    ckpt = next(c for c in ckpts if c["step"] == 1)
    assert ckpt["id"] in {m.id for m in served.sdk.models.list().data}
    prompt, choices = sampled(served, ckpt["id"], n=2)
    folder = ckpt_folder(served, ckpt["id"])
    for tokens, logprobs in choices:
        assert torch.allclose(logprobs, hf_logprobs(folder, prompt, tokens), atol=1e-4)
    kept = tmp_path / "kept"
    shutil.move(folder, kept)  # its files gone (as if deleted)
    try:
        with pytest.raises(openai.APIStatusError) as refused:
            sampled(served, ckpt["id"])
        assert refused.value.status_code == 410 and "files are gone" in refused.value.message
    finally:
        shutil.move(kept, folder)


def ckpt_folder(served: Served, ckpt_id: str) -> str:
    from service.db import session_scope
    from service.models import Checkpoint

    with session_scope(served.stack.settings.resolved_database_url) as session:
        return session.get(Checkpoint, ckpt_id).path


def test_another_projects_model_is_not_found(served):
    other = cli(served.stack.settings, "api-key", "create", "--project", "other")
    sdk = openai.OpenAI(base_url=f"{served.stack.url}/v1", api_key=other, max_retries=0)
    with pytest.raises(openai.NotFoundError):
        sdk.chat.completions.create(
            model=served.run_id, messages=[{"role": "user", "content": "a"}]
        )
    assert served.run_id not in {m.id for m in sdk.models.list().data}


def test_32_concurrent_streams_all_complete(served):
    served.published(0)
    sdk = openai.AsyncOpenAI(base_url=f"{served.stack.url}/v1", api_key=served.key, timeout=LOAD_S)

    async def one(i: int) -> tuple[str, int]:
        stream = await sdk.chat.completions.create(
            model=served.run_id,
            messages=[{"role": "user", "content": f"client {i}"}],
            max_tokens=16,
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"ignore_eos": True},
        )
        text, tokens = "", 0
        async for chunk in stream:
            if chunk.choices:
                text += chunk.choices[0].delta.content or ""
            if chunk.usage:
                tokens = chunk.usage.completion_tokens
        return text, tokens

    async def all_of_them():
        try:
            return await asyncio.gather(*(one(i) for i in range(32)))
        finally:
            await sdk.close()

    results = asyncio.run(all_of_them())
    assert [tokens for _, tokens in results] == [16] * 32
    assert all(text for text, _ in results)


def test_gvpo_sample_prints_the_models_answer(served):
    served.published(0)
    env = {**stack_env(served.stack.settings), "GVPO_API_KEY": served.key}
    args = ["sample", served.run_id, "abc=", "-n", "2", "--max-tokens", "3"]
    done = subprocess.run(
        [sys.executable, "-m", "service.cli", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=LOAD_S,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("--- ") == 2 and "sampled" in done.stderr
