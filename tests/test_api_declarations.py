"""The API is declared once: the declarations, the local classes and the remote classes agree."""

from __future__ import annotations

import inspect
import subprocess
import sys

import pytest

from twinkle.dataloader import DataLoader
from twinkle.dataset import Dataset
from twinkle.model import MultiLoraTransformersModel
from twinkle.protocol.api import API_BY_KIND, MODEL, Arg, ModelAPI, api_of
from twinkle.sampler import TorchSampler
from twinkle_client import dataloader as remote_dataloader
from twinkle_client import dataset as remote_dataset
from twinkle_client import model as remote_model
from twinkle_client import sampler as remote_sampler

pytestmark = pytest.mark.unit

LOCAL = {"model": MultiLoraTransformersModel, "dataset": Dataset, "dataloader": DataLoader, "sampler": TorchSampler}
REMOTE = {
    "model": remote_model.MultiLoraTransformersModel,
    "dataset": remote_dataset.Dataset,
    "dataloader": remote_dataloader.DataLoader,
    "sampler": remote_sampler.TorchSampler,
}


@pytest.mark.parametrize("kind", sorted(API_BY_KIND))
def test_local_and_remote_classes_read_one_declaration(kind: str) -> None:
    api, local, remote = API_BY_KIND[kind], LOCAL[kind], REMOTE[kind]
    assert api_of(local) is api and api_of(remote) is api
    assert local.__name__ == remote.__name__ == api.name
    for name, spec in api.methods.items():
        for cls in (local, remote):
            method = getattr(cls, name)
            params = list(inspect.signature(method).parameters.values())
            assert [(p.name, p.kind, p.default) for p in params] == [
                (p.name, p.kind, p.default) for p in spec.signature.parameters.values()
            ], f"{cls.__module__}.{cls.__name__}.{name}"
            assert method.__doc__ == spec.doc, f"{cls.__name__}.{name} has its own docstring"


def test_an_implementation_that_differs_from_its_declaration_fails_at_class_creation() -> None:
    with pytest.raises(TypeError, match=r"does not implement MultiLoraTransformersModel as declared: .*step"):

        class Drifted(MultiLoraTransformersModel):
            def step(self, *, adapter_name: str | None = None, extra: int = 0) -> bool:  # a new parameter
                return False

    with pytest.raises(TypeError, match=r"forward_only \(not implemented\)"):

        class Partial(ModelAPI):
            def __init__(self, model_id: str = "builtin://tiny-qwen2", *, max_loras: int = 5, max_r: int = 32,
                         device: str | None = None, dtype: str | None = None,
                         output_dir: str = "twinkle_output") -> None:
                pass

            locals().update({n: getattr(MultiLoraTransformersModel, n) for n in MODEL.methods if n != "forward_only"})


def test_declared_argument_kinds_name_real_parameters() -> None:
    for api in API_BY_KIND.values():
        for spec in api.methods.values():
            assert set(spec.args) <= set(spec.signature.parameters), spec.name
            if spec.effect.name == "COMPONENT":
                assert spec.component and spec.args.get("adapter_name") is Arg.ADAPTER


def test_importing_the_client_does_not_import_torch() -> None:
    code = (
        "import sys\n"
        "import twinkle_client, twinkle_client.model, twinkle_client.dataset, twinkle_client.dataloader\n"
        "import twinkle_client.sampler\n"
        "import twinkle.protocol.api, twinkle.protocol.codec\n"
        "heavy = sorted(m for m in ('torch', 'transformers', 'peft', 'datasets') if m in sys.modules)\n"
        "print(','.join(heavy))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "", f"importing the client imported {out.stdout.strip()}"
