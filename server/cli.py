"""``twinkle-server``: run the server, manage its users.

    twinkle-server serve [--model ID] [--host H] [--port P] [--data-dir DIR] [--max-loras N]
                         [--max-r R] [--idle-timeout S] [--header-timeout S] [--allow-local-data]
                         [--max-loras-per-user N] [--max-objects-per-user N]
                         [--data-threads N] [--data-threads-per-user N]
                         [--max-tokens-per-call N] [--fuse-tokens N]
                         [--max-uploads N] [--max-uploads-per-user N]
    twinkle-server users add NAME      # prints the new key as the last line, once
    twinkle-server users list
    twinkle-server users revoke NAME

Errors are one line on stderr and exit code 1. ``users`` commands never load torch.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import os
import socket
import sys
import warnings
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

from twinkle.errors import TwinkleError

from .settings import DEFAULT_IDLE_TIMEOUT, DEFAULT_MODEL, FUSE_TOKENS, Settings, default_data_dir

log = logging.getLogger("twinkle_server")
LISTENING = "twinkle-server listening on"
DEFAULT_HEAD_TIMEOUT = 20.0
"""Seconds a client has for a request's line and headers (``--header-timeout``; see http_protocol)."""


class CliError(Exception):
    """A failure to report as one line and exit code 1."""


def _quiet_libraries() -> None:
    """No progress bars or library chatter in the server's output (set before those libraries load)."""
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # Deprecation notices of the ML libraries speak to their developers, not to a server operator.
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"(transformers|peft|datasets|torch)(\.|$)")
    # peft notes which slot becomes active when an adapter is removed; every call activates its own.
    warnings.filterwarnings("ignore", message=r"Adapter .* was active which is now deleted", category=UserWarning)


def _setup_logging() -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger("twinkle_server")
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO)
    root.propagate = False


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def _port(text: str) -> int:
    value = int(text)
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"must be 0-65535, got {value}")
    return value


def _seconds(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="twinkle-server", description="The twinkle training server.")
    sub = parser.add_subparsers(dest="command", required=True)

    def data_dir_option(p: argparse.ArgumentParser) -> None:
        p.add_argument("--data-dir", type=Path, default=None,
                       help="database and checkpoints (default: $TWINKLE_DATA_DIR or ./twinkle_data)")

    serve = sub.add_parser("serve", help="load the base model and serve it")
    serve.add_argument("--model", default=DEFAULT_MODEL, help=f"the base model (default: {DEFAULT_MODEL})")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default: loopback only)")
    serve.add_argument("--port", type=_port, default=8000, help="port (0: pick a free one; default 8000)")
    data_dir_option(serve)
    serve.add_argument("--max-loras", type=_positive_int, default=5, help="adapter slots (default 5)")
    serve.add_argument("--max-r", type=_positive_int, default=32, help="highest LoRA rank (default 32)")
    serve.add_argument("--idle-timeout", type=_seconds, default=DEFAULT_IDLE_TIMEOUT,
                       help=f"seconds without calls before a remote object is closed (default {DEFAULT_IDLE_TIMEOUT:g})")
    serve.add_argument("--allow-local-data", action="store_true",
                       help="let clients name files of this machine as datasets and templates")
    serve.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    serve.add_argument("--dtype", default=None, help="model dtype (default: bfloat16 on cuda, float32 on cpu)")
    serve.add_argument("--header-timeout", type=_seconds, default=DEFAULT_HEAD_TIMEOUT, metavar="S",
                       help="seconds a client has to send a request's line and headers; slower or stalled "
                            f"connections are closed (default {DEFAULT_HEAD_TIMEOUT:g})")
    limits = serve.add_argument_group("fair shares (one user never takes the whole server)")
    d = Settings.__dataclass_fields__
    limits.add_argument("--max-loras-per-user", type=_positive_int, metavar="N", default=None,
                        help="adapter slots one user may hold (default: half of --max-loras, at least 1)")
    limits.add_argument("--max-objects-per-user", type=_positive_int, metavar="N", default=d["max_objects_per_user"].default,
                        help="live remote objects one user may hold (default %(default)s)")
    limits.add_argument("--data-threads", type=_positive_int, metavar="N", default=d["data_threads"].default,
                        help="threads for dataset and dataloader work (default %(default)s)")
    limits.add_argument("--data-threads-per-user", type=_positive_int, metavar="N", default=d["data_threads_per_user"].default,
                        help="data threads one user may occupy at once (default %(default)s)")
    limits.add_argument("--max-tokens-per-call", type=_positive_int, metavar="N", default=d["max_tokens_per_call"].default,
                        help="padded tokens (rows x longest row) one forward_backward/forward_only may carry "
                             "(default %(default)s)")
    limits.add_argument("--fuse-tokens", type=_non_negative_int, metavar="N", default=None,
                        help="tokens one device pass may gather from several users' forward_backward/forward_only "
                             f"calls (fused multi-LoRA); 0 runs each call alone (default {FUSE_TOKENS} on a CUDA "
                             "device, 0 on the CPU, where fusing measured slower)")
    limits.add_argument("--max-uploads", type=_positive_int, metavar="N", default=d["max_uploads"].default,
                        help="hub uploads running at once; later ones wait (default %(default)s)")
    limits.add_argument("--max-uploads-per-user", type=_positive_int, metavar="N", default=d["max_uploads_per_user"].default,
                        help="hub uploads one user may have queued or running (default %(default)s)")

    users = sub.add_parser("users", help="manage users and their API keys")
    users_sub = users.add_subparsers(dest="users_command", required=True)
    add = users_sub.add_parser("add", help="create a user and print its API key (shown once)")
    add.add_argument("name")
    data_dir_option(add)
    listing = users_sub.add_parser("list", help="list users (keys are never shown)")
    data_dir_option(listing)
    revoke = users_sub.add_parser("revoke", help="revoke a user's key")
    revoke.add_argument("name")
    data_dir_option(revoke)
    return parser


def _data_dir(args: argparse.Namespace) -> Path:
    return Path(args.data_dir) if args.data_dir is not None else default_data_dir()


# --------------------------------------------------------------------------- users


_PRIVATE_DIR, _PRIVATE_FILE = 0o700, 0o600


def _private_data_dir(data_dir: Path) -> None:
    """Keep the data directory to the server's own account: files this process creates from now on
    get no group or other permissions (umask 077: the database, run and checkpoint folders), the
    directory is 0700 and the database files 0600, tightened if an earlier setup left them looser."""
    os.umask(0o077)
    data_dir.mkdir(mode=_PRIVATE_DIR, parents=True, exist_ok=True)
    db = Settings(data_dir=data_dir).db_path
    for path, mode in [(data_dir, _PRIVATE_DIR)] + [
        (db.with_name(db.name + suffix), _PRIVATE_FILE) for suffix in ("", "-wal", "-shm", "-journal")
    ]:
        try:
            current = path.stat().st_mode & 0o777
        except FileNotFoundError:
            continue
        if current & 0o077:
            path.chmod(mode)
            log.warning("%s was open to other accounts (mode %o); it is %o now", path, current, mode)


def _open_store(data_dir: Path) -> Any:
    from .store import Store

    try:
        _private_data_dir(data_dir)
        return Store(Settings(data_dir=data_dir).db_path)
    except Exception as exc:
        raise CliError(f"cannot open the database in {data_dir}: {exc}") from None


def users_command(args: argparse.Namespace) -> None:
    from .auth import create_user

    store = _open_store(_data_dir(args))
    try:
        if args.users_command == "add":
            user, key = create_user(store, args.name)
            print(f"created user {user.name}")
            print("API key (shown only now; store it safely):")
            print(key, flush=True)
        elif args.users_command == "list":
            users = store.users()
            if not users:
                print("no users")
            for user in users:
                created = datetime.fromtimestamp(user.created).strftime("%Y-%m-%d %H:%M")
                status = "active" if user.active else "revoked"
                print(f"{user.name}\t{status}\tcreated {created}")
        else:
            store.revoke_user(args.name)
            print(f"revoked user {args.name}")
    finally:
        store.close()


# --------------------------------------------------------------------------- serve


def _url(host: str, port: int) -> str:
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise CliError(f"cannot listen on {_url(host, port)}: {exc.strerror or exc}") from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def _check_shares(args: argparse.Namespace) -> None:
    """A per-user share may not exceed the whole it is a share of."""
    for part, whole in (("max_loras_per_user", "max_loras"), ("data_threads_per_user", "data_threads"),
                        ("max_uploads_per_user", "max_uploads")):
        value, total = getattr(args, part), getattr(args, whole)
        if value is not None and value > total:
            flag, total_flag = (f"--{n.replace('_', '-')}" for n in (part, whole))
            raise CliError(f"{flag} {value} is more than {total_flag} {total}")


def serve(args: argparse.Namespace) -> None:
    _quiet_libraries()
    _check_shares(args)
    settings = Settings(
        model=args.model,
        host=args.host,
        port=args.port,
        data_dir=_data_dir(args),
        max_loras=args.max_loras,
        max_r=args.max_r,
        idle_timeout=args.idle_timeout,
        allow_local_data=args.allow_local_data,
        device=args.device,
        dtype=args.dtype,
        max_loras_per_user=args.max_loras_per_user,
        max_objects_per_user=args.max_objects_per_user,
        data_threads=args.data_threads,
        data_threads_per_user=args.data_threads_per_user,
        max_tokens_per_call=args.max_tokens_per_call,
        fuse_tokens=args.fuse_tokens,
        max_uploads=args.max_uploads,
        max_uploads_per_user=args.max_uploads_per_user,
    )
    # Bind first: a taken port fails in a second, not after the model has loaded.
    sock = _bind(settings.host, settings.port)
    ctx = _build_context(settings)
    import uvicorn

    from .app import create_app
    from .http_protocol import head_deadline_protocol

    app = create_app(ctx)
    host, port = sock.getsockname()[:2]
    url = _url(settings.host, port)

    class _Server(uvicorn.Server):
        async def startup(self, sockets: list[socket.socket] | None = None) -> None:
            await super().startup(sockets=sockets)
            if not self.should_exit:
                print(f"{LISTENING} {url}", flush=True)

        async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
            await super().shutdown(sockets=sockets)
            # Here, not after run(): uvicorn re-raises SIGTERM/SIGINT once run() unwinds.
            await asyncio.to_thread(ctx.shutdown)
            log.info("stopped")

    # uvicorn's own protocol has no deadline for receiving a request head; see http_protocol.
    config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off", timeout_keep_alive=30,
                            http=head_deadline_protocol(args.header_timeout))
    server = _Server(config)
    ctx.start()
    # What is loaded by now (torch, the model, the libraries) lives as long as the process: keep it
    # out of the collector's full passes, which would otherwise walk all of it with the GIL held
    # whenever a request creates many objects (a large body being decoded), stalling every request.
    gc.freeze()
    try:
        server.run(sockets=[sock])
    finally:
        ctx.shutdown()  # a no-op when the server's own shutdown already did it


def _build_context(settings: Settings) -> Any:
    store = _open_store(settings.data_dir)
    from .checkpoints import reconcile

    counts = reconcile(store, settings)
    if any(counts.values()):
        log.info(
            "reconciled the data directory: %(dropped)d checkpoint rows without folders dropped, "
            "%(added)d folders recorded, %(refreshed)d records renewed from newer folders, "
            "%(restored)d interrupted overwrites undone, "
            "%(removed_tmp)d unfinished saves and deletions removed, %(detached)d runs detached",
            counts,
        )
    try:
        import transformers

        transformers.logging.set_verbosity_error()
        transformers.logging.disable_progress_bar()
        import datasets

        datasets.disable_progress_bars()
    except Exception:  # only cosmetics
        pass
    from twinkle.model import MultiLoraTransformersModel

    from .context import ServerContext

    log.info("loading %s", settings.model)
    try:
        model = MultiLoraTransformersModel(
            settings.model,
            max_loras=settings.max_loras,
            max_r=settings.max_r,
            device=settings.device,
            dtype=settings.dtype,
            output_dir=str(settings.scratch_dir),
        )
    except TwinkleError as exc:
        store.close()
        raise CliError(f"cannot load {settings.model}: {exc}") from None
    dtype = str(model.dtype).removeprefix("torch.")
    log.info("serving %s on %s (%s), %d adapter slots, max_r %d", model.model_id, model.device, dtype,
             model.max_loras, model.max_r)
    log.info("per user: %d adapter slots, %d objects, %d of %d data threads, %d of %d uploads; "
             "%d tokens per call", settings.loras_per_user, settings.max_objects_per_user,
             settings.data_threads_per_user, settings.data_threads, settings.max_uploads_per_user,
             settings.max_uploads, settings.max_tokens_per_call)
    return ServerContext(settings=settings, store=store, model=model, dtype=dtype)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``twinkle-server`` console script."""
    args = build_parser().parse_args(argv)
    _setup_logging()
    try:
        if args.command == "serve":
            serve(args)
        else:
            users_command(args)
    except (CliError, TwinkleError) as exc:
        print(f"twinkle-server: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
