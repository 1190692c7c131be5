"""Fuzz every operation of the server's /openapi.json with schemathesis, with a key and without.

    .venv/bin/python -m stress.fuzz_api [--examples 300] [--negative 100] [--budget-s 120] [--keep DIR] [--smoke]

For every operation, schemathesis (on hypothesis) generates requests from the schema: valid
ones (``--examples`` per operation) and invalid ones (``--negative``). The object routes'
msgpack and JSON bodies are described in the schema (``CreateObjectRequest``, ``CallBatch``);
msgpack bodies are packed here. Operations with path parameters are fuzzed twice: with
generated ids, and with the ids of real objects, a real run and a real checkpoint of the key's
user (so that call batches reach a live dataset, dataloader and model). Raw bytes (msgpack,
gzip or not) go to both object routes as well.

Each request is sent with the valid key and again without one. Counted: responses >= 500,
bodies holding a traceback or a server path (the data directory, the server's code, the
virtualenv, the home directory) that the request itself did not carry, answers without a key
that are not 401, and schemathesis's own checks on the keyed responses (reported apart: a
schema mismatch is not a crash).
"""

from __future__ import annotations

import argparse
import builtins
import gzip
import json
import os
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from stress.common import ROOT, Report, add_user, start_server, work_dir  # noqa: E402

OPEN_PATHS = {"/api/v1/health", "/openapi.json"}
# schemathesis raises its FailureGroup, a BaseExceptionGroup (Python 3.11+; exceptiongroup's before)
FAILURES = (Exception, getattr(builtins, "BaseExceptionGroup", Exception))


def register_msgpack() -> None:
    import msgpack
    import schemathesis

    @schemathesis.serializer("application/msgpack")
    def to_msgpack(ctx: Any, value: Any) -> bytes:
        try:
            return msgpack.packb(value, use_bin_type=True)
        except (OverflowError, TypeError, ValueError):
            # an integer msgpack cannot hold: the body goes as JSON text (itself a bad body)
            return json.dumps(value, default=str).encode()


class Tally:
    """Everything the fuzzer saw."""

    def __init__(self, needles: dict[str, str]) -> None:
        self.needles = needles
        self.requests = 0
        self.by_status: Counter[int] = Counter()
        self.by_status_keyed: Counter[int] = Counter()
        self.keyed_401: list[dict[str, Any]] = []
        self.server_errors: list[dict[str, Any]] = []
        self.leaks: list[dict[str, Any]] = []
        self.unauth_not_401: list[dict[str, Any]] = []
        self.unauth_2xx: list[dict[str, Any]] = []
        self.check_failures: Counter[str] = Counter()
        self.check_examples: dict[str, dict[str, Any]] = {}
        self.transport_errors: list[dict[str, Any]] = []
        self.per_op: Counter[str] = Counter()

    def record(self, op: str, keyed: bool, method: str, url: str, body: bytes | None, status: int,
               content: bytes) -> None:
        self.requests += 1
        self.per_op[op] += 1
        self.by_status[status] += 1
        shown = _show(body)
        item = {"op": op, "key": keyed, "method": method, "url": url, "body": shown, "status": status,
                "reply": content[:400].decode("utf-8", "replace")}
        if keyed:
            self.by_status_keyed[status] += 1
            if status == 401:
                self.keyed_401.append(item)
        if status >= 500:
            self.server_errors.append(item)
        sent = (url + (body or b"").decode("latin-1")).lower()
        text = content.decode("utf-8", "replace")
        for label, needle in self.needles.items():
            if needle and needle.lower() in text.lower() and needle.lower() not in sent:
                self.leaks.append({**item, "found": label})
        path = url.split("://", 1)[-1].split("/", 1)[-1].split("?", 1)[0]
        if not keyed and "/" + path not in OPEN_PATHS:
            if 200 <= status < 300:
                self.unauth_2xx.append(item)
            elif status != 401:
                self.unauth_not_401.append(item)


def _show(body: bytes | None) -> Any:
    if not body:
        return None
    try:
        import msgpack

        return json.loads(json.dumps(msgpack.unpackb(body, raw=False, strict_map_key=False), default=repr))
    except Exception:
        pass
    try:
        return json.loads(body)
    except Exception:
        return body[:300].hex()


def real_fixtures(url: str, key: str) -> dict[str, Any]:
    """Live objects, a run and a checkpoint of the fuzzing user, for path parameters."""
    from peft import LoraConfig

    from twinkle_client import init_twinkle_client
    from twinkle_client.dataloader import DataLoader
    from twinkle_client.dataset import Dataset, DatasetMeta
    from twinkle_client.model import MultiLoraTransformersModel

    init_twinkle_client(base_url=url, api_key=key)
    dataset = Dataset(dataset_meta=DatasetMeta("builtin://self-cognition", data_slice=range(16)))
    dataset.set_template("Template", model_id="builtin://tiny-qwen2", max_length=256)
    dataset.map("SelfCognitionProcessor", init_args={"model_name": "fuzz", "model_author": "fuzz"})
    dataset.encode(batched=True)
    loader = DataLoader(dataset=dataset, batch_size=4)
    model = MultiLoraTransformersModel(model_id="builtin://tiny-qwen2")
    model.add_adapter_to_model("default", LoraConfig(target_modules="all-linear", r=4))
    model.set_processor("InputProcessor", padding_side="right")
    model.set_optimizer("AdamW", lr=1e-3)
    batch = next(iter(loader))
    model.forward_backward(inputs=batch)
    model.step()
    path = str(model.save(name="fuzz-1", save_optimizer=True))
    run_id = model.training_run_id
    # keep the Python objects alive (their finalizers would release the server objects)
    return {"keep": (dataset, loader, model), "object_ids": [dataset.object_id, loader.object_id, model.object_id],
            "run_id": run_id, "checkpoint_id": path.rsplit("/", 1)[-1]}


def fuzz_operation(op: Any, label: str, tally: Tally, url: str, key: str, *, examples: int, mode: Any,
                   budget_s: float, seed: int, path_parameters: dict[str, Any] | None = None,
                   validate: bool = True) -> None:
    import requests
    from hypothesis import HealthCheck, Phase, given, settings

    strategy = op.as_strategy(generation_mode=mode, **({"path_parameters": path_parameters} if path_parameters else {}))
    keyed, anon = requests.Session(), requests.Session()
    keyed.trust_env = anon.trust_env = False  # loopback only, never a proxy
    end = time.monotonic() + budget_s

    @settings(max_examples=examples, deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck), phases=[Phase.explicit, Phase.generate])
    @given(case=strategy)
    def run(case: Any) -> None:
        if time.monotonic() > end:
            return
        for with_key in (True, False):
            headers = {"Authorization": f"Bearer {key}"} if with_key else {}
            if not with_key and case.headers:
                case.headers.pop("Authorization", None)
            try:
                response = case.call(base_url=url, session=keyed if with_key else anon, headers=headers, timeout=60)
            except Exception as exc:  # a connection reset or a timeout is a finding too
                tally.transport_errors.append({"op": label, "key": with_key, "error": f"{type(exc).__name__}: {exc}"[:300]})
                continue
            req = response.request
            body = req.body.encode() if isinstance(req.body, str) else req.body
            # What was sent decides: a negative case may leave out or replace the header given here.
            sent_key = req.headers.get("Authorization") == f"Bearer {key}"
            tally.record(label, sent_key, req.method or "?", req.url or "?", body, response.status_code,
                         response.content)
            if with_key and validate:
                try:
                    case.validate_response(response, headers=headers)
                except FAILURES as exc:  # schemathesis's FailureGroup
                    for failure in getattr(exc, "exceptions", None) or [exc]:
                        title = getattr(failure, "title", None) or type(failure).__name__
                        name = f"{label}: {title}"
                        tally.check_failures[name] += 1
                        tally.check_examples.setdefault(name, {
                            "method": req.method, "url": req.url, "body": _show(body),
                            "status": response.status_code, "reply": response.content[:300].decode("utf-8", "replace"),
                        })

    run._hypothesis_internal_use_seed = seed  # type: ignore[attr-defined]
    run()


def fuzz_raw_bodies(tally: Tally, url: str, key: str, object_id: str, examples: int, seed: int) -> None:
    """Arbitrary bytes as msgpack bodies, plain and gzipped, to both object routes."""
    import requests
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis import strategies as st

    session = requests.Session()
    session.trust_env = False

    @settings(max_examples=examples, deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck), phases=[Phase.explicit, Phase.generate])
    @given(data=st.binary(max_size=2048), gz=st.booleans(), calls=st.booleans())
    def run(data: bytes, gz: bool, calls: bool) -> None:
        path = f"/api/v1/objects/{object_id}/calls" if calls else "/api/v1/objects"
        headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/msgpack"}
        body = gzip.compress(data) if gz else data
        if gz:
            headers["Content-Encoding"] = "gzip"
        r = session.post(url + path, data=body, headers=headers, timeout=60)
        tally.record("POST raw bytes" + (" (gzip)" if gz else ""), True, "POST", url + path, data, r.status_code,
                     r.content)

    run._hypothesis_internal_use_seed = seed  # type: ignore[attr-defined]
    run()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--examples", type=int, default=None, help="valid examples per operation (default 300; smoke 5)")
    p.add_argument("--negative", type=int, default=None, help="invalid examples per operation (default 100; smoke 3)")
    p.add_argument("--budget-s", type=float, default=None, help="seconds per operation and mode (default 150)")
    p.add_argument("--total-budget-s", type=float, default=None,
                   help="seconds for the whole fuzzing (default 1500; smoke 120); operations past it are skipped")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--keep", default=None, help="keep data and logs in this folder (emptied first)")
    p.add_argument("--smoke", action="store_true")
    args = p.parse_args(argv)
    examples = args.examples if args.examples is not None else (5 if args.smoke else 300)
    negative = args.negative if args.negative is not None else (3 if args.smoke else 100)
    budget = args.budget_s if args.budget_s is not None else (20.0 if args.smoke else 150.0)
    total = args.total_budget_s if args.total_budget_s is not None else (120.0 if args.smoke else 1500.0)
    report = Report("fuzz_api", args.smoke)
    work = work_dir("fuzz", args.keep)
    # hypothesis keeps its caches there, not in the current folder
    os.environ.setdefault("HYPOTHESIS_STORAGE_DIRECTORY", str(work / "hypothesis"))

    import schemathesis
    from schemathesis import GenerationMode

    register_msgpack()
    data = work / "data"
    server = start_server(data)
    key = add_user(data, "fuzzer")
    fixtures = real_fixtures(server.url, key)
    needles = {
        "Traceback": "Traceback (most recent call last)",
        "data dir": str(data.resolve()),
        "work dir": str(work.resolve()),
        "server code": str(ROOT / "server"),
        "repository": str(ROOT),
        "virtualenv": sys.prefix,
        "home dir": os.path.expanduser("~"),
        'a "File" line': 'File "/',
    }
    tally = Tally(needles)
    schema = schemathesis.openapi.from_url(server.url + "/openapi.json")
    operations = [r.ok() for r in schema.get_all_operations()]
    # Deletions last, so that the reads still find the real run, checkpoint and objects.
    operations.sort(key=lambda op: (op.method.upper() == "DELETE", op.path))
    report.line(f"server {server.url}, {len(operations)} operations; {examples} valid + {negative} invalid "
                f"examples per operation and id set, each sent with the key and without")
    seed = args.seed
    skipped: list[str] = []
    fuzz_end = time.monotonic() + total
    real_params = {"run_id": fixtures["run_id"], "checkpoint_id": fixtures["checkpoint_id"]}
    for op in operations:
        label = f"{op.method.upper()} {op.path}"
        names = {p.name for p in op.path_parameters} if hasattr(op, "path_parameters") else set()
        id_sets: list[tuple[str, dict[str, Any] | None]] = [("generated ids", None)]
        if "object_id" in names:
            id_sets += [(f"real {kind}", {"object_id": oid})
                        for kind, oid in zip(("dataset", "dataloader", "model"), fixtures["object_ids"], strict=True)]
        elif names and names <= set(real_params):
            id_sets.append(("real ids", {n: real_params[n] for n in names}))
        for id_label, params in id_sets:
            for mode, count in ((GenerationMode.POSITIVE, examples), (GenerationMode.NEGATIVE, negative)):
                seed += 1
                if time.monotonic() > fuzz_end:
                    skipped.append(f"{label} [{id_label}, {mode.value}]")
                    continue
                t0 = time.monotonic()
                before = tally.requests
                try:
                    fuzz_operation(op, label, tally, server.url, key, examples=count, mode=mode, budget_s=budget,
                                   seed=seed, path_parameters=params)
                except FAILURES as exc:  # e.g. nothing to generate for this mode
                    report.line(f"  {label} [{id_label}, {mode.value}]: not fuzzed: {type(exc).__name__}: "
                                f"{str(exc).splitlines()[0][:200] if str(exc) else ''}")
                    continue
                report.line(f"  {label} [{id_label}, {mode.value}]: {tally.requests - before} requests "
                            f"in {time.monotonic() - t0:.1f} s")
    t0 = time.monotonic()
    before = tally.requests
    fuzz_raw_bodies(tally, server.url, key, fixtures["object_ids"][2], max(examples, 5), seed + 1)
    report.line(f"  raw bytes to the object routes: {tally.requests - before} requests in {time.monotonic() - t0:.1f} s")
    if skipped:
        report.line(f"skipped past the total budget of {total:.0f} s: {', '.join(skipped)}")
    alive = server.alive()
    server_log = server.log()
    server.stop()
    log_tracebacks = server_log.count("Traceback (most recent call last)")

    report.table(["operation", "requests"], sorted(tally.per_op.items()))
    report.table(["status", "with the key", "without a key"],
                 [(k, tally.by_status_keyed[k], v - tally.by_status_keyed[k]) for k, v in sorted(tally.by_status.items())])
    if tally.check_failures:
        report.line("schemathesis checks that failed on keyed responses (not crashes; the first example of each):")
        report.table(["operation: check", "count", "example"],
                     [(k, v, json.dumps(tally.check_examples[k], default=str)[:300])
                      for k, v in sorted(tally.check_failures.items())])
    for title, items in (("RESPONSES >= 500", tally.server_errors), ("LEAKS IN BODIES", tally.leaks),
                         ("2xx WITHOUT A KEY", tally.unauth_2xx), ("TRANSPORT ERRORS", tally.transport_errors)):
        if items:
            report.line(f"{title} ({len(items)}; up to 10 shown):")
            for item in items[:10]:
                report.line("  " + json.dumps(item, default=str)[:1000])
    if tally.unauth_not_401:
        statuses = Counter(i["status"] for i in tally.unauth_not_401)
        report.line(f"without a key, not 401 (by status): {dict(statuses)}; first: "
                    f"{json.dumps(tally.unauth_not_401[0], default=str)[:400]}")
    if tally.keyed_401:
        report.line(f"401 with the key ({len(tally.keyed_401)}): "
                    f"{json.dumps(tally.keyed_401[0], default=str)[:400]}")
    report.line(f"server alive at the end: {alive}; tracebacks in the server log: {log_tracebacks}")
    report.finish(
        operations=len(operations), requests=tally.requests,
        status_counts={str(k): v for k, v in sorted(tally.by_status.items())},
        responses_5xx=len(tally.server_errors), bodies_with_traceback_or_path=len(tally.leaks),
        unauthenticated_2xx=len(tally.unauth_2xx), unauthenticated_not_401=len(tally.unauth_not_401),
        transport_errors=len(tally.transport_errors), schemathesis_check_failures=sum(tally.check_failures.values()),
        schemathesis_checks_failed=sorted(tally.check_failures), server_alive=alive,
        server_log_tracebacks=log_tracebacks,
        first_5xx=tally.server_errors[:10], first_leaks=tally.leaks[:10],
        examples_per_operation=examples, negative_per_operation=negative, skipped_for_time=skipped,
    )
    bad = tally.server_errors or tally.leaks or tally.unauth_2xx or not alive
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
