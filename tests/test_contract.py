"""The contract: the same API call returns the same value locally and remotely.

One scenario (``contract_scenario``) runs three times: on the local library classes, on the
``twinkle_client`` classes over the server app in this process, and on the ``twinkle_client``
classes over a real ``twinkle-server`` process. Every value any declared method returned is
compared with the local one, as its declaration in ``twinkle.protocol.api`` says (a saved
checkpoint is a folder locally and a ``twinkle://`` path remotely; everything else is equal,
floats to a relative 1e-5). Every declared method must appear in the scenario.
"""

from __future__ import annotations

import traceback
from pathlib import Path
from typing import Any

import pytest
from support import contract_scenario as scenario
from support import inprocess

pytestmark = pytest.mark.server




def _run(label: str, classes: Any, extra_data: Path, failures: list[str]) -> Any:
    """Run the scenario; a failure is noted, and the values recorded up to it are returned."""
    try:
        record, objects = scenario.run_scenario(classes, extra_data)
    except Exception as exc:
        record, objects = exc.record, exc.objects  # type: ignore[attr-defined]
        where = record.entries[-1].label if record.entries else "the start"
        failures.append(f"{label}: the scenario failed after {where}: "
                        f"{''.join(traceback.format_exception_only(exc)).strip()}")
    return record, objects


def _remote_classes() -> Any:
    from twinkle_client.dataloader import DataLoader
    from twinkle_client.dataset import Dataset
    from twinkle_client.model import MultiLoraTransformersModel
    from twinkle_client.sampler import TorchSampler

    return scenario.Classes(Dataset=Dataset, DataLoader=DataLoader, Model=MultiLoraTransformersModel,
                            Sampler=TorchSampler)


def _remote_run(label: str, extra_data: Path, failures: list[str], **client_kwargs: Any) -> Any:
    from twinkle_client import init_twinkle_client

    client = init_twinkle_client(**client_kwargs)
    try:
        record, objects = _run(label, _remote_classes(), extra_data, failures)
        for obj in reversed(objects):
            try:
                obj.close()
            except Exception as exc:
                failures.append(f"{label}: closing {obj!r} failed: {exc}")
    finally:
        client.close()
    return record


def test_same_values_locally_and_remotely(tmp_path, start_server, add_user) -> None:
    from twinkle.dataloader import DataLoader
    from twinkle.dataset import Dataset
    from twinkle.model import MultiLoraTransformersModel
    from twinkle.sampler import TorchSampler

    extra_data = scenario.write_extra_data(tmp_path / "data")
    failures: list[str] = []

    local_classes = scenario.Classes(Dataset=Dataset, DataLoader=DataLoader, Model=MultiLoraTransformersModel,
                                     Sampler=TorchSampler, model_kwargs={"output_dir": str(tmp_path / "local-output")})
    local, _ = _run("local", local_classes, extra_data, failures)
    failures += scenario.missing_methods(local)
    failures += scenario.check_laziness(local, remote=False, side="local")

    records = {}
    with inprocess.inprocess_server(tmp_path / "inprocess-data", allow_local_data=True) as server:
        records["in-process server"] = _remote_run(
            "in-process server", extra_data, failures,
            base_url=server.base_url, api_key=server.api_key, http_transport=server.transport,
        )

    data_dir = tmp_path / "server-data"
    handle = start_server(data_dir, "--allow-local-data", "--device", "cpu", "--dtype", "float32")
    try:
        records["server process"] = _remote_run(
            "server process", extra_data, failures, base_url=handle.url, api_key=add_user(data_dir, "contract"),
        )
    finally:
        handle.stop()

    for side, record in records.items():
        failures += scenario.check_laziness(record, remote=True, side=side)
        failures += scenario.compare(local, record, side)
    assert not failures, f"{len(failures)} differences:\n" + "\n".join(failures)
