"""twinkle-server against a hostile user, while another user works on the same server.

One server process with two users: ``mallory`` sends what a client never would (small bodies
that expand into millions of values, nesting, odd arrays, replayed seqs with other calls,
connections that never finish their request), ``alice`` keeps working. Every mistake is a 4xx
with one line; health keeps answering; stalled connections are closed; nothing of one user's
shows to the other; the data directory is private.
"""

from __future__ import annotations

import gzip
import json
import os
import socket
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace
from urllib.parse import urlsplit

import httpx
import msgpack
import numpy as np
import pytest

from twinkle.protocol import codec
from twinkle.protocol.limits import MAX_SEQ, MAX_WIRE_ELEMENTS, MAX_WIRE_VALUES

pytestmark = pytest.mark.server

HEADER_TIMEOUT = 2.0
CLOSE_MARGIN = 10.0
"""Seconds beyond --header-timeout within which a stalled connection must be closed (a loaded machine)."""
HEALTH_BOUND = 1.0
"""The longest a health request may take while the other user's hostile bodies are decoded."""
MSGPACK = {"Content-Type": codec.CONTENT_TYPE}
GZIP = {"Content-Type": codec.CONTENT_TYPE, "Content-Encoding": "gzip"}
JSON = {"Content-Type": "application/json"}


def one_line(message: str) -> None:
    assert message and "\n" not in message and "Traceback" not in message, message


def http_error(r: httpx.Response, status: int) -> dict:
    assert r.status_code == status, (r.status_code, r.content[:300])
    body = codec.unpack(r.content) if "msgpack" in r.headers["content-type"] else r.json()
    err = body["error"]
    one_line(err["message"])
    assert err["request_id"] == r.headers["x-request-id"]
    return err


def rows(n: int = 1, width: int = 6) -> dict:
    return {"input_ids": np.ones((n, width), dtype=np.int64), "labels": np.ones((n, width), dtype=np.int64)}


@pytest.fixture(scope="module")
def srv(tmp_path_factory, start_server, add_user, raw_client):
    data_dir = tmp_path_factory.mktemp("hostile")
    alice, mallory = add_user(data_dir, "alice"), add_user(data_dir, "mallory")
    # As an earlier, careless setup might have left them: open to every account.
    data_dir.chmod(0o755)
    (data_dir / "twinkle.db").chmod(0o644)
    handle = start_server(data_dir, "--max-loras", "4", "--header-timeout", f"{HEADER_TIMEOUT:g}")
    yield SimpleNamespace(server=handle, alice=raw_client(handle, alice), mallory=raw_client(handle, mallory),
                          alice_key=alice)
    handle.stop()


# --------------------------------------------------------------------------- hostile bodies


def hostile_bodies() -> list[tuple[str, bytes, dict[str, str], int]]:
    """(what, body, headers, expected status) of call batches: small requests that would expand
    into millions of values (or nest without end) once decoded."""
    packed = {"__nd__": "|u1", "shape": [32_000_000], "data": bytes(32_000_000), "list": True}
    one_call = {"seq": 1, "method": "__len__", "kwargs": {}}
    return [
        ("a 2M-item calls array", gzip.compress(msgpack.packb({"calls": [0] * 2_000_000})), GZIP, 413),
        ("1M calls", gzip.compress(msgpack.packb({"calls": [0] * 1_000_000})), GZIP, 400),
        ("a 32M-element packed argument", gzip.compress(msgpack.packb({"calls": [{**one_call, "args": [packed]}]})),
         GZIP, 413),
        ("1100 lists of 1024 values",
         gzip.compress(msgpack.packb({"calls": [{**one_call, "args": [[0] * 1024] * 1100}]})), GZIP, 413),
        ("a 2M-item JSON array", b'{"calls": [' + b"0," * 2_000_000 + b"0]}", JSON, 413),
        ("JSON nested 100000 deep", b"[" * 100_000 + b"]" * 100_000, JSON, 400),
        ("msgpack nested 100000 deep", b"\x91" * 100_000 + b"\xc0", MSGPACK, 400),
        # The costliest body within the bounds: decoded, validated and bound (the call's own error).
        ("340k one-entry maps, within the bounds",
         gzip.compress(msgpack.packb({"calls": [{**one_call, "args": [{"k": 1} for _ in range(340_000)]}]})),
         GZIP, 200),
    ]


def test_health_answers_while_another_user_sends_hostile_bodies(srv) -> None:
    mallory, alice = srv.mallory, srv.alice
    target = mallory.create("dataset", "builtin://self-cognition")
    path, bodies = f"/objects/{target}/calls", hostile_bodies()
    for what, body, _, _ in bodies:
        assert len(body) < 5 << 20, (what, len(body))  # all small: the byte limit does not catch them
    rounds, time_limit = 3, 120.0
    decode_times: dict[str, float] = {}
    failures: list[str] = []
    done = threading.Event()

    def attack() -> None:
        try:
            deadline = time.monotonic() + time_limit
            for _ in range(rounds):
                for what, body, headers, status in bodies:
                    if time.monotonic() > deadline:
                        return
                    started = time.monotonic()
                    r = mallory.http.post(path, content=body, headers=headers)
                    decode_times[what] = max(decode_times.get(what, 0.0), time.monotonic() - started)
                    if r.status_code != status:
                        failures.append(f"{what}: {r.status_code} {r.content[:200]!r}")
        except Exception as exc:  # reported by the main thread
            failures.append(f"attack: {exc!r}")
        finally:
            done.set()

    health = httpx.Client(base_url=srv.server.api, timeout=30)
    latencies: list[float] = []
    attacker = threading.Thread(target=attack, name="mallory")
    attacker.start()
    try:
        while not done.is_set():
            started = time.monotonic()
            assert health.get("/health").status_code == 200
            latencies.append(time.monotonic() - started)
            if len(latencies) == 20:  # the other user's own work goes on meanwhile
                dataset = alice.create("dataset", "builtin://self-cognition")
                assert alice.call(dataset, "__len__") > 0
                alice.delete(f"/objects/{dataset}")
    finally:
        attacker.join(time_limit + 60)
        health.close()
    worst = max(latencies)
    print(f"\nhealth: {len(latencies)} requests during the attack, max {worst * 1000:.0f} ms; "
          "slowest answer per hostile body (s): " + ", ".join(f"{k} {v:.2f}" for k, v in decode_times.items()))
    assert not failures, failures
    assert len(decode_times) == len(bodies)
    assert worst < HEALTH_BOUND, f"health took {worst:.2f} s while hostile bodies were decoded"
    assert max(decode_times.values()) < 10.0, decode_times
    mallory.delete(f"/objects/{target}")


def test_hostile_bodies_are_refused_with_one_line(srv) -> None:
    c = srv.mallory
    target = c.create("dataset", "builtin://self-cognition")
    path, messages = f"/objects/{target}/calls", {}
    for what, body, headers, status in hostile_bodies():
        r = c.http.post(path, content=body, headers=headers)
        if status == 200:  # within the bounds: the call itself is refused
            (result,) = c.body(r)["results"]
            assert result["error"]["code"] == "invalid_argument", result
            continue
        err = http_error(r, status)
        assert err["code"] == ("payload_too_large" if status == 413 else "invalid_argument"), (what, err)
        messages[what] = err["message"]
    assert messages["a 2M-item calls array"].startswith(f"request body holds more than {MAX_WIRE_VALUES} values")
    assert messages["1M calls"] == "a request may carry at most 64 calls, got 1000000; send the rest in another request"
    assert f"more than {MAX_WIRE_ELEMENTS} packed array elements" in messages["a 32M-element packed argument"]
    c.delete(f"/objects/{target}")


def test_odd_arrays_and_values_are_invalid_arguments(srv) -> None:
    c = srv.mallory
    target = c.create("dataset", "builtin://self-cognition")
    path = f"/objects/{target}/calls"
    seq = iter(range(1, 100))

    def send(*args, **kwargs) -> httpx.Response:
        body = {"calls": [{"seq": next(seq), "method": "__getitem__", "args": list(args), "kwargs": kwargs}]}
        return c.http.post(path, content=msgpack.packb(body, use_bin_type=True), headers=MSGPACK)

    for dtype in ("|O", "<c16", "<M8[s]", "|V8", "<U2", "|S8", "<f16"):
        array = {"__nd__": dtype, "shape": [2], "data": bytes(16), "list": False}
        err = http_error(send(array), 400)
        assert err["code"] == "invalid_argument" and "dtype" in err["message"], (dtype, err)
    for bad in ({"__nd__": "<i8", "shape": [3], "data": bytes(16)},  # shape and size disagree
                {"__nd__": "<i8", "shape": [-2], "data": bytes(16)},
                {"__nd__": "<i8", "shape": ["2"], "data": bytes(16)},
                {"__nd__": "<i8", "shape": [2], "data": "not bytes"},
                {"__nd__": "<i8", "shape": [2**62, 2**62], "data": bytes(16)},
                {"__nd__": "<i8", "shape": [2], "data": bytes(16), "extra": 1}):
        err = http_error(send(bad), 400)
        assert "malformed array" in err["message"], (bad, err)
    err = http_error(c.http.post(path, content=msgpack.packb({"calls": [{"seq": next(seq), "method": "x",
                                                                         "args": [msgpack.Timestamp(1)]}]}),
                                 headers=MSGPACK), 400)
    assert "Timestamp" in err["message"]
    err = http_error(c.http.post(path, content=msgpack.packb({"calls": [{"seq": next(seq), "method": "x",
                                                                         "args": [msgpack.ExtType(7, b"x")]}]}),
                                 headers=MSGPACK), 400)
    assert "extension" in err["message"]
    err = http_error(c.http.post(path, content=json.dumps({"calls": [{"seq": next(seq), "method": "x",
                                                                      "args": [2**70]}]}), headers=JSON), 400)
    assert "64 bits" in err["message"]
    r = c.http.post(path, content=msgpack.packb({"calls": [{"seq": next(seq), "method": "x", "args": [],
                                                            "kwargs": {b"raw": 1}}]}, use_bin_type=True),
                    headers=MSGPACK)
    assert http_error(r, 400)["code"] == "invalid_argument"
    # A value type whose fields its constructor refuses is the caller's mistake, not the server's.
    r = c.calls(target, [("__getitem__", [{"__type__": "DatasetMeta", "value": ["not", "a", "map"]}], {})])
    result = c.body(r)["results"][0]
    assert r.status_code == 200 and result["error"]["code"] == "invalid_argument", result
    c.delete(f"/objects/{target}")


def test_arguments_of_the_wrong_plain_type_are_invalid_arguments(srv, raw_helpers) -> None:
    c = srv.mallory
    model = raw_helpers.raw_model(c, adapter="types")
    dataset = c.create("dataset", "builtin://self-cognition")
    cases = [
        (model, "save", ["ck"], {"save_optimizer": [1, 2]}, "save(): save_optimizer must be bool, got list"),
        (model, "forward_only", [[{"input_ids": [1, 2, 3]}]], {"return_logits": np.ones((2, 2), dtype=np.int64)},
         "return_logits must be bool"),
        (dataset, "encode", [], {"batched": np.ones((2, 2), dtype=np.int64)}, "encode(): batched must be bool, got Tensor"),
        (dataset, "map", ["SelfCognitionProcessor"], {"init_args": 5}, "init_args must be a dict | None, got int"),
        (dataset, "__getitem__", ["0"], {}, "__getitem__(): idx must be int, got str"),
    ]
    for obj, method, args, kwargs, message in cases:
        (result,) = c.body(c.calls(obj, [(method, args, kwargs)]))["results"]
        assert result["error"]["code"] == "invalid_argument" and message in result["error"]["message"], result
    r = c.post("/objects", {"kind": "dataloader", "args": [], "kwargs": {"dataset": {"__ref__": dataset},
                                                                          "batch_size": 2, "shuffle": "yes"}})
    assert "shuffle must be bool, got str" in http_error(r, 400)["message"]
    (run,) = [r for r in c.get("/training_runs", limit=1000).json()["training_runs"] if r["adapter_name"] == "types"]
    assert run["num_checkpoints"] == 0  # the save never ran
    c.delete(f"/objects/{dataset}")
    c.delete(f"/objects/{model}")


def test_query_parameters_and_nesting_are_bounded(srv) -> None:
    c = srv.alice
    model = c.create("model", "builtin://tiny-qwen2")
    r = c.calls(model, [("add_adapter_to_model", ["q", {"r": 4, "target_modules": "all-linear"}], {})])
    run_id = c.body(r)["results"][0]["training_run_id"]
    for params in ({"since_step": 2**63}, {"since_step": 2**64}, {"since_step": -1}):
        err = http_error(c.get(f"/training_runs/{run_id}/metrics", **params), 422)
        assert err["message"].startswith("since_step:"), err
    assert c.get(f"/training_runs/{run_id}/metrics", since_step=MAX_SEQ).status_code == 200
    for params in ({"offset": 2**64}, {"offset": 2**63}, {"limit": 10**30}, {"limit": "many"}):
        err = http_error(c.get("/training_runs", **params), 422)
        assert err["message"].split(":")[0] in params, err
    assert c.get("/training_runs", offset=MAX_SEQ).status_code == 200
    deep = b'{"kind": "dataset", "args": ' + b"[" * 5000 + b"]" * 5000 + b"}"
    err = http_error(c.http.post("/objects", content=deep, headers=JSON), 400)
    assert "deep" in err["message"]
    c.delete(f"/objects/{model}")


def test_unfit_optimizers_are_refused_when_set(srv) -> None:
    c = srv.alice
    model = c.create("model", "builtin://tiny-qwen2")
    r = c.calls(model, [("add_adapter_to_model", ["o", {"r": 4, "target_modules": "all-linear"}], {}),
                        ("set_processor", ["InputProcessor"], {})])
    assert all(x["ok"] for x in c.body(r)["results"])
    for name, why in (("LBFGS", "closure"), ("SparseAdam", "sparse")):
        r = c.calls(model, [("set_optimizer", [name], {})])
        (result,) = c.body(r)["results"]
        assert result["error"]["code"] == "invalid_argument" and why in result["error"]["message"], result
        one_line(result["error"]["message"])
    r = c.calls(model, [("step", [], {})])
    (result,) = c.body(r)["results"]
    assert result["error"]["code"] == "invalid_state" and "no optimizer" in result["error"]["message"], result
    c.delete(f"/objects/{model}")


# --------------------------------------------------------------------------- replays


def test_a_spent_seq_answers_only_the_call_that_spent_it(srv, raw_helpers) -> None:
    c = srv.mallory
    model = raw_helpers.raw_model(c, adapter="replay")
    r = c.calls(model, [("forward_backward", [rows()], {}), ("step", [], {})])
    first = c.body(r)["results"]
    assert all(x["ok"] for x in first), first
    step_seq = c.seqs[model]
    path = f"/objects/{model}/calls"

    def send(*calls: tuple[int, str, list, dict]) -> httpx.Response:
        return c.post(path, {"calls": [{"seq": s, "method": m, "args": a, "kwargs": k} for s, m, a, k in calls]})

    # The same call again: answered from the record, not run again.
    again = send((step_seq, "step", [], {}))
    assert again.status_code == 200 and c.body(again)["results"] == [first[1]]
    # Another call under that seq is refused, and never runs.
    err = http_error(send((step_seq, "save", ["x"], {})), 409)
    assert err["code"] == "conflict" and f"call {step_seq} already ran with method 'step'" in err["message"], err
    err = http_error(send((1, "add_adapter_to_model", ["replay", {"r": 8, "target_modules": "all-linear"}], {})), 409)
    assert "other arguments" in err["message"]
    # ... also when it comes first in a batch whose new calls would run.
    err = http_error(send((step_seq, "zero_grad", [], {}), (step_seq + 1, "save", ["y"], {})), 409)
    run_id = first[1]["training_run_id"]
    assert c.get(f"/training_runs/{run_id}/checkpoints").json()["checkpoints"] == []
    # Seqs increase within a request, and stay within what JSON and msgpack both carry exactly.
    err = http_error(send((step_seq + 1, "zero_grad", [], {}), (step_seq + 1, "save", ["z"], {})), 400)
    assert "seqs must increase" in err["message"]
    r = c.http.post(path, json={"calls": [{"seq": MAX_SEQ + 1, "method": "step"}]})
    assert http_error(r, 422)["message"] == f"calls.0.seq: Input should be less than or equal to {MAX_SEQ}"
    r = c.http.post(path, json={"calls": [{"seq": 2**70, "method": "step"}]})  # no msgpack client could go on
    assert http_error(r, 400)["message"] == "request body holds an integer beyond 64 bits"
    r = c.http.post(path, json={"calls": [{"seq": MAX_SEQ, "method": "zero_grad"}]})
    assert r.status_code == 200 and r.json()["results"][0]["ok"], r.json()
    r = c.post(path, {"calls": [{"seq": MAX_SEQ, "method": "zero_grad", "args": [], "kwargs": {}}]})
    assert r.status_code == 200 and c.body(r)["results"][0]["seq"] == MAX_SEQ
    c.delete(f"/objects/{model}")


# --------------------------------------------------------------------------- what users see of each other


def test_server_info_shows_only_the_callers_slots(srv, raw_helpers) -> None:
    alice, mallory = srv.alice, srv.mallory
    before, theirs_before = alice.get("/server").json(), mallory.get("/server").json()
    model = raw_helpers.raw_model(mallory, adapter="slots")
    theirs, mine = mallory.get("/server").json(), alice.get("/server").json()
    assert theirs["used_slots"] == theirs_before["used_slots"] + 1
    assert mine["used_slots"] == before["used_slots"] == 0  # the other user's adapter is not shown
    assert mine["free_slots"] == theirs["free_slots"] == before["free_slots"] - 1
    mallory.delete(f"/objects/{model}")
    assert alice.get("/server").json()["free_slots"] == before["free_slots"]


def test_data_dir_database_and_runs_are_private(srv, raw_helpers) -> None:
    data_dir = srv.server.data_dir
    assert stat.S_IMODE(data_dir.stat().st_mode) == 0o700
    assert stat.S_IMODE((data_dir / "twinkle.db").stat().st_mode) == 0o600
    assert "was open to other accounts (mode 755); it is 700 now" in srv.server.log()
    assert "was open to other accounts (mode 644); it is 600 now" in srv.server.log()
    c = srv.alice
    model = raw_helpers.raw_model(c, adapter="private")
    r = c.calls(model, [("save", ["ck"], {"save_optimizer": True})])
    (saved,) = c.body(r)["results"]
    assert saved["ok"], saved
    run_dir = data_dir / "runs" / saved["training_run_id"]
    paths = [run_dir, *run_dir.rglob("*")]
    assert len(paths) > 3
    loose = [(str(p.relative_to(data_dir)), oct(stat.S_IMODE(p.stat().st_mode))) for p in paths
             if stat.S_IMODE(p.stat().st_mode) & 0o077]
    assert not loose, loose
    c.delete(f"/objects/{model}")


# --------------------------------------------------------------------------- stalled connections


def _closed(sock: socket.socket, deadline: float) -> bool:
    """Wait (up to ``deadline``) for the server to close ``sock``; answers read on the way are skipped."""
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            return False
        sock.settimeout(left)
        try:
            if not sock.recv(65536):
                return True
        except TimeoutError:
            return False
        except ConnectionError:
            return True


def health_over(sock: socket.socket) -> bool:
    """One complete health request over ``sock``, kept alive; True when it was answered."""
    sock.sendall(b"GET /api/v1/health HTTP/1.1\r\nHost: x\r\n\r\n")
    answer = b""
    while b'"status":"ok"' not in answer:
        chunk = sock.recv(65536)
        if not chunk:
            return False
        answer += chunk
    return answer.startswith(b"HTTP/1.1 200")


def test_stalled_requests_are_closed_while_others_are_served(srv) -> None:
    url = urlsplit(srv.server.url)
    address = (url.hostname, url.port)
    openings = [b"GET /api/v1/hea", b"GET /api/v1/health HTTP/1.1\r\nHost: x\r\nX-Slow: "] * 5 + [b""]
    stalled = []
    for opening in openings:
        sock = socket.create_connection(address, timeout=10)
        sock.sendall(opening)
        stalled.append(sock)
    # Without a key, a body that is never sent: answered (401), then closed, not waited for.
    unfinished = socket.create_connection(address, timeout=10)
    unfinished.sendall(b"POST /api/v1/objects HTTP/1.1\r\nHost: x\r\nContent-Type: application/msgpack\r\n"
                       b"Content-Length: 1000000\r\n\r\nstart of a body")
    opened = time.monotonic()
    # A kept-alive connection that finished its request stays usable past the head deadline.
    kept = socket.create_connection(address, timeout=30)
    assert health_over(kept)
    # Meanwhile the server serves everyone else.
    assert httpx.get(srv.server.api + "/health", timeout=30).status_code == 200
    assert srv.alice.get("/training_runs").status_code == 200
    deadline = opened + HEADER_TIMEOUT + CLOSE_MARGIN
    try:
        still_open = [i for i, sock in enumerate(stalled) if not _closed(sock, deadline)]
        assert not still_open, f"connections {still_open} were still open {HEADER_TIMEOUT + CLOSE_MARGIN:g} s later"
        closed_after = time.monotonic() - opened
        unfinished.settimeout(30)
        assert unfinished.recv(65536).startswith(b"HTTP/1.1 401")
        assert _closed(unfinished, time.monotonic() + 30)
    finally:
        for sock in [*stalled, unfinished]:
            sock.close()
    assert closed_after >= HEADER_TIMEOUT * 0.9, closed_after  # the deadline, not something else, closed them
    assert health_over(kept)  # the same connection, past the head deadline
    kept.close()
    print(f"\n{len(stalled)} stalled connections closed {closed_after:.2f} s after opening "
          f"(--header-timeout {HEADER_TIMEOUT:g})")


# --------------------------------------------------------------------------- the dashboard's key


def test_dashboard_key_never_reaches_the_jupyter_log(srv, tmp_path: Path) -> None:
    """``jupyter server --debug`` logs every loaded config value; the key comes from a file."""
    key = srv.alice_key
    env = dict(os.environ)
    for var in ("HOME", "JUPYTER_CONFIG_DIR", "JUPYTER_DATA_DIR", "JUPYTER_RUNTIME_DIR", "IPYTHONDIR"):
        env[var] = str(tmp_path / var.lower())
        Path(env[var]).mkdir()
    env["JUPYTER_PLATFORM_DIRS"] = "1"
    env.pop("TWINKLE_SERVER_TOKEN", None)
    env.pop("TWINKLE_SERVER_URL", None)
    key_file = tmp_path / "twinkle-key"
    key_file.write_text(key + "\n")
    (Path(env["JUPYTER_CONFIG_DIR"]) / "jupyter_server_config.py").write_text(
        f"c.TwinkleDashboardApp.server_url = {srv.server.url!r}\n"
        f"c.TwinkleDashboardApp.api_key_file = {str(key_file)!r}\n"
        # The old way of giving the key: now ignored (with a warning), since config values are logged.
        "c.TwinkleDashboardApp.api_key = 'tk_000000000000_not-the-key-not-the-key'\n"
    )
    token = "t" + os.urandom(16).hex()
    log_path = tmp_path / "jupyter.log"
    with log_path.open("w") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "jupyter_server", "--debug", "--no-browser", "--allow-root",
             "--ServerApp.ip=127.0.0.1", "--ServerApp.port=0", f"--IdentityProvider.token={token}",
             f"--ServerApp.root_dir={tmp_path}"],
            env=env, cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        )
    try:
        runtime = Path(env["JUPYTER_RUNTIME_DIR"]) / f"jpserver-{process.pid}.json"
        deadline, base = time.monotonic() + 120, None
        while base is None and time.monotonic() < deadline and process.poll() is None:
            try:
                base = f"http://127.0.0.1:{json.loads(runtime.read_text())['port']}"
            except (OSError, ValueError, KeyError):  # not written yet, or half-written
                time.sleep(0.1)
        assert base is not None, log_path.read_text()[-3000:]
        headers = {"Authorization": f"token {token}"}
        r = httpx.get(f"{base}/twinkle/api/runs", headers=headers, timeout=60)
        assert r.status_code != 404, "twinkle_jupyter is not enabled in this environment (make install)"
        # The dashboard reached the twinkle server with the key from the file.
        assert r.status_code == 200, (r.status_code, r.text[:300])
        assert {run["model_owner"] for run in r.json()} == {"alice"}, r.text[:300]
    finally:
        process.terminate()
        process.wait(30)
    text = log_path.read_text()
    assert "Config changed" in text and "api_key_file" in text  # the debug log did show the config
    assert key not in text and key.split("_", 2)[2] not in text
    assert "c.TwinkleDashboardApp.api_key is not used" in text
