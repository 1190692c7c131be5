"""What the reliability scripts share: real server processes, users, a loopback proxy that drops
requests or goes dark, a folder watch (inotify), metric-history checks and the report format.

Every script prints a header (machine, CPUs, date), a table and, as its last line, one JSON
object of its figures; ``--smoke`` sizes it to finish well under a minute. Traffic stays on
127.0.0.1, and every loop here is bounded in count and in time.
"""

from __future__ import annotations

import asyncio
import atexit
import ctypes
import datetime as _dt
import faulthandler
import json
import os
import platform
import random
import select
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

ROOT = Path(__file__).resolve().parents[1]
SERVER_LISTENING = "twinkle-server listening on "
RESULTS_DIR = ROOT / "stress" / "results"

# The scripts and the processes they start never reach a hub: the library reads the
# built-in model and dataset only.
OFFLINE_ENV = {
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TRANSFORMERS_VERBOSITY": "error",
    "HF_DATASETS_DISABLE_PROGRESS_BARS": "1",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "TOKENIZERS_PARALLELISM": "false",
}
for _k, _v in OFFLINE_ENV.items():
    os.environ.setdefault(_k, _v)
# `kill -USR1 PID` prints every thread's stack (a script that hangs says where).
faulthandler.register(signal.SIGUSR1, all_threads=True)

_CHILDREN: list[Any] = []
"""Servers and trainers this process started: whatever still runs at exit is ended."""


def _end_children() -> None:
    for child in reversed(_CHILDREN):
        try:
            child.kill()
        except Exception:
            pass


def _terminated(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)


atexit.register(_end_children)
if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
    signal.signal(signal.SIGTERM, _terminated)  # a stopped script still ends its servers (atexit)


def server_env() -> dict[str, str]:
    """The environment of a server process: offline, and any HTTP(S) request that is not for
    loopback goes to a closed loopback port (so a fuzzed input can never reach the network)."""
    env = dict(os.environ)
    env.update(OFFLINE_ENV)
    dead = "http://127.0.0.1:9"
    for var in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
        env[var] = dead
    env["NO_PROXY"] = env["no_proxy"] = "127.0.0.1,localhost"
    return env


def client_env() -> dict[str, str]:
    """The environment of a client process (a trainer): offline, no proxy for loopback."""
    env = dict(os.environ)
    env.update(OFFLINE_ENV)
    env["NO_PROXY"] = env["no_proxy"] = "127.0.0.1,localhost"
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return env


# ---------------------------------------------------------------------- report


def machine() -> dict[str, Any]:
    """The machine a figure was measured on."""
    try:
        load = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        load = []
    return {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "load_at_start": load,
    }


class Report:
    """Prints ``# title``, the machine, tables, and at the end one JSON line of figures."""

    def __init__(self, title: str, smoke: bool) -> None:
        self.title = title
        self.smoke = smoke
        self.machine = machine()
        self.started = time.monotonic()
        self.figures: dict[str, Any] = {}
        m = self.machine
        print(f"# {title}{' (smoke)' if smoke else ''}")
        print(f"machine: {m['platform']}, Python {m['python']}, {m['cpus']} CPUs, "
              f"load {'/'.join(str(x) for x in m['load_at_start'])}; date: {m['date']}")
        sys.stdout.flush()

    @staticmethod
    def table(headers: list[str], rows: Iterable[Iterable[Any]]) -> None:
        rows = [[_cell(c) for c in row] for row in rows]
        print()
        print("| " + " | ".join(headers) + " |")
        print("|" + "|".join("---" for _ in headers) + "|")
        for row in rows:
            print("| " + " | ".join(row) + " |")
        print()
        sys.stdout.flush()

    @staticmethod
    def line(text: str) -> None:
        print(text)
        sys.stdout.flush()

    def finish(self, **figures: Any) -> dict[str, Any]:
        self.figures.update(figures)
        out = {"script": self.title, "smoke": self.smoke, "machine": self.machine,
               "seconds": round(time.monotonic() - self.started, 1), **self.figures}
        print(json.dumps(out, sort_keys=True, default=str))
        sys.stdout.flush()
        return out


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value).replace("|", "\\|").replace("\n", " ")


def last_json_line(text: str) -> dict[str, Any]:
    """The figures a script printed: its last line that parses as a JSON object."""
    for line in reversed(text.strip().splitlines()):
        line = line.strip()
        if line.startswith("{"):
            try:
                return json.loads(line)
            except ValueError:
                continue
    raise ValueError("no JSON line in the output")


def work_dir(prefix: str, keep: str | None) -> Path:
    """A fresh folder for data dirs and logs: ``keep`` if given (made empty), else a temp one."""
    if keep:
        path = Path(keep).resolve()
        if path.exists():
            shutil.rmtree(path)
        path.mkdir(parents=True)
        return path
    return Path(tempfile.mkdtemp(prefix=f"twinkle-stress-{prefix}-"))


def deadline_loop(seconds: float, *, limit: int = 10**9, pause: float = 0.0) -> Iterable[int]:
    """``range(limit)`` that also stops after ``seconds`` (every loop here is bounded twice)."""
    end = time.monotonic() + seconds
    for i in range(limit):
        if time.monotonic() >= end:
            return
        yield i
        if pause:
            time.sleep(pause)


def wait_for(predicate: Callable[[], Any], timeout: float, what: str, pause: float = 0.05) -> Any:
    """Poll ``predicate`` until it returns something truthy; RuntimeError after ``timeout`` s."""
    end = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= end:
            raise RuntimeError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(pause)


# ---------------------------------------------------------------------- server processes


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "twinkle_server.cli", *args]


@dataclass
class Server:
    """A ``twinkle-server serve --port 0`` process on ``data_dir``."""

    data_dir: Path
    process: subprocess.Popen
    url: str
    log_path: Path
    _files: list[Any] = field(default_factory=list, repr=False)

    @property
    def api(self) -> str:
        return self.url + "/api/v1"

    @property
    def pid(self) -> int:
        return self.process.pid

    def alive(self) -> bool:
        return self.process.poll() is None

    def rss_mib(self) -> float:
        """Resident memory of the server process (MiB), from /proc."""
        return rss_mib(self.process.pid)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def kill(self) -> None:
        """SIGKILL: the server dies as in a crash."""
        if self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGKILL)
            self.process.wait(30)
        self._close()

    def stop(self, timeout: float = 60.0) -> int | None:
        """SIGTERM, then SIGKILL after ``timeout`` seconds."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(30)
        self._close()
        return self.process.returncode

    def _close(self) -> None:
        for f in self._files:
            f.close()
        self._files.clear()


_server_count = 0


def start_server(data_dir: str | Path, *extra: str, timeout: float = 300.0) -> Server:
    """Start a server on a free loopback port and wait for its ``listening on`` line."""
    global _server_count
    data_dir = Path(data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    logs = data_dir.parent / f"{data_dir.name}-logs"
    logs.mkdir(exist_ok=True)
    _server_count += 1
    out_path, log_path = logs / f"server-{_server_count}.stdout", logs / f"server-{_server_count}.stderr"
    out, err = out_path.open("w"), log_path.open("w")
    process = subprocess.Popen(
        _cli("serve", "--host", "127.0.0.1", "--port", "0", "--data-dir", str(data_dir), *extra),
        stdout=out, stderr=err, stdin=subprocess.DEVNULL, env=server_env(),
    )
    server = Server(data_dir, process, "", log_path, [out, err])
    _CHILDREN.append(server)
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        for line in out_path.read_text(errors="replace").splitlines():
            if line.startswith(SERVER_LISTENING):
                server.url = line[len(SERVER_LISTENING):].strip()
                return server
        if process.poll() is not None:
            break
        time.sleep(0.05)
    server.kill()
    raise RuntimeError(f"twinkle-server did not start (exit {process.returncode}):\n{server.log()[-3000:]}")


def add_user(data_dir: str | Path, name: str) -> str:
    """``twinkle-server users add NAME``: the key is the last line it prints."""
    proc = subprocess.run(_cli("users", "add", name, "--data-dir", str(data_dir)),
                          capture_output=True, text=True, timeout=180, env=server_env())
    if proc.returncode != 0:
        raise RuntimeError(f"users add {name} failed: {proc.stderr.strip()[-2000:]}")
    return proc.stdout.strip().splitlines()[-1]


def rss_mib(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


# ---------------------------------------------------------------------- trainer processes


class Trainer:
    """A ``python -m stress.trainer`` process; its JSON event lines are read on a thread.

    ``Trainer(args, log)`` starts one with its arguments; ``Trainer(None, log)`` starts a spare
    that imports everything and waits: ``go(args)`` hands it its arguments.
    """

    def __init__(self, args: list[str] | None, log_path: Path) -> None:
        self.log_path = log_path
        self._log = log_path.open("w")
        self.process = subprocess.Popen(
            [sys.executable, "-u", "-m", "stress.trainer", *(args if args is not None else ["--wait-args"])],
            stdout=subprocess.PIPE, stderr=self._log, stdin=subprocess.PIPE, text=True,
            env=client_env(), cwd=str(ROOT),
        )
        _CHILDREN.append(self)
        self.events: list[dict[str, Any]] = []
        self._cond = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        if args is not None:
            self._close_stdin()

    def go(self, args: list[str]) -> None:
        """Give a spare its arguments."""
        assert self.process.stdin is not None
        self.process.stdin.write(json.dumps(args) + "\n")
        self._close_stdin()

    def _close_stdin(self) -> None:
        try:
            assert self.process.stdin is not None
            self.process.stdin.close()
        except OSError:
            pass

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            try:
                event = json.loads(line)
            except ValueError:
                continue
            with self._cond:
                self.events.append(event)
                self._cond.notify_all()
        with self._cond:
            self.events.append({"ev": "exit"})
            self._cond.notify_all()

    def wait_event(self, predicate: Callable[[dict[str, Any]], bool], timeout: float, start: int = 0) -> int:
        """The index of the first event from ``start`` on that matches; RuntimeError on timeout or exit."""
        end = time.monotonic() + timeout
        with self._cond:
            i = start
            while True:
                while i < len(self.events):
                    event = self.events[i]
                    if predicate(event):
                        return i
                    if event["ev"] == "exit":
                        raise RuntimeError(f"the trainer exited: {self.tail()}")
                    i += 1
                remaining = end - time.monotonic()
                if remaining <= 0:
                    raise RuntimeError(f"timed out waiting for a trainer event: {self.tail()}")
                self._cond.wait(min(remaining, 1.0))

    def of(self, kind: str) -> list[dict[str, Any]]:
        with self._cond:
            return [e for e in self.events if e["ev"] == kind]

    def tail(self) -> str:
        with self._cond:
            events = self.events[-3:]
        log = self.log_path.read_text(errors="replace")[-1500:] if self.log_path.exists() else ""
        return f"events {events}; stderr: {log}"

    def kill(self) -> None:
        self._close_stdin()
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(30)
        self._reader.join(10)
        self._log.close()

    def wait(self, timeout: float) -> int | None:
        try:
            code = self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            return None
        self._reader.join(10)
        self._log.close()
        return code


# ---------------------------------------------------------------------- folder watch


class DirWatch:
    """New entries of one folder, from inotify (Linux) so that no event is missed between polls.

    ``next_name(predicate, timeout)`` returns the first new name (created or renamed into the
    folder) that matches, or None after ``timeout`` seconds.
    """

    IN_CREATE = 0x100
    IN_MOVED_TO = 0x80

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        libc = ctypes.CDLL(None, use_errno=True)
        self.fd = libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
        if self.fd < 0:
            raise OSError(ctypes.get_errno(), "inotify_init1 failed")
        wd = libc.inotify_add_watch(self.fd, str(folder).encode(), self.IN_CREATE | self.IN_MOVED_TO)
        if wd < 0:
            os.close(self.fd)
            raise OSError(ctypes.get_errno(), f"inotify_add_watch {folder} failed")
        self._pending: list[str] = []

    def next_name(self, predicate: Callable[[str], bool], timeout: float) -> str | None:
        end = time.monotonic() + timeout
        while True:
            while self._pending:
                name = self._pending.pop(0)
                if predicate(name):
                    return name
            remaining = end - time.monotonic()
            if remaining <= 0:
                return None
            ready, _, _ = select.select([self.fd], [], [], remaining)
            if not ready:
                continue
            try:
                data = os.read(self.fd, 65536)
            except BlockingIOError:
                continue
            offset = 0
            while offset + 16 <= len(data):
                _wd, _mask, _cookie, length = struct.unpack_from("iIII", data, offset)
                name = data[offset + 16: offset + 16 + length].rstrip(b"\0").decode(errors="replace")
                offset += 16 + length
                if name:
                    self._pending.append(name)

    def close(self) -> None:
        os.close(self.fd)


# ---------------------------------------------------------------------- loopback proxy


class LoopbackProxy:
    """An HTTP/1.1-aware TCP proxy on 127.0.0.1 in front of one server.

    Each request is read whole (head and ``Content-Length`` body), then, with probability
    ``drop_rate`` (a seeded RNG), its connection is cut at one of three points:

    - ``before``: the request never reaches the server;
    - ``mid``: the whole request reaches the server, the connection is cut before any answer
      (the server runs it while nobody listens);
    - ``after``: the server has answered (its reply head arrived), the client never sees it.

    ``outage_begin()`` cuts every open connection and from then on resets each new one the
    moment it is accepted, before reading anything, so no request gets through (a laptop
    asleep, a dropped VPN); ``outage_end()`` lets requests through again. (It keeps listening:
    closing and reopening an asyncio listener left an accepted connection without a handler
    now and then, which a client can only leave by its read timeout.)
    """

    FATES = ("before", "mid", "after")

    def __init__(self, upstream_url: str, *, drop_rate: float = 0.0, seed: int = 0, rtt_s: float = 0.0) -> None:
        parsed = urlparse(upstream_url)
        self.upstream = (parsed.hostname or "127.0.0.1", parsed.port or 80)
        self.drop_rate = drop_rate
        self.rtt_s = rtt_s
        """Network round-trip time to add: half before a request goes on, half before its reply."""
        self.rng = random.Random(seed)
        self.counts = {"requests": 0, "passed": 0, "before": 0, "mid": 0, "after": 0, "cut_by_outage": 0,
                       "refused": 0}
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="loopback-proxy", daemon=True)
        self.port = 0
        self._server: asyncio.AbstractServer | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self.in_outage = False

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def dropped(self) -> int:
        return self.counts["before"] + self.counts["mid"] + self.counts["after"]

    def start(self) -> str:
        self.thread.start()
        self._call(self._listen())
        return self.url

    def _call(self, coro: Any, timeout: float = 30.0) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    async def _listen(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    def outage_begin(self) -> None:
        async def begin() -> None:
            self.in_outage = True
            for writer in list(self._writers):
                self.counts["cut_by_outage"] += 1
                writer.transport.abort()
            self._writers.clear()

        self._call(begin())

    def outage_end(self) -> None:
        async def end() -> None:
            self.in_outage = False

        self._call(end())

    def stop(self) -> None:
        async def shutdown() -> None:
            if self._server is not None:
                self._server.close()
            for writer in list(self._writers):
                writer.transport.abort()
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        try:
            self._call(shutdown(), timeout=10)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(10)

    def _fate(self) -> str:
        if self.drop_rate > 0 and self.rng.random() < self.drop_rate:
            return self.rng.choice(self.FATES)
        return "pass"

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.in_outage:
            self.counts["refused"] += 1
            writer.transport.abort()
            return
        self._writers.add(writer)
        up_reader: asyncio.StreamReader | None = None
        up_writer: asyncio.StreamWriter | None = None
        try:
            for _ in range(100_000):  # requests on one kept-alive connection
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except asyncio.IncompleteReadError:
                    return
                method, headers = _parse_head(head)
                body = await _read_body(reader, headers, expect_body=True)
                self.counts["requests"] += 1
                fate = self._fate()
                if fate == "before":
                    self.counts["before"] += 1
                    return
                if up_writer is None:
                    up_reader, up_writer = await asyncio.open_connection(*self.upstream)
                    self._writers.add(up_writer)
                assert up_reader is not None
                if self.rtt_s:
                    await asyncio.sleep(self.rtt_s / 2)
                up_writer.write(head + body)
                await up_writer.drain()
                if fate == "mid":
                    self.counts["mid"] += 1
                    up_writer.write_eof()  # the server reads the whole request, then sees the end
                    return
                rhead = await up_reader.readuntil(b"\r\n\r\n")
                if fate == "after":
                    self.counts["after"] += 1
                    return
                status_line, rheaders = _parse_head(rhead)
                status = int(status_line.split()[1])
                no_body = method == "HEAD" or status in (204, 304) or 100 <= status < 200
                rbody = b"" if no_body else await _read_body(up_reader, rheaders, expect_body=False)
                if self.rtt_s:
                    await asyncio.sleep(self.rtt_s / 2)
                writer.write(rhead + rbody)
                await writer.drain()
                self.counts["passed"] += 1
                if rheaders.get("connection", "").lower() == "close":
                    return
        except (ConnectionError, asyncio.LimitOverrunError, asyncio.IncompleteReadError, ValueError, OSError,
                asyncio.CancelledError):  # cancelled: the proxy is stopping
            return
        finally:
            for w in (writer, up_writer):
                if w is not None:
                    self._writers.discard(w)
                    w.transport.abort()


def _parse_head(head: bytes) -> tuple[str, dict[str, str]]:
    lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines[1:]:
        if ":" in line:
            k, v = line.split(":", 1)
            headers[k.strip().lower()] = v.strip()
    first = lines[0]
    return (first.split(" ", 1)[0] if not first.startswith("HTTP/") else first), headers


async def _read_body(reader: asyncio.StreamReader, headers: dict[str, str], *, expect_body: bool) -> bytes:
    if "content-length" in headers:
        return await reader.readexactly(int(headers["content-length"]))
    if headers.get("transfer-encoding", "").lower() == "chunked":
        out = bytearray()
        for _ in range(1_000_000):
            size_line = await reader.readuntil(b"\r\n")
            out += size_line
            size = int(size_line.split(b";")[0].strip(), 16)
            chunk = await reader.readexactly(size + 2)
            out += chunk
            if size == 0:
                return bytes(out)
        raise ValueError("too many chunks")
    if expect_body:
        return b""  # a request without a body
    return await reader.read()  # a reply that ends with the connection


# ---------------------------------------------------------------------- metric history


def history_problems(points: list[Any], accum: int) -> tuple[list[str], int]:
    """Problems of a run's live metric history (its points not superseded), and the last
    completed optimizer step.

    A point's ``micro_step`` counts the run's micro-batches from 1, so optimizer step ``s`` is
    made of micro-steps ``(s-1)*accum+1 .. s*accum``. Without gaps means: steps ``1..C`` (``C``
    the last completed) each have exactly those points, once each, all completed; at most step
    ``C+1`` follows, unfinished, with some of its own micro-steps once each.
    """
    live = [p for p in points if not _get(p, "superseded")]
    by_step: dict[int, list[Any]] = {}
    for p in live:
        by_step.setdefault(int(_get(p, "step")), []).append(p)
    completed = [s for s, ps in by_step.items() if any(_get(p, "completed") for p in ps)]
    last = max(completed, default=0)
    problems = []
    for s in range(1, last + 1):
        ps = by_step.get(s, [])
        micro = sorted(int(_get(p, "micro_step")) for p in ps)
        expected = list(range((s - 1) * accum + 1, s * accum + 1))
        if micro != expected:
            problems.append(f"step {s}: micro-steps {micro}, expected {expected}")
        elif not all(_get(p, "completed") for p in ps):
            problems.append(f"step {s}: not every point completed")
    for s in sorted(by_step):
        if s > last + 1:
            problems.append(f"step {s} recorded after the last completed step {last} (a gap)")
        elif s == last + 1:
            micro = sorted(int(_get(p, "micro_step")) for p in by_step[s])
            allowed = set(range((s - 1) * accum + 1, s * accum + 1))
            if len(micro) != len(set(micro)) or not set(micro) <= allowed or any(
                    _get(p, "completed") for p in by_step[s]):
                problems.append(f"step {s}: unfinished step recorded wrongly: micro-steps {micro}")
    return problems, last


def _get(point: Any, name: str) -> Any:
    return point[name] if isinstance(point, dict) else getattr(point, name)


# ---------------------------------------------------------------------- the seed loop, in process


SEED_ROWS = 96


def seed_setup(package: str, rows: int, **model_kwargs: Any) -> tuple[Any, Any]:
    """The seed's dataloader and model (tests/data/seed_example.py: the built-in model and
    dataset, batch 8, gradient accumulation 2, AdamW 1e-4, LinearLR) from ``package``:
    ``twinkle`` (local) or ``twinkle_client`` (remote; connect first)."""
    import importlib

    from peft import LoraConfig

    datasets = importlib.import_module(f"{package}.dataset")
    loaders = importlib.import_module(f"{package}.dataloader")
    models = importlib.import_module(f"{package}.model")
    dataset = datasets.Dataset(dataset_meta=datasets.DatasetMeta("builtin://self-cognition", data_slice=range(rows)))
    dataset.set_template("Template", model_id="builtin://tiny-qwen2", max_length=512)
    dataset.map("SelfCognitionProcessor", init_args={"model_name": "twinkle模型", "model_author": "twinkle团队"})
    dataset.encode(batched=True)
    dataloader = loaders.DataLoader(dataset=dataset, batch_size=8)
    model = models.MultiLoraTransformersModel(model_id="builtin://tiny-qwen2", **model_kwargs)
    model.add_adapter_to_model("default", LoraConfig(target_modules="all-linear"), gradient_accumulation_steps=2)
    model.set_template("Template")
    model.set_processor("InputProcessor", padding_side="right")
    model.set_loss("CrossEntropyLoss")
    model.set_optimizer("AdamW", lr=1e-4)
    model.set_lr_scheduler("LinearLR")
    return dataloader, model


def seed_loop(url: str, key: str, *, rows: int = SEED_ROWS, epochs: int = 1,
              retry_timeout: float | None = None,
              on_iteration: Callable[[int], None] | None = None) -> dict[str, Any]:
    """tests/data/seed_example.py's loop against ``url`` (the built-in model and dataset,
    ``rows`` samples, batch 8, gradient accumulation 2, AdamW 1e-4, LinearLR), then the final save.

    Returns the loss of every micro-batch, the optimizer updates the client saw (``step()``
    returning True), the adapter's ``cur_step``, the run id and the checkpoint path.
    ``on_iteration(i)`` runs after each iteration's calls are queued.
    """
    from twinkle_client import init_twinkle_client

    kwargs = {} if retry_timeout is None else {"retry_timeout": retry_timeout}
    client = init_twinkle_client(base_url=url, api_key=key, **kwargs)
    client.list_training_runs()
    dataloader, model = seed_setup("twinkle_client", rows)
    outputs, steps = [], []
    i = -1
    for _epoch in range(epochs):
        for batch in dataloader:
            i += 1
            output = model.forward_backward(inputs=batch)
            model.clip_grad_norm(1.0)
            updated = model.step()
            model.zero_grad()
            model.lr_step()
            outputs.append(output)
            steps.append(updated)
            if on_iteration is not None:
                on_iteration(i)
    path = model.save(name=f"step-{i}", save_optimizer=True)
    result = {
        "losses": [float(o) for o in outputs],
        "updates": sum(1 for s in steps if bool(s)),
        "cur_step": model.get_train_state()["cur_step"],
        "run_id": model.training_run_id,
        "checkpoint": str(path),
    }
    model.close()
    return result


def max_abs_diff(a: list[float], b: list[float]) -> float:
    if len(a) != len(b):
        return float("inf")
    return max((abs(x - y) for x, y in zip(a, b, strict=True)), default=0.0)


def run_points(url: str, key: str, run_id: str) -> list[Any]:
    """Every metric point of a run (superseded ones included), oldest first."""
    from twinkle_client import TwinkleClient

    with TwinkleClient(base_url=url, api_key=key) as client:
        return list(client.get_metrics(run_id).points)
