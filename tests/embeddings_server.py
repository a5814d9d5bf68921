"""A fake OpenAI-compatible embeddings endpoint over loopback HTTP (POST /v1/embeddings), for
text_similarity's cosine metric: no embedding model is hosted here. A text's embedding is its
letter counts (26 numbers), so a test can compute the expected cosine itself. It can be told to
fail first (503) or to want a key. Runs uvicorn in a thread of the test process."""

import string
from dataclasses import dataclass, field

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from services import ThreadServer


def letter_counts(text: str) -> list[float]:
    """The fake model's embedding of `text`."""
    lower = text.lower()
    return [float(lower.count(c)) for c in string.ascii_lowercase]


@dataclass
class Behaviour:
    key: str | None = None  # the Bearer token it wants, if any
    fail_first: int = 0  # answer 503 to the first N requests
    calls: int = 0
    inputs: list[list[str]] = field(default_factory=list)  # each request's inputs
    models: list[str] = field(default_factory=list)


def make_app(b: Behaviour) -> FastAPI:
    app = FastAPI()

    @app.post("/v1/embeddings")
    async def embeddings(request: Request) -> JSONResponse:
        b.calls += 1
        if b.key is not None and request.headers.get("Authorization") != f"Bearer {b.key}":
            return JSONResponse({"error": {"message": "bad key"}}, status_code=401)
        if b.calls <= b.fail_first:
            return JSONResponse(
                {"error": "overloaded"}, status_code=503, headers={"Retry-After": "0"}
            )
        payload = await request.json()
        texts = payload["input"] if isinstance(payload["input"], list) else [payload["input"]]
        b.inputs.append(texts)
        b.models.append(payload["model"])
        data = [  # in reverse, as a server may: the index says which input each is
            {"object": "embedding", "index": i, "embedding": letter_counts(t)}
            for i, t in reversed(list(enumerate(texts)))
        ]
        return JSONResponse({"object": "list", "data": data, "model": payload["model"]})

    return app


class EmbeddingsServer(ThreadServer):
    def __init__(self, behaviour: Behaviour) -> None:
        super().__init__(make_app(behaviour))
        self.behaviour = behaviour

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"
