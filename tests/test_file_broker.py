"""The embedded (filesystem) broker: a reader never takes a message that is still being
written. kombu's own filesystem transport writes the queue's file in place, and a worker that
listed it half-written died on the JSONDecodeError (a suite run under load lost its dry-run
worker that way)."""

import threading
from pathlib import Path
from queue import Empty

import pytest

from service.config import Settings
from service.contract.tasks import PARTIAL, RUN_TASK, AtomicFilesystemTransport, celery_app

from factories import WORKER_S


@pytest.fixture
def app(tmp_path):
    return celery_app(Settings(data_dir=tmp_path))


def test_a_message_half_written_is_not_taken_and_a_whole_one_is(app):
    queue = app.conf.broker_transport_options["data_folder_in"]
    with app.connection_for_write() as conn:
        assert isinstance(conn.transport, AtomicFilesystemTransport)
        channel = conn.default_channel
        # what a writer leaves while it writes: a prefix of the JSON, under the .part name
        half = f"{queue}/1_writing.default.msg{PARTIAL}"
        with open(half, "w") as f:
            f.write('{"body": "')
        with pytest.raises(Empty):
            channel._get("default")

        app.send_task(RUN_TASK, args=["run_whole"], queue="default", connection=conn)
        message = channel._get("default")
        assert message["headers"]["task"] == RUN_TASK
        with pytest.raises(Empty):  # the half-written one is still not taken
            channel._get("default")


def test_a_reader_racing_the_writer_takes_every_message_whole(app):
    """A consumer polling while 100 messages of 4 MB are sent. With kombu's own transport a
    quarter of them were read empty (JSONDecodeError) on the machine this was written on."""
    sent, taken, errors = 100, [], []
    finished = threading.Event()

    def read() -> None:
        with app.connection_for_read() as conn:
            channel = conn.default_channel
            while len(taken) < sent:
                try:
                    taken.append(channel._get("default")["headers"]["id"])
                except Empty:
                    if finished.is_set() and len(taken) + len(errors) >= sent:
                        return
                except Exception as exc:  # what kombu's own transport raises: recorded
                    errors.append(repr(exc))

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    with app.connection_for_write() as conn:
        for n in range(sent):
            app.send_task(RUN_TASK, args=["x" * 4_000_000, n], queue="default", connection=conn)
    finished.set()
    reader.join(timeout=WORKER_S)
    assert not errors and len(taken) == sent
    leftovers = list(Path(app.conf.broker_transport_options["data_folder_in"]).iterdir())
    assert leftovers == []  # nothing left behind, no .part file
