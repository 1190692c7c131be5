"""The remote path under failure: dropped connections and a server killed mid-training."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path
from urllib.parse import urlparse

import pytest
from peft import LoraConfig

import twinkle.dataloader
import twinkle.dataset
import twinkle.model

pytestmark = pytest.mark.server

MODEL = "builtin://tiny-qwen2"
ROWS = 48
BATCH = 4


class DroppingProxy:
    """A loopback TCP proxy that cuts every ``drop_every``-th HTTP request's connection after
    the server received the request and started answering: the call ran, the client never
    saw the answer, exactly the case a retry must not run twice."""

    def __init__(self, upstream_url: str, drop_every: int) -> None:
        parsed = urlparse(upstream_url)
        self.upstream = (parsed.hostname, parsed.port)
        self.drop_every = drop_every
        self.requests = 0
        self.dropped = 0
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.port = 0

    def start(self) -> str:
        self.thread.start()
        server = asyncio.run_coroutine_threadsafe(
            asyncio.start_server(self._handle, "127.0.0.1", 0), self.loop
        ).result(10)
        self.port = server.sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        async def shutdown() -> None:
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        asyncio.run_coroutine_threadsafe(shutdown(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection(*self.upstream)
        state = {"drop": False}

        async def client_to_server() -> None:
            while data := await reader.read(65536):
                if data.startswith((b"POST ", b"GET ", b"DELETE ")):
                    self.requests += 1
                    state["drop"] = self.requests % self.drop_every == 0
                up_writer.write(data)
                await up_writer.drain()

        async def server_to_client() -> None:
            while data := await up_reader.read(65536):
                if state["drop"]:
                    self.dropped += 1
                    writer.transport.abort()
                    up_writer.transport.abort()
                    return
                writer.write(data)
                await writer.drain()

        tasks = [asyncio.ensure_future(client_to_server()), asyncio.ensure_future(server_to_client())]
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        for task in tasks:
            task.cancel()
        writer.transport.abort()
        up_writer.transport.abort()


def _pipeline(dataset_cls, dataloader_cls, meta_cls):
    dataset = dataset_cls(dataset_meta=meta_cls("builtin://self-cognition", data_slice=range(ROWS)))
    dataset.set_template("Template", model_id=MODEL, max_length=512)
    dataset.map("SelfCognitionProcessor", init_args={"model_name": "tw", "model_author": "team"})
    dataset.encode(batched=True)
    return dataloader_cls(dataset=dataset, batch_size=BATCH)


def _model(model_cls, output_dir: str | None = None):
    kwargs = {"output_dir": output_dir} if output_dir else {}
    model = model_cls(model_id=MODEL, **kwargs)
    model.add_adapter_to_model("default", LoraConfig(target_modules="all-linear", r=4), gradient_accumulation_steps=2)
    model.set_optimizer("AdamW", lr=1e-3)
    model.set_lr_scheduler("LinearLR")
    return model


def _train(model, dataloader, steps: int) -> list[float]:
    losses = []
    while len(losses) < steps:
        for batch in dataloader:
            output = model.forward_backward(inputs=batch)
            model.clip_grad_norm(1.0)
            model.step()
            model.zero_grad()
            model.lr_step()
            losses.append(output)
            if len(losses) == steps:
                break
    return [float(x) for x in losses]


def local_losses(tmp_path: Path, steps: int) -> list[float]:
    loader = _pipeline(twinkle.dataset.Dataset, twinkle.dataloader.DataLoader, twinkle.dataset.DatasetMeta)
    return _train(_model(twinkle.model.MultiLoraTransformersModel, str(tmp_path / "local")), loader, steps)


def remote_classes():
    import twinkle_client.dataloader
    import twinkle_client.dataset
    import twinkle_client.model

    return (twinkle_client.dataset.Dataset, twinkle_client.dataloader.DataLoader,
            twinkle_client.dataset.DatasetMeta, twinkle_client.model.MultiLoraTransformersModel)


def test_dropped_connections_change_nothing(server, add_user, tmp_path) -> None:
    from twinkle_client import init_twinkle_client

    key = add_user(server.data_dir, "flaky-net")
    proxy = DroppingProxy(server.url, drop_every=3)
    url = proxy.start()
    try:
        init_twinkle_client(base_url=url, api_key=key)
        dataset_cls, loader_cls, meta_cls, model_cls = remote_classes()
        loader = _pipeline(dataset_cls, loader_cls, meta_cls)
        model = _model(model_cls)
        steps = 16
        remote = _train(model, loader, steps)
        assert model.get_train_state()["cur_step"] == steps // 2
        model.close()
    finally:
        proxy.stop()
    assert proxy.dropped >= 3, (proxy.requests, proxy.dropped)
    assert remote == pytest.approx(local_losses(tmp_path, steps), abs=1e-6)


def test_sigkill_mid_training_then_resume(start_server, add_user, tmp_path) -> None:
    from twinkle_client import TwinkleClient, init_twinkle_client

    data_dir = tmp_path / "server"
    srv = start_server(data_dir)
    key = add_user(data_dir, "crashy")
    # A short retry budget: the trainer below gives up on the killed server soon after.
    init_twinkle_client(base_url=srv.url, api_key=key, retry_timeout=5.0)
    dataset_cls, loader_cls, meta_cls, model_cls = remote_classes()
    loader = _pipeline(dataset_cls, loader_cls, meta_cls)
    model = _model(model_cls)
    run_id = model.training_run_id
    seen: list[float] = []
    trained_six = threading.Event()

    def train_and_save() -> None:
        try:
            for i in range(1000):
                seen.extend(_train(model, loader, 2))
                if len(seen) >= 6:
                    trained_six.set()
                model.save(f"step-{i + 1}", save_optimizer=True)
        except Exception:  # the server is killed under this loop
            pass

    trainer = threading.Thread(target=train_and_save, daemon=True)
    trainer.start()
    assert trained_six.wait(120), f"training did not get going: {seen}"
    srv.kill()  # SIGKILL, mid-training, possibly mid-save

    srv = start_server(data_dir)
    with TwinkleClient(base_url=srv.url, api_key=key) as client:
        assert [r.training_run_id for r in client.list_training_runs()] == [run_id]
        ckpts = client.list_checkpoints(run_id)
        assert ckpts, "no checkpoint survived"
        latest = client.get_latest_checkpoint_path(run_id)
        assert latest == ckpts[-1].twinkle_path
        assert not list(Path(data_dir).rglob(".tmp-*"))

    init_twinkle_client(base_url=srv.url, api_key=key)
    trainer.join(90)
    assert not trainer.is_alive(), "the trainer did not give up on the killed server"
    dataset_cls, loader_cls, meta_cls, model_cls = remote_classes()
    model = model_cls(model_id=MODEL)
    model.add_adapter_to_model("default", LoraConfig(target_modules="all-linear", r=4), gradient_accumulation_steps=2)
    for ckpt in ckpts:  # every listed checkpoint is complete: each one loads
        model.load(ckpt.twinkle_path, load_optimizer=True)
    progress = model.resume_from_checkpoint(latest)
    done = progress["consumed_train_samples"] // BATCH
    assert progress["cur_step"] == done // 2 and done >= 2
    loader = _pipeline(dataset_cls, loader_cls, meta_cls)
    loader.resume_from_checkpoint(progress["consumed_train_samples"])
    resumed = _train(model, loader, 16 - done)
    expected = local_losses(tmp_path, 16)
    assert seen[:done] == pytest.approx(expected[:done], abs=1e-6)
    assert resumed == pytest.approx(expected[done:], abs=1e-6)
    assert model.training_run_id == run_id
    model.close()
    srv.stop()
