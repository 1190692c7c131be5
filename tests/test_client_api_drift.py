"""The remote classes have exactly the local API: same methods, same signatures, by derivation."""

from __future__ import annotations

import inspect

import pytest

from twinkle.api import api_method, api_methods
from twinkle.dataloader import DataLoader as LocalDataLoader
from twinkle.dataset import Dataset as LocalDataset
from twinkle.model import MultiLoraTransformersModel as LocalModel
from twinkle_client.dataloader import DataLoader as RemoteDataLoader
from twinkle_client.dataset import Dataset as RemoteDataset
from twinkle_client.model import MultiLoraTransformersModel as RemoteModel
from twinkle_client.remote import RemoteObject, derive_remote_class

PAIRS = [
    pytest.param(LocalModel, RemoteModel, id="model"),
    pytest.param(LocalDataset, RemoteDataset, id="dataset"),
    pytest.param(LocalDataLoader, RemoteDataLoader, id="dataloader"),
]


def _public_api(cls: type) -> dict[str, inspect.Signature]:
    """Every @api_method of ``cls`` (found by its mark, wherever defined) and the constructor."""
    found = {name: inspect.signature(getattr(cls, name)) for name in api_methods(cls)}
    found["__init__"] = inspect.signature(cls.__init__)
    return found


@pytest.mark.parametrize(("local", "remote"), PAIRS)
def test_same_methods_and_signatures(local: type, remote: type) -> None:
    local_api = _public_api(local)
    remote_api = {name: inspect.signature(getattr(remote, name)) for name in local_api}
    assert set(api_methods(local)) <= set(vars(remote)), "a local API method is missing remotely"
    assert set(remote._twinkle_api) == set(api_methods(local))
    for name, sig in local_api.items():
        assert remote_api[name] == sig, f"{remote.__name__}.{name}{remote_api[name]} != local {sig}"
    assert inspect.signature(remote) == inspect.signature(local)
    # The marks travel too: a deferred method stays deferred remotely.
    assert {n: m.deferred for n, (m, _) in api_methods(local).items()} == {
        n: m.deferred for n, m in remote._twinkle_api.items()
    }


@pytest.mark.parametrize(("local", "remote"), PAIRS)
def test_docs_and_bound_signatures_follow(local: type, remote: type) -> None:
    for name in api_methods(local):
        assert getattr(remote, name).__doc__ == getattr(local, name).__doc__
    remote_obj, local_obj = object.__new__(remote), object.__new__(local)  # no server, no model
    for name in api_methods(local):
        assert inspect.signature(getattr(remote_obj, name)) == inspect.signature(getattr(local_obj, name))


def test_a_method_added_locally_appears_remotely() -> None:
    class Extended(LocalModel):
        @api_method(deferred=True)
        def brand_new(self, x: int, *, scale: float = 2.0, adapter_name: str | None = None) -> float:
            """A method that did not exist when the client was written."""
            return x * scale

    remote = derive_remote_class(Extended, kind="model", base=RemoteObject)
    assert set(api_methods(Extended)) == set(remote._twinkle_api)
    assert inspect.signature(remote.brand_new) == inspect.signature(Extended.brand_new)
    assert remote.brand_new.__doc__ == Extended.brand_new.__doc__
    assert remote._twinkle_api["brand_new"].deferred


@pytest.mark.parametrize(
    ("call", "args", "kwargs"),
    [
        ("forward_backward", (), {}),
        ("forward_backward", ([1],), {"adapter": "x"}),
        ("save", ("a", True, False), {}),
        ("clip_grad_norm", (1.0, 2.0, "x"), {}),
        ("add_adapter_to_model", ("a",), {}),
    ],
)
def test_wrong_arguments_fail_locally_like_the_local_method(call: str, args: tuple, kwargs: dict) -> None:
    # ``object.__new__`` skips the constructor: nothing is sent, Python binds the arguments.
    with pytest.raises(TypeError) as local_err:
        getattr(LocalModel, call)(object.__new__(LocalModel), *args, **kwargs)
    with pytest.raises(TypeError) as remote_err:
        getattr(RemoteModel, call)(object.__new__(RemoteModel), *args, **kwargs)
    assert str(remote_err.value) == str(local_err.value)


def test_constructor_arguments_fail_like_the_local_one() -> None:
    with pytest.raises(TypeError) as local_err:
        LocalDataLoader()  # type: ignore[call-arg]
    with pytest.raises(TypeError) as remote_err:
        RemoteDataLoader()  # type: ignore[call-arg]
    assert str(remote_err.value) == str(local_err.value)
