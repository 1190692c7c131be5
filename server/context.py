"""``ServerContext``: the one bundle of server state the routes work with."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field, replace
from typing import Any, TypeVar

from twinkle.hub import HubCredentials, hub_credentials
from twinkle.model import MultiLoraTransformersModel
from twinkle.paths import cache_dir
from twinkle.protocol.api import Stepwise
from twinkle.protocol.wire import ErrorInfo
from twinkle.uploads import UploadJobs

from .errors import ErrorScrubber
from .kinds import DEVICE_KINDS
from .model_handle import ModelHandle
from .objects import ObjectRegistry, Reaper, RemoteObject
from .runs import RunBook
from .settings import FUSE_TOKENS, Settings
from .store import Store
from .worker import DeviceWorker, FairExecutor, Fusable

T = TypeVar("T")
log = logging.getLogger("twinkle_server")


@dataclass
class ServerContext:
    """Settings, database, the served model and the machinery that runs calls on it."""

    settings: Settings
    store: Store
    model: MultiLoraTransformersModel
    dtype: str
    worker: DeviceWorker = field(init=False)
    """The device thread; gathers waiting calls of several users into fused passes."""
    uploads: UploadJobs = field(init=False)
    """Background hub uploads, capped by ``settings.max_uploads`` and ``max_uploads_per_user``."""
    objects: ObjectRegistry = field(init=False)
    book: RunBook = field(init=False)
    scrubber: ErrorScrubber = field(init=False)
    data_pool: FairExecutor = field(init=False)
    """The data threads, round-robin per user, at most ``data_threads_per_user`` of them per user."""
    reaper: Reaper = field(init=False)
    _shut_down: bool = field(default=False, init=False)

    def __post_init__(self) -> None:
        settings = self.settings
        fuse = settings.fuse_tokens
        if fuse is None:
            fuse = FUSE_TOKENS if self.model.device.type == "cuda" else 0
        self.worker = DeviceWorker(fuse_tokens=fuse)
        # A sample call holds the device as long as it generates: bound it like a training call.
        self.model.sample_token_budget = settings.max_tokens_per_call
        self.uploads = UploadJobs(settings.max_uploads, settings.max_uploads_per_user,
                                  limit_note=", set by twinkle-server serve --max-uploads-per-user")
        self.objects = ObjectRegistry(settings.idle_timeout, settings.max_objects_per_user)
        self.book = RunBook(self.store, settings, self.model, self.uploads)
        self.scrubber = ErrorScrubber([settings.data_dir, self.model.model_dir, cache_dir()])
        self.data_pool = FairExecutor(settings.data_threads, settings.data_threads_per_user, name="twinkle-data")
        # Check a few times per timeout, so that expiry happens close to when it is due.
        interval = min(max(self.settings.idle_timeout / 4, 0.2), 10.0)
        self.reaper = Reaper(self.objects, self.close_object, interval)

    @property
    def device(self) -> str:
        return str(self.model.device)

    def start(self) -> None:
        self.reaper.start()

    def submit(self, obj_kind: str, user_id: int, fn: Callable[[], T]) -> Future[T]:
        """Run ``fn`` where objects of ``obj_kind`` run: the device worker for models, else a data
        thread. Both serve users round-robin; a user holds at most its share of the data threads."""
        if obj_kind in DEVICE_KINDS:
            return self.worker.submit(user_id, fn)
        return self.data_pool.submit(user_id, fn)

    def error_info(self, exc: BaseException, request_id: str | None, *, call: str | None = None) -> ErrorInfo:
        """What a client reads of ``exc`` (see ``ErrorScrubber``)."""
        return self.scrubber.info(exc, request_id, call=call)

    async def run_fusable(self, user_id: int, fusable: Fusable, hub: HubCredentials | None = None) -> Any:
        """A model call that may share a device pass with other users' calls (see ``Fusable``);
        its own parts run with the user's hub credentials, as ``run`` does."""
        credentials = hub or HubCredentials()
        mine = replace(fusable, begin=_as_user(credentials, fusable.begin), end=_as_user(credentials, fusable.end))
        return await asyncio.wrap_future(self.worker.submit(user_id, fusable=mine))

    async def run(self, obj_kind: str, user_id: int, fn: Callable[[], T],
                  hub: HubCredentials | None = None) -> T:
        """``submit`` and await, without blocking the event loop. The work runs with the user's
        hub credentials (anonymous when none were sent), never the server's."""
        return await asyncio.wrap_future(self.submit(obj_kind, user_id, _as_user(hub or HubCredentials(), fn)))

    async def finish(self, obj_kind: str, user_id: int, value: Any, hub: HubCredentials | None = None) -> Any:
        """The value of a call that ran: a ``Stepwise`` one (``Method.stepwise``) is driven one
        step per turn of the device, so other users' calls run between its steps."""
        if not isinstance(value, Stepwise):
            return value
        done = False
        try:
            while not await self.run(obj_kind, user_id, value.step, hub):
                pass
            done = True
            return value.result()
        finally:
            if not done:  # failed or cancelled half way: free what it holds, on the device's thread
                self.submit(obj_kind, user_id, value.close)

    def close_object(self, obj: RemoteObject, why: str) -> None:
        """Release what an object holds (a model's adapters and runs), from any thread but the loop."""
        if isinstance(obj.instance, ModelHandle):
            self.worker.call(obj.user_id, obj.instance.close)
        log.info("user %s: %s %s %s", obj.user_name, obj.kind, obj.object_id, why)

    def shutdown(self) -> None:
        """Stop the reaper, detach every live model's runs, stop the threads, close the database (once)."""
        if self._shut_down:
            return
        self._shut_down = True
        self.reaper.stop()
        for obj in self.objects.pop_all():
            try:
                self.close_object(obj, "closed at shutdown")
            except Exception:
                log.exception("closing %s at shutdown failed", obj.object_id)
        self.worker.stop()
        self.data_pool.stop(timeout=0)  # queued data work is cancelled; running work is not awaited
        self.store.close()


def _as_user(credentials: HubCredentials, fn: Callable[..., T]) -> Callable[..., T]:
    """``fn`` run with ``credentials`` as the hub credentials of whatever it downloads or uploads."""

    def wrapped(*args: Any) -> T:
        with hub_credentials(credentials):
            return fn(*args)

    return wrapped
