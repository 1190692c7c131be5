"""Soak: trainer processes and reader threads against one server for a long while.

    .venv/bin/python -m stress.soak [--minutes 10] [--trainers 8] [--readers 50] [--users 4]
                                    [--dashboard | --no-dashboard] [--keep DIR] [--smoke]

``--trainers`` processes (``stress.trainer``: the seed-like loop on the built-in model, batch
4, a checkpoint every 5 optimizer steps) spread over ``--users`` users train for ``--minutes``,
while ``--readers`` threads, each as one of those users, read what a notebook and the
dashboard read: the run list, a run, its metrics since a step, its checkpoints, one
checkpoint, the server info (one request every ``--interval`` seconds each). With
``--dashboard`` a Jupyter server with the /twinkle extension also runs, and a fifth of the
readers read its JSON routes instead.

Counted: trainer failures, reader errors (any answer but 2xx, or none), the server's resident
memory (at the start of the window, at its end while every trainer still trains, after the
trainers closed, its maximum), and at the end, for every trainer's run, that the metric
history has no gap and holds one point per micro-batch the trainer ran.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import secrets
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from stress.common import (  # noqa: E402
    Report,
    Trainer,
    add_user,
    client_env,
    history_problems,
    start_server,
    wait_for,
    work_dir,
)

ACCUM = 2


class Readers:
    """Reader threads: each loops over the read routes as one user, bounded by a stop event
    and by a request count."""

    def __init__(self, api: str, keys: list[str], count: int, interval: float, stop: threading.Event,
                 dashboard: tuple[str, str] | None, seed: int) -> None:
        self.api = api
        self.keys = keys
        self.interval = interval
        self.stop = stop
        self.dashboard = dashboard
        self.lock = threading.Lock()
        self.requests = 0
        self.dashboard_requests = 0
        self.errors: list[str] = []
        self.latencies: list[float] = []
        self.threads = [threading.Thread(target=self._run, args=(i, seed + i), daemon=True) for i in range(count)]

    def start(self) -> None:
        for t in self.threads:
            t.start()

    def join(self) -> None:
        for t in self.threads:
            t.join(60)

    def _run(self, index: int, seed: int) -> None:
        import httpx

        rng = random.Random(seed)
        on_dashboard = self.dashboard is not None and index % 5 == 4
        key = self.keys[index % len(self.keys)] if not on_dashboard else self.keys[0]
        if on_dashboard:
            assert self.dashboard is not None
            base, token = self.dashboard
            http = httpx.Client(base_url=base + "twinkle/api", headers={"Authorization": f"token {token}"},
                                timeout=60, trust_env=False)
        else:
            http = httpx.Client(base_url=self.api, headers={"Authorization": f"Bearer {key}"}, timeout=60,
                                trust_env=False)
        runs: list[str] = []
        ckpts: dict[str, list[str]] = {}
        time.sleep(rng.random() * self.interval)  # spread the readers out
        with http:
            for _ in range(10**6):
                if self.stop.is_set():
                    return
                choice = rng.random()
                if not runs or choice < 0.15:
                    path, params = "/runs" if on_dashboard else "/training_runs", None
                    if not on_dashboard:
                        params = {"limit": 50}
                elif choice < 0.55:
                    run = rng.choice(runs)
                    path = f"/runs/{run}/metrics" if on_dashboard else f"/training_runs/{run}/metrics"
                    params = {"since_step": rng.choice([0, 0, rng.randint(0, 200)])}
                elif choice < 0.8:
                    run = rng.choice(runs)
                    path, params = (f"/runs/{run}/checkpoints" if on_dashboard
                                    else f"/training_runs/{run}/checkpoints"), None
                elif on_dashboard:
                    path, params = "/runs", None
                elif choice < 0.9 and any(ckpts.values()):
                    run = rng.choice([r for r in ckpts if ckpts[r]])
                    path, params = f"/training_runs/{run}/checkpoints/{rng.choice(ckpts[run])}", None
                elif choice < 0.95:
                    path, params = f"/training_runs/{rng.choice(runs)}", None
                else:
                    path, params = "/server", None
                t0 = time.monotonic()
                try:
                    r = http.get(path, params=params)
                    ok = r.is_success
                    detail = f"{r.status_code} {r.text[:200]}"
                except httpx.HTTPError as exc:
                    ok, detail, r = False, f"{type(exc).__name__}: {exc}", None
                elapsed = time.monotonic() - t0
                with self.lock:
                    self.requests += 1
                    self.dashboard_requests += on_dashboard
                    self.latencies.append(elapsed)
                    if not ok:
                        self.errors.append(f"GET {'/twinkle/api' if on_dashboard else ''}{path} {params}: {detail}")
                if ok and r is not None:
                    body = r.json()
                    if path.endswith("runs"):
                        listed = body if isinstance(body, list) else body.get("training_runs", [])
                        runs = [x.get("training_run_id") or x.get("run_id") for x in listed
                                if isinstance(x, dict)] or runs
                        runs = [x for x in runs if x]
                    elif path.endswith("/checkpoints"):
                        listed = body if isinstance(body, list) else body.get("checkpoints", [])
                        ckpts[path.split("/")[-2]] = [c.get("checkpoint_id") for c in listed
                                                      if isinstance(c, dict) and c.get("checkpoint_id")]
                self.stop.wait(self.interval)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_dashboard(work: Path, url: str, key: str) -> tuple[subprocess.Popen, str, str]:
    """A plain ``jupyter server`` with the /twinkle extension, on loopback with a token."""
    home = work / "jupyter"
    env = client_env()
    for var, sub in (("HOME", "home"), ("JUPYTER_CONFIG_DIR", "config"), ("JUPYTER_DATA_DIR", "data"),
                     ("JUPYTER_RUNTIME_DIR", "runtime"), ("IPYTHONDIR", "ipython"), ("MPLCONFIGDIR", "mpl")):
        (home / sub).mkdir(parents=True, exist_ok=True)
        env[var] = str(home / sub)
    env["JUPYTER_PLATFORM_DIRS"] = "1"
    env["TWINKLE_SERVER_URL"] = url
    env["TWINKLE_SERVER_TOKEN"] = key
    port, token = _free_port(), secrets.token_hex(24)
    log = (work / "jupyter.log").open("w")
    process = subprocess.Popen(
        [sys.executable, "-m", "jupyter_server", "--no-browser", "--allow-root", "--ServerApp.ip=127.0.0.1",
         f"--ServerApp.port={port}", "--ServerApp.port_retries=50", f"--IdentityProvider.token={token}",
         f"--ServerApp.root_dir={home}", "--ServerApp.shutdown_no_activity_timeout=0"],
        env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
    )
    import httpx

    runtime = Path(env["JUPYTER_RUNTIME_DIR"]) / f"jpserver-{process.pid}.json"

    def up() -> str | None:
        if process.poll() is not None:
            raise RuntimeError(f"jupyter server exited: {(work / 'jupyter.log').read_text()[-2000:]}")
        try:
            base = f"http://127.0.0.1:{json.loads(runtime.read_text())['port']}/"
            r = httpx.get(base + "twinkle/api/runs", headers={"Authorization": f"token {token}"}, timeout=30,
                          trust_env=False)
        except (OSError, ValueError, KeyError, httpx.HTTPError):
            return None
        if r.status_code == 404:
            raise RuntimeError("the twinkle_jupyter server extension is not enabled (make install)")
        return base if r.is_success else None

    base = wait_for(up, 180, "the Jupyter server", pause=0.3)
    return process, base, token


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--minutes", type=float, default=None, help="default 10 (smoke: 20 s)")
    p.add_argument("--trainers", type=int, default=None, help="default 8 (smoke: 2)")
    p.add_argument("--readers", type=int, default=None, help="default 50 (smoke: 5)")
    p.add_argument("--users", type=int, default=None, help="default 4 (smoke: 2)")
    p.add_argument("--interval", type=float, default=0.5, help="seconds between one reader's requests")
    p.add_argument("--dashboard", action=argparse.BooleanOptionalAction, default=None,
                   help="also read the /twinkle dashboard's JSON routes (default: yes, not with --smoke)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--keep", default=None, help="keep data and logs in this folder (emptied first)")
    p.add_argument("--smoke", action="store_true")
    args = p.parse_args(argv)
    seconds = 60 * args.minutes if args.minutes is not None else (20.0 if args.smoke else 600.0)
    n_trainers = args.trainers if args.trainers is not None else (2 if args.smoke else 8)
    n_readers = args.readers if args.readers is not None else (5 if args.smoke else 50)
    n_users = args.users if args.users is not None else (2 if args.smoke else 4)
    dashboard = args.dashboard if args.dashboard is not None else not args.smoke
    report = Report("soak", args.smoke)
    work = work_dir("soak", args.keep)
    data = work / "data"
    per_user = math.ceil(n_trainers / n_users)
    report.line(f"{n_trainers} trainers, {n_readers} readers, {n_users} users, {seconds:.0f} s of training; "
                f"dashboard {'on' if dashboard else 'off'}; work folder {work}")

    spares = [Trainer(None, work / f"trainer-{i}.log") for i in range(n_trainers)]
    server = start_server(data, "--max-loras", str(n_trainers + 1), "--max-loras-per-user", str(per_user + 1))
    keys = [add_user(data, f"soak-{u}") for u in range(n_users)]
    jupyter: subprocess.Popen | None = None
    dash: tuple[str, str] | None = None
    failures: list[str] = []
    if dashboard:
        try:
            jupyter, base, token = start_dashboard(work, server.url, keys[0])
            dash = (base, token)
        except Exception as exc:
            failures.append(f"dashboard: {exc}")
    for w in spares:
        w.wait_event(lambda e: e["ev"] == "warm", 600)
    rss_idle = server.rss_mib()

    stop = threading.Event()
    readers = Readers(server.api, keys, n_readers, args.interval, stop, dash, args.seed)
    trainers = spares
    for i, t in enumerate(trainers):
        t.go(["--url", server.url, "--key", keys[i % n_users], "--rows", "64", "--batch", "4",
              "--accum", str(ACCUM), "--save-every", "5", "--seconds", str(seconds), "--retry-timeout", "60"])
    readers.start()
    t_go = time.monotonic()
    for t in trainers:
        try:
            t.wait_event(lambda e: e["ev"] in ("ready", "error"), 600)
        except RuntimeError as exc:
            failures.append(f"trainer did not start: {exc}")
    t_ready = time.monotonic()
    samples: list[tuple[float, float, int]] = []  # (seconds since ready, RSS MiB, trainers running)
    rss_start = server.rss_mib()
    samples.append((0.0, rss_start, n_trainers))
    end = t_ready + seconds + 600  # trainers stop by themselves after `seconds`; a bound for stragglers
    while time.monotonic() < end:
        running = sum(1 for t in trainers if t.process.poll() is None)
        samples.append((time.monotonic() - t_ready, server.rss_mib(), running))
        if running == 0:
            break
        stop.wait(5.0)
    stop.set()
    readers.join()
    all_running = [s for s in samples if s[2] == n_trainers]
    rss_end = all_running[-1][1] if all_running else float("nan")
    rss_after = server.rss_mib()
    rss_max = max(s[1] for s in samples)
    # the first minute holds the warm-up (each model's first batches and optimizer state)
    warm = [s for s in all_running if s[0] >= 60]
    rss_warm = warm[0][1] if warm else rss_start

    trainer_rows = []
    run_checks = []
    import httpx

    for i, t in enumerate(trainers):
        code = t.wait(120)
        errors = t.of("error")
        done = t.of("done")
        losses = t.of("loss")
        ready = t.of("ready")
        if code != 0 or errors or not done:
            failures.append(f"trainer {i}: exit {code}, {errors[:1] or t.tail()}")
        run = ready[0]["run"] if ready else None
        points = []
        if run:
            r = httpx.get(f"{server.api}/training_runs/{run}/metrics",
                          headers={"Authorization": f"Bearer {keys[i % n_users]}"}, timeout=60, trust_env=False)
            points = r.json().get("points", []) if r.is_success else []
            problems, last = history_problems(points, ACCUM)
            if len([p for p in points if not p["superseded"]]) != len(losses):
                problems.append(f"{len(points)} metric points for {len(losses)} micro-batches")
            run_checks += [f"trainer {i} run {run}: {x}" for x in problems]
        trainer_rows.append([i, f"soak-{i % n_users}", run, len(losses), len(t.of("saved")),
                             losses[-1]["loss"] if losses else "-", code])
    failures += run_checks
    alive = server.alive()
    server.stop()
    if jupyter is not None:
        jupyter.send_signal(signal.SIGTERM)
        try:
            jupyter.wait(30)
        except subprocess.TimeoutExpired:
            jupyter.kill()
    failures += [f"reader: {e}" for e in readers.errors[:20]]

    lat = sorted(readers.latencies)
    report.table(["trainer", "user", "run", "micro-batches", "checkpoints", "last loss", "exit"], trainer_rows)
    report.table(["t (s)", "server RSS (MiB)", "trainers running"],
                 [(f"{t:.0f}", f"{r:.0f}", n) for t, r, n in samples[:: max(1, len(samples) // 20)]])
    report.table(
        ["figure", "value"],
        [("training window (s)", f"{samples[-1][0]:.0f}"), ("trainer set-up (s)", f"{t_ready - t_go:.0f}"),
         ("micro-batches, all trainers", sum(r[3] for r in trainer_rows)),
         ("reader requests", readers.requests), ("of them to the dashboard", readers.dashboard_requests),
         ("reader errors", len(readers.errors)),
         ("reader latency p50 / p95 / max (s)",
          f"{statistics.median(lat):.3f} / {lat[int(0.95 * (len(lat) - 1))]:.3f} / {lat[-1]:.3f}" if lat else "-"),
         ("server RSS idle / start / end / after / max (MiB)",
          f"{rss_idle:.0f} / {rss_start:.0f} / {rss_end:.0f} / {rss_after:.0f} / {rss_max:.0f}"),
         ("RSS growth over the window (MiB)", f"{rss_end - rss_start:.0f}"),
         ("RSS growth after the first minute (MiB)", f"{rss_end - rss_warm:.0f}")],
    )
    for line in failures[:40]:
        report.line(f"FAILURE: {line}")
    report.finish(
        trainers=n_trainers, readers=n_readers, users=n_users, dashboard=dashboard and dash is not None,
        window_s=round(samples[-1][0]), micro_batches=sum(r[3] for r in trainer_rows),
        trainer_failures=sum(1 for r in trainer_rows if r[6] != 0), metric_problems=len(run_checks),
        reader_requests=readers.requests, dashboard_requests=readers.dashboard_requests,
        reader_errors=len(readers.errors),
        latency_p50_s=round(statistics.median(lat), 4) if lat else None,
        latency_p95_s=round(lat[int(0.95 * (len(lat) - 1))], 4) if lat else None,
        rss_idle_mib=round(rss_idle), rss_start_mib=round(rss_start), rss_end_mib=round(rss_end),
        rss_after_mib=round(rss_after), rss_max_mib=round(rss_max), rss_growth_mib=round(rss_end - rss_start),
        rss_growth_after_first_minute_mib=round(rss_end - rss_warm),
        server_alive=alive, errors=len(failures), failures=failures[:40],
    )
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
