"""Several call batches of one object in flight, against a real server: they run in the order
their client sent them (``after``), and a batch sent before its client saw a failure is
refused, not run (``failures``); a retry of it gets the same answer."""

from __future__ import annotations

import threading
from typing import Any

import pytest

pytestmark = pytest.mark.server

BATCH = [{"input_ids": [5, 6, 7, 8, 9], "labels": [5, 6, 7, 8, 9]}] * 2


def batch(seq: int, method: str, after: int | None, failures: int | None, *args: Any, **kwargs: Any) -> dict[str, Any]:
    return {"calls": [{"seq": seq, "method": method, "args": list(args), "kwargs": kwargs}],
            "after": after, "failures": failures}


def test_batches_run_in_the_order_sent_and_a_failure_blocks_those_in_flight(server, server_user, raw_client,
                                                                             raw_helpers) -> None:
    client = raw_client(server, server_user[1])
    model = raw_helpers.raw_model(client, r=4)  # seqs 1-3
    path = f"/objects/{model}/calls"

    # The second batch goes first: the server holds it until the first was handled.
    second: dict[str, Any] = {}
    sender = threading.Thread(target=lambda: second.update(
        r=client.body(client.post(path, batch(5, "get_train_state", 4, 0)))))
    sender.start()
    first = client.body(client.post(path, batch(4, "forward_backward", 3, 0, inputs=BATCH)))
    sender.join(120)
    assert first["results"][0]["ok"] and second["r"]["results"][0]["ok"]
    assert second["r"]["results"][0]["value"]["micro_step"] == 1  # it ran after the forward_backward

    # A call fails; the batch its client had already sent behind it is refused, not run.
    failed = client.body(client.post(path, batch(6, "set_loss", 5, 0, "NoSuchLoss")))
    assert not failed["results"][0]["ok"] and failed["failures"] == 1
    behind = batch(7, "forward_backward", 6, 0, inputs=BATCH)
    refused = client.body(client.post(path, behind))
    error = refused["results"][0]["error"]
    assert error["blocked"] and error["message"] == "not run: an earlier call of this object failed"
    assert client.body(client.post(path, behind)) == refused  # a retry: the same answer, still not run
    # A resent earlier batch is answered from the record with the failures up to it only: its
    # reply must not count a failure its client has not been shown yet.
    again = client.body(client.post(path, batch(4, "forward_backward", 3, 0, inputs=BATCH)))
    assert again["results"] == first["results"] and again["failures"] == 0
    # Sent after the client saw the failure (failures=1), the next batch runs.
    state = client.body(client.post(path, batch(8, "get_train_state", 7, 1)))
    assert state["results"][0]["ok"] and state["results"][0]["value"]["micro_step"] == 1

    # A client that gave up on a request sends its next batch with ``after`` set back; a call
    # before it that failed meanwhile (unseen: failures=2 on the server, 1 on the client)
    # still keeps it from running.
    assert not client.body(client.post(path, batch(9, "set_loss", 8, 1, "NoSuchLoss")))["results"][0]["ok"]
    late = client.body(client.post(path, batch(11, "get_train_state", 0, 1)))
    assert late["results"][0]["error"]["blocked"], late
