"""Built-in environments, by the names service/contract/environments.py lists, and the
factory that builds a run's environment from its spec.

- `secret_code`: a toy task that needs the environment. After the policy's first turn the
  environment reveals the row's answer (a code the prompt never shows); the episode ends after
  the second turn, rewarded with the share of the code's characters that turn repeats in
  place (1 for the code exactly). A policy that ignores what it was told can only guess; the
  tiny model learns it on two cores.
- `python_tool`: the policy's tool calls run Python in a sandbox (python_tool.py).
"""

import random
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
        said = episode.messages[-1].get("content") or ""
        return Reply(done=True, reward=code_match(code, said))

    def close(self) -> None:
        """Nothing held."""


def code_match(code: str, said: str) -> float:
    """The share of `code`'s characters that `said` has at the same places (0 for no code)."""
    if not code:
        return 0.0
    return sum(a == b for a, b in zip(code, said, strict=False)) / len(code)


def _python_tool(params: EnvironmentParams, answer_field: str, hidden=()) -> Environment:
    from workers.environments.python_tool import PythonToolEnvironment

    return PythonToolEnvironment(params, hide=hidden)


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


def secret_code_rows(
    n: int, seed: int = 0, letters: str = "abcdefghij", size: int = 3
) -> list[dict]:
    """Chat rows for `secret_code`: the same question for every row, each with its own code
    of `size` letters as the answer."""
    rng = random.Random(seed)
    return [
        {
            "messages": [{"role": "user", "content": "code?"}],
            "answer": "".join(rng.choice(letters) for _ in range(size)),
        }
        for _ in range(n)
    ]
