"""Built-in environments, by the names service/contract/environments.py lists, and the
factory that builds a run's environment from its spec.

- `secret_code`: a toy task that needs the environment. After the policy's first turn the
  environment reveals the row's answer (a code the prompt never shows); the episode ends after
  the second turn with reward 1 if that turn starts with the code, else 0. A policy that
  ignores what it was told can guess only; the tiny model learns it on two cores.
- `python_tool`: the policy's tool calls run Python in a sandbox (python_tool.py).
"""

from collections.abc import Callable

from service.contract.environments import (
    BuiltinEnvironment,
    EnvironmentParams,
    EnvironmentSpec,
    SecretCodeParams,
    WebhookEnvironment,
)
from workers.environments.base import Environment, EpisodeView, Reply
from workers.registry import Registry

# name -> factory(params, answer_field, hidden paths) -> Environment
BUILTIN: Registry[Callable[..., Environment]] = Registry("built-in environment")


@BUILTIN.register("secret_code")
class SecretCode:
    name = "secret_code"

    def __init__(self, params: SecretCodeParams, answer_field: str, hidden=()) -> None:
        self.params, self.answer_field = params, answer_field

    def step(self, step: int, turn: int, episodes: list[EpisodeView], purpose: str) -> list[Reply]:
        return [self._reply(turn, e) for e in episodes]

    def _reply(self, turn: int, episode: EpisodeView) -> Reply:
        code = str(episode.item.get(self.answer_field, ""))
        if turn == 1:
            said = self.params.reveal.format(answer=code)
            return Reply([{"role": "user", "content": said}])
        answer = episode.messages[-1].get("content") or ""
        return Reply(done=True, reward=float(bool(code) and answer.strip().startswith(code)))

    def close(self) -> None:
        """Nothing held."""


def _python_tool(params: EnvironmentParams, answer_field: str, hidden=()) -> Environment:
    from workers.environments.python_tool import PythonToolEnvironment

    return PythonToolEnvironment(params, hidden=hidden)


BUILTIN.register("python_tool")(_python_tool)


def build_environment(
    spec: EnvironmentSpec, answer_field: str, webhooks=None, hidden: tuple[str, ...] = ()
) -> Environment:
    """The run's environment: a webhook client (with the run's WebhookContext `webhooks`), or
    a built-in one; `hidden`: paths a sandbox must not see (the service's data directory)."""
    if isinstance(spec, WebhookEnvironment):
        from workers.environments.webhook import WebhookEnvironmentClient

        return WebhookEnvironmentClient(spec, webhooks)
    assert isinstance(spec, BuiltinEnvironment)
    return BUILTIN.lookup(spec.name)(spec.parsed_params(), answer_field, hidden)


def secret_code_rows(n: int, seed: int = 0) -> list[dict]:
    """Chat rows for `secret_code`: the same question, a one-digit code as the answer."""
    import random

    rng = random.Random(seed)
    return [
        {"messages": [{"role": "user", "content": "code?"}], "answer": str(rng.randrange(10))}
        for _ in range(n)
    ]
