"""twinkle's API, declared once: each method's signature *and* what it does besides returning.

The classes here are declarations, not implementations. ``twinkle``'s local classes subclass
them and implement every declared method with exactly the declared signature (checked when
the local class is defined); ``twinkle_client`` derives its remote classes from them without
importing the library (or torch); the server binds every remote call against them and
applies the declared effects. So a method's parameters, defaults, docstring, whether it is
deferred, what the server records for it and which client event it raises are written in
one place, below.

The behaviour of a method is its ``Method`` record:

- ``deferred``: remotely, the call returns a lazy value at once and is sent with the next
  batch; a failure surfaces at the next call or read on the same object.
- ``effect``: what the server records when the call has run (run progress, a metric point,
  an eval point, a completed step, a checkpoint row, a component) -- see ``Effect``.
- ``event``: the ``twinkle_client`` training event it raises (the notebook layer listens).
- ``args``: parameters that are not plain values -- see ``Arg``.
- ``returns``: what the value means, where local and remote spell it differently -- see
  ``Returns``. Every other value is identical locally and remotely.
- ``interruptible``: a pending stop request (Ctrl-C in a notebook) ends the loop before
  this call is queued.
"""

from __future__ import annotations

import enum
import inspect
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Protocol, TypeVar, runtime_checkable

if TYPE_CHECKING:  # annotations only: this module never imports peft or torch
    from peft import LoraConfig

    from .dataset_meta import DatasetMeta
    from .outputs import ForwardBackwardOutput, ForwardOutput
    from .sampling import SampleResponse, SamplingParams

F = TypeVar("F", bound=Callable[..., Any])
_SPEC = "__twinkle_method__"


class Effect(enum.Enum):
    """What the server records after a model call ran (data objects record nothing)."""

    NONE = "none"
    """Nothing beyond the adapter's progress."""
    ADAPTER_ADDED = "adapter_added"
    """A new training run for the new adapter."""
    ADAPTER_REMOVED = "adapter_removed"
    """The adapter's run becomes detached."""
    COMPONENT = "component"
    """The run's record of how a component (``Method.component``) was set."""
    MICRO_BATCH = "micro_batch"
    """A metric point: the micro-batch's loss and token count under the step it feeds."""
    EVAL = "eval"
    """An eval point: the batch's loss and token count under the adapter's current step (the
    optimizer updates done so far: 0 before training). Only a batch with labelled tokens (a
    loss that is not None) makes one; a step's eval loss is the token-weighted mean of its
    points (``twinkle.protocol.wire.eval_losses``)."""
    STEP = "step"
    """When the weights changed: the step's points completed with the window's grad norm
    (``get_train_state()['window_grad_norm']``) and the LR the update used."""
    CHECKPOINT_SAVED = "checkpoint_saved"
    """A checkpoint row (the checkpoint exists for clients only from then on)."""
    WEIGHTS_LOADED = "weights_loaded"
    """With the training state: the run's later points are superseded."""
    RESUMED = "resumed"
    """The adapter trains the checkpoint's run from then on; later points superseded."""
    UPLOAD = "upload"
    """A background upload job of a checkpoint, with a status to poll."""


class Arg(enum.Enum):
    """Parameters that name something rather than carry a value."""

    ADAPTER = "adapter"
    """An adapter name; the server maps it to its own name for the adapter on the shared base."""
    CHECKPOINT = "checkpoint"
    """A checkpoint: a folder locally, a ``twinkle://`` path (or ``CheckpointPath``) remotely."""
    SERVER_CHOSEN = "server_chosen"
    """Chosen by the server (where checkpoints are written); a remote caller may not set it."""
    DATASET = "dataset"
    """A dataset id or ``DatasetMeta``; the server admits only ids its policy allows."""
    MODEL_ID = "model_id"
    """A model id inside ``**kwargs`` (``model_id=``); the server admits only ids its policy allows."""
    LORA_CONFIG = "lora_config"
    """A ``peft.LoraConfig`` (or its dict form)."""


class Returns(enum.Enum):
    """Return values whose spelling depends on where the call ran."""

    VALUE = "value"
    """The same value locally and remotely."""
    CHECKPOINT = "checkpoint"
    """A path naming the new checkpoint that ``load``/``resume_from_checkpoint`` accept: its folder
    locally, its ``twinkle://`` path remotely (same checkpoint name)."""
    UPLOAD_ID = "upload_id"
    """With ``async_upload=True`` an id whose status can be polled; else None once uploaded."""


@dataclass(frozen=True)
class Method:
    """One declared method: signature and behaviour."""

    name: str
    signature: inspect.Signature
    doc: str
    deferred: bool = False
    effect: Effect = Effect.NONE
    event: str | None = None
    component: str | None = None
    """For ``Effect.COMPONENT``: the key of the run's component record; its name is the first parameter."""
    args: Mapping[str, Arg] = field(default_factory=dict)
    returns: Returns = Returns.VALUE
    interruptible: bool = False
    stepwise: bool = False
    """The implementation provides ``<name>_stepwise(...)`` (same parameters) returning a
    ``Stepwise``, and the method itself runs every step (a class that defines only the
    stepwise form gets it): a server runs one step per turn of its device, so other users'
    calls run in between however long this one takes."""
    fused: bool = False
    """Calls of several adapters may share one device pass: the implementation also provides
    ``<name>_many(calls)``, each call's arguments in declared order, returning each one's value
    or the exception it alone raised (a server gathers waiting calls of several users)."""

    @property
    def parameters(self) -> list[inspect.Parameter]:
        """The parameters without ``self``."""
        return list(self.signature.parameters.values())[1:]

    def bind(self, args: list[Any] | tuple[Any, ...], kwargs: Mapping[str, Any]) -> inspect.BoundArguments:
        """Bind a call's arguments (no ``self``) with defaults applied; a call that does not fit
        the signature is an ``InvalidArgumentError`` naming the method."""
        from .errors import InvalidArgumentError

        try:
            bound = self.signature.bind(None, *args, **kwargs)
        except TypeError as exc:
            raise InvalidArgumentError(f"{self.name}(): {exc}") from None
        bound.apply_defaults()
        return bound

    def args_of(self, kind: Arg) -> list[str]:
        return [name for name, k in self.args.items() if k is kind]


@dataclass(frozen=True)
class ApiClass:
    """A declared class: its constructor and methods, and the kind of remote object it is."""

    name: str
    kind: str
    init: inspect.Signature
    doc: str
    methods: Mapping[str, Method]

    def method(self, name: Any) -> Method:
        """The declared method ``name``; an ``InvalidArgumentError`` for anything else."""
        from .errors import InvalidArgumentError

        found = self.methods.get(name) if isinstance(name, str) else None
        if found is None:
            raise InvalidArgumentError(f"{self.name} has no remote method {str(name)[:100]!r}")
        return found


def declare(
    *,
    deferred: bool = False,
    effect: Effect = Effect.NONE,
    event: str | None = None,
    component: str | None = None,
    args: Mapping[str, Arg] | None = None,
    returns: Returns = Returns.VALUE,
    interruptible: bool = False,
    fused: bool = False,
    stepwise: bool = False,
) -> Callable[[F], F]:
    """Decorator on a declaration's method: its body is never run (the stub raises)."""

    def deco(fn: F) -> F:
        spec = Method(
            name=fn.__name__,
            signature=inspect.signature(fn),
            doc=inspect.cleandoc(fn.__doc__ or ""),
            deferred=deferred,
            effect=effect,
            event=event,
            component=component,
            args=dict(args or {}),
            returns=returns,
            interruptible=interruptible,
            fused=fused,
            stepwise=stepwise,
        )
        for name in spec.args:
            if name not in spec.signature.parameters:
                raise TypeError(f"{fn.__qualname__}: declared argument {name!r} is not a parameter")

        def stub(*_: Any, **__: Any) -> Any:
            raise NotImplementedError(f"{fn.__qualname__} is a declaration; use an implementation")

        stub.__name__, stub.__qualname__, stub.__doc__ = fn.__name__, fn.__qualname__, fn.__doc__
        stub.__signature__ = spec.signature  # type: ignore[attr-defined]
        setattr(stub, _SPEC, spec)
        return stub  # type: ignore[return-value]

    return deco


@runtime_checkable
class Stepwise(Protocol):
    """A call done a step at a time (see ``Method.stepwise``)."""

    def step(self) -> bool:
        """Do the next step; True when the call is complete."""

    def result(self) -> Any:
        """The call's value, once complete."""

    def close(self) -> None:
        """Give up: free what the call holds."""


def _all_steps(spec: Method) -> Callable[..., Any]:
    """``spec``'s method for a class that implements only ``<name>_stepwise``."""

    def method(self: Any, *args: Any, **kwargs: Any) -> Any:
        stepper = getattr(self, f"{spec.name}_stepwise")(*args, **kwargs)
        while not stepper.step():
            pass
        return stepper.result()

    method.__name__, method.__qualname__, method.__doc__ = spec.name, spec.name, spec.doc
    method.__signature__ = spec.signature  # type: ignore[attr-defined]
    return method


def _same_signature(a: inspect.Signature, b: inspect.Signature) -> bool:
    """Same parameters: names, kinds and defaults (annotations are documentation)."""
    pa, pb = list(a.parameters.values()), list(b.parameters.values())
    return len(pa) == len(pb) and all(
        x.name == y.name and x.kind == y.kind and x.default == y.default for x, y in zip(pa, pb, strict=True)
    )


class Declaration:
    """Base of the declarations below. A subclass that is not itself a declaration must
    implement every declared method (and ``__init__``) with the declared signature."""

    __twinkle_api__: ClassVar[ApiClass]

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "__twinkle_api__" in cls.__dict__ or cls.__dict__.get("_declaration", False):
            return
        api = api_of(cls)
        for name, spec in api.methods.items():
            if spec.stepwise and getattr(getattr(cls, name), _SPEC, None) is spec:
                setattr(cls, name, _all_steps(spec))  # the plain call: every step, then the value
        problems = []
        if not _same_signature(inspect.signature(cls.__init__), api.init):
            problems.append(f"__init__{api.init}")
        for name, spec in api.methods.items():
            impl = getattr(cls, name)
            if getattr(impl, _SPEC, None) is spec:
                problems.append(f"{name} (not implemented)")
            elif not _same_signature(inspect.signature(impl), spec.signature):
                problems.append(f"{name}{spec.signature}")
            elif not impl.__doc__:
                impl.__doc__ = spec.doc
            if spec.fused and not callable(getattr(cls, f"{name}_many", None)):
                problems.append(f"{name}_many (declared fused)")
            stepwise = getattr(cls, f"{name}_stepwise", None)
            if spec.stepwise and not (callable(stepwise)
                                      and _same_signature(inspect.signature(stepwise), spec.signature)):
                problems.append(f"{name}_stepwise{spec.signature} (declared stepwise)")
        if problems:
            raise TypeError(f"{cls.__qualname__} does not implement {api.name} as declared: {'; '.join(problems)}")


def _finish(cls: type, kind: str, public_name: str) -> type:
    methods = {}
    for klass in reversed(cls.__mro__):
        for name, member in vars(klass).items():
            spec = getattr(member, _SPEC, None)
            if spec is not None:
                methods[name] = spec
    cls.__twinkle_api__ = ApiClass(  # type: ignore[attr-defined]
        name=public_name,
        kind=kind,
        init=inspect.signature(cls.__init__),
        doc=inspect.cleandoc(cls.__doc__ or ""),
        methods=methods,
    )
    return cls


def api_of(cls: type) -> ApiClass:
    """The declared API of a declaration, a local class or a remote class."""
    for klass in cls.__mro__:
        api = klass.__dict__.get("__twinkle_api__")
        if api is not None:
            return api
    raise TypeError(f"{cls.__name__} declares no twinkle API")


def has_api(value: Any) -> bool:
    """True for an instance of a class that implements a declared API."""
    return any("__twinkle_api__" in klass.__dict__ for klass in type(value).__mro__)


# ----------------------------------------------------------------------------- declarations

_ADAPTER = {"adapter_name": Arg.ADAPTER}


class ModelAPI(Declaration):
    """A causal LM with up to ``max_loras`` LoRA adapters on one frozen base model.

    Each adapter has its own template, processor, loss, optimizer, LR scheduler, step
    counter and gradient-accumulation window; no call on one adapter changes another.
    Calls take ``adapter_name``; it may be left out while the model has exactly one adapter.

    Gradient accumulation is exact: with ``gradient_accumulation_steps=k`` the weights
    change on every k-th micro-batch, and the update equals one step on the k micro-batches
    merged (losses are summed over tokens and divided by the window's token count). On the
    other micro-batches ``clip_grad_norm`` returns None and ``step``, ``zero_grad`` and
    ``lr_step`` do nothing and return False.
    """

    _declaration = True

    def __init__(
        self,
        model_id: str = "builtin://tiny-qwen2",
        *,
        max_loras: int = 5,
        max_r: int = 32,
        device: str | None = None,
        dtype: str | None = None,
        output_dir: str = "twinkle_output",
    ) -> None:
        """Load ``model_id`` once; adapters are added with ``add_adapter_to_model``."""

    # ----------------------------------------------------------------- adapters

    @declare(effect=Effect.ADAPTER_ADDED, event="adapter_added",
             args={"adapter_name": Arg.ADAPTER, "config": Arg.LORA_CONFIG})
    def add_adapter_to_model(
        self,
        adapter_name: str,
        config: LoraConfig | dict[str, Any],
        gradient_accumulation_steps: int = 1,
        *,
        seed: int = 42,
    ) -> None:
        """Add a LoRA adapter. Its weights start from ``seed``, so runs are reproducible."""

    @declare(effect=Effect.ADAPTER_REMOVED, args=_ADAPTER)
    def remove_adapter(self, adapter_name: str) -> None:
        """Remove an adapter and free its slot."""

    # -------------------------------------------------------------- components

    @declare(deferred=True, effect=Effect.COMPONENT, component="template",
             args={"adapter_name": Arg.ADAPTER, "kwargs": Arg.MODEL_ID})
    def set_template(self, template_cls: str = "Template", *, adapter_name: str | None = None, **kwargs: Any) -> None:
        """Set the chat template used to encode conversations (defaults to this model's tokenizer)."""

    @declare(deferred=True, effect=Effect.COMPONENT, component="processor", args=_ADAPTER)
    def set_processor(
        self, processor_cls: str = "InputProcessor", *, adapter_name: str | None = None, **kwargs: Any
    ) -> None:
        """Set the processor that collates a list of encoded samples into tensors."""

    @declare(deferred=True, effect=Effect.COMPONENT, component="loss", args=_ADAPTER)
    def set_loss(self, loss_cls: str = "CrossEntropyLoss", *, adapter_name: str | None = None, **kwargs: Any) -> None:
        """Set the training loss (default: ``CrossEntropyLoss``, per-token mean)."""

    @declare(deferred=True, effect=Effect.COMPONENT, component="optimizer", args=_ADAPTER)
    def set_optimizer(self, optimizer_cls: str = "AdamW", *, adapter_name: str | None = None, **kwargs: Any) -> None:
        """Set the optimizer: any ``torch.optim`` class by name, over this adapter's weights only.
        A new optimizer drops the adapter's LR scheduler."""

    @declare(deferred=True, effect=Effect.COMPONENT, component="lr_scheduler", args=_ADAPTER)
    def set_lr_scheduler(
        self, scheduler_cls: str = "LinearLR", *, adapter_name: str | None = None, **kwargs: Any
    ) -> None:
        """Set the LR scheduler: any ``torch.optim.lr_scheduler`` class by name, or
        ``LinearWarmupScheduler`` / ``CosineWarmupScheduler``. Call after ``set_optimizer``."""

    # ---------------------------------------------------------------- training

    @declare(deferred=True, effect=Effect.MICRO_BATCH, event="forward_backward", args=_ADAPTER, interruptible=True,
             fused=True)
    def forward_backward(self, inputs: Any, *, adapter_name: str | None = None) -> ForwardBackwardOutput:
        """Forward and backward on one micro-batch; gradients add up until the window is complete."""

    @declare(effect=Effect.EVAL, args=_ADAPTER, fused=True)
    def forward_only(
        self, inputs: Any, *, adapter_name: str | None = None, return_logits: bool = False
    ) -> ForwardOutput:
        """Forward without gradients; the loss where the batch has labels, logits on request.
        Nothing about the adapter changes. On a server, a batch with labels is an eval point of
        the run at the adapter's current step (the live plot draws them as "eval loss")."""

    @declare(deferred=True, args=_ADAPTER)
    def clip_grad_norm(
        self, max_grad_norm: float = 1.0, norm_type: float = 2.0, *, adapter_name: str | None = None
    ) -> float | None:
        """Clip the window's gradients; returns their norm before clipping, or None mid-window."""

    @declare(deferred=True, effect=Effect.STEP, event="step", args=_ADAPTER)
    def step(self, *, adapter_name: str | None = None) -> bool:
        """Update the weights if the accumulation window is complete; returns whether it did."""

    @declare(deferred=True, args=_ADAPTER)
    def zero_grad(self, *, adapter_name: str | None = None) -> bool:
        """Clear gradients, unless a window is being accumulated (then a no-op returning False)."""

    @declare(deferred=True, args=_ADAPTER)
    def lr_step(self, *, adapter_name: str | None = None) -> bool:
        """Advance the LR scheduler once per optimizer update; returns whether it advanced."""

    @declare(deferred=True, effect=Effect.STEP, event="step", args=_ADAPTER)
    def clip_grad_and_step(self, max_grad_norm: float = 1.0, *, adapter_name: str | None = None) -> float | None:
        """``clip_grad_norm``, ``step``, ``zero_grad`` and ``lr_step`` in one call; returns the norm."""

    @declare(args=_ADAPTER, stepwise=True)
    def sample(
        self,
        inputs: Any,
        sampling_params: SamplingParams | dict[str, Any] | None = None,
        num_samples: int = 1,
        *,
        adapter_name: str | None = None,
    ) -> list[SampleResponse]:
        """Generate from the adapter's current weights (no save needed); the adapter is not changed.

        ``inputs`` is one conversation (a list of ``{'role', 'content'}`` messages, encoded with
        the adapter's template and a generation prompt), one list of token ids, or a list of
        either. Returns one ``SampleResponse`` per input, each with ``num_samples`` sequences.
        """

    @declare(args=_ADAPTER)
    def get_train_state(self, *, adapter_name: str | None = None) -> dict[str, Any]:
        """The adapter's counters: steps, consumed samples, accumulation position, LR, last loss."""

    # ------------------------------------------------------------- checkpoints

    @declare(effect=Effect.CHECKPOINT_SAVED, event="save", returns=Returns.CHECKPOINT,
             args={"adapter_name": Arg.ADAPTER, "save_dir": Arg.SERVER_CHOSEN})
    def save(
        self,
        name: str,
        save_optimizer: bool = False,
        *,
        adapter_name: str | None = None,
        save_dir: str | None = None,
    ) -> str:
        """Save the adapter (PEFT format) as checkpoint ``name``; with ``save_optimizer`` also the
        full training state. The write is atomic. Returns the path that ``load`` and
        ``resume_from_checkpoint`` accept: the folder ``<save_dir>/<name>`` locally, the
        checkpoint's ``twinkle://`` path on a server (which chooses ``save_dir``)."""

    @declare(effect=Effect.WEIGHTS_LOADED, event="load", args={"name": Arg.CHECKPOINT, "adapter_name": Arg.ADAPTER})
    def load(self, name: str, load_optimizer: bool = False, *, adapter_name: str | None = None) -> None:
        """Load a checkpoint's weights into the adapter; with ``load_optimizer`` also its optimizer,
        scheduler, counters, accumulated gradients and RNG states. Checked fully before anything changes."""

    @declare(effect=Effect.RESUMED, event="resume", args={"name": Arg.CHECKPOINT, "adapter_name": Arg.ADAPTER})
    def resume_from_checkpoint(
        self, name: str, *, resume_only_model: bool = False, adapter_name: str | None = None
    ) -> dict[str, int]:
        """Load a checkpoint (with its training state unless ``resume_only_model``) and return
        ``{cur_step, consumed_train_samples, gradient_accumulation_steps}`` for the dataloader.
        On a server the adapter trains the checkpoint's run from then on."""

    @declare(effect=Effect.UPLOAD, event="upload", returns=Returns.UPLOAD_ID,
             args={"checkpoint_dir": Arg.CHECKPOINT})
    def upload_to_hub(
        self, checkpoint_dir: str, hub_model_id: str, hub_token: str | None = None, async_upload: bool = False
    ) -> str | None:
        """Upload a checkpoint to ModelScope (``ms://org/name`` or ``org/name``) or Hugging Face
        (``hf://org/name``). With ``async_upload`` the upload runs in the background and its id is
        returned (poll it with ``upload_status``); otherwise the call returns None when it is done."""


class DatasetAPI(Declaration):
    """A training dataset built from one or more ``DatasetMeta`` (or plain id strings).

    Typical use::

        ds = Dataset(DatasetMeta('builtin://self-cognition'))
        ds.set_template('Template', model_id='builtin://tiny-qwen2', max_length=512)
        ds.map('SelfCognitionProcessor', init_args={'model_name': 'Twinkle', 'model_author': 'Lab'})
        ds.encode()
    """

    _declaration = True

    def __init__(self, dataset_meta: DatasetMeta | str) -> None:
        """Load the dataset ``dataset_meta`` names."""

    @declare(deferred=True, args={"dataset_meta": Arg.DATASET})
    def add_dataset(self, dataset_meta: DatasetMeta | str) -> None:
        """Load another dataset beside the ones already here (mix them with ``mix_dataset``)."""

    @declare(deferred=True)
    def mix_dataset(self, interleave: bool = True) -> None:
        """Merge the added datasets into one (calling it again does nothing).

        ``interleave=True`` spreads the rows of all datasets over the result in a random order
        fixed by a seed, keeping each dataset's own row order and every row exactly once;
        ``interleave=False`` concatenates them in the order they were added. A column missing
        from one dataset is ``None`` in its rows.
        """

    @declare(deferred=True, args={"kwargs": Arg.MODEL_ID})
    def set_template(self, name_or_cls: str | type, **kwargs: Any) -> None:
        """Set the template that ``encode`` uses.

        E.g. ``set_template('Template', model_id='builtin://tiny-qwen2', max_length=512)``.
        """

    @declare(deferred=True, args={"dataset_meta": Arg.DATASET})
    def map(
        self,
        preprocess_func: str | type | Callable[[dict[str, Any]], dict[str, Any]],
        dataset_meta: DatasetMeta | str | None = None,
        init_args: dict[str, Any] | None = None,
        *,
        num_proc: int | None = None,
    ) -> None:
        """Apply a preprocessor to every row (or only to the rows of ``dataset_meta``).

        ``preprocess_func`` is a registered preprocessor name (built with ``init_args``), a
        ``Preprocessor`` class or instance (works on batches), or any callable taking one row
        dict and returning the columns to set on it.
        """

    @declare(deferred=True, args={"dataset_meta": Arg.DATASET})
    def filter(
        self,
        filter_func: str | type | Callable[[dict[str, Any]], bool],
        dataset_meta: DatasetMeta | str | None = None,
        init_args: dict[str, Any] | None = None,
        *,
        num_proc: int | None = None,
    ) -> None:
        """Keep only the rows for which ``filter_func(row)`` is true.

        ``filter_func`` is a registered filter name or class (built with ``init_args``) or a
        callable taking one row dict. With ``dataset_meta`` only that dataset is filtered.
        """

    @declare(deferred=True)
    def encode(self, batched: bool = True, add_generation_prompt: bool = False, *, num_proc: int | None = None) -> None:
        """Tokenize each row's ``messages`` with the template.

        Adds ``input_ids``, ``labels`` and ``length`` columns. Rows the template drops (too
        long under truncation ``'delete'``) are removed. ``batched`` encodes 1000 rows per
        step instead of one; the result is the same.
        """

    @declare()
    def __len__(self) -> int:
        """Rows in the dataset."""

    @declare()
    def __getitem__(self, idx: int) -> dict[str, Any]:
        """Row ``idx`` as a dict; negative indices count from the end."""


class DataLoaderAPI(Declaration):
    """Batches of a dataset, with a position that a checkpoint can restore exactly."""

    _declaration = True

    def __init__(
        self,
        dataset: Any,
        batch_size: int,
        shuffle: bool = False,
        seed: int = 42,
        drop_last: bool = False,
        num_workers: int = 0,
    ) -> None:
        """Iterate ``dataset`` in batches of ``batch_size``."""

    @declare(deferred=True)
    def set_processor(self, name_or_cls: str | type, **kwargs: Any) -> None:
        """Collate batches with a processor, e.g. ``set_processor('InputProcessor', padding_side='right')``.
        A processor with ``pad_token_id=None`` takes it from the dataset's template, if any."""

    @declare()
    def __len__(self) -> int:
        """Batches per epoch."""

    @declare()
    def get_state(self) -> dict[str, Any]:
        """The position and settings to save with a checkpoint."""

    @declare()
    def resume_from_checkpoint(self, consumed_train_samples: int) -> None:
        """Continue as if ``consumed_train_samples`` samples had been yielded (any epoch, any offset)."""

    @declare()
    def skip_consumed_samples(self, consumed_train_samples: int) -> None:
        """Continue as if ``consumed_train_samples`` samples had been yielded (any epoch, any offset)."""

    @declare()
    def __iter__(self) -> Iterator[Any]:
        """The batches of the current epoch, from the current position. Remotely they are
        fetched in chunks (see ``START_EPOCH`` and ``NEXT_BATCHES``)."""


class SamplerAPI(Declaration):
    """Generates text from the base model, from any checkpoint, or from named checkpoints.

    Typical use::

        sampler = TorchSampler('builtin://tiny-qwen2')
        answers = sampler.sample([{'role': 'user', 'content': 'who are you?'}],
                                 {'max_tokens': 64, 'temperature': 0}, adapter_uri=checkpoint)
        print(answers[0].sequences[0].decoded)

    To sample from an adapter while it trains, use the model's own ``sample``.
    """

    _declaration = True

    def __init__(self, model_id: str = "builtin://tiny-qwen2", *, device: str | None = None,
                 dtype: str | None = None) -> None:
        """Sample from ``model_id`` (on a server: the base model it serves)."""

    @declare(deferred=True, args={"kwargs": Arg.MODEL_ID})
    def set_template(self, template_cls: str = "Template", **kwargs: Any) -> None:
        """Set the chat template that encodes conversations (defaults to the model's tokenizer)."""

    @declare(args={"adapter_uri": Arg.CHECKPOINT})
    def add_adapter_to_sampler(self, adapter_name: str, adapter_uri: str) -> None:
        """Name a checkpoint, so that ``sample(adapter_name=...)`` samples from it."""

    @declare(args={"adapter_uri": Arg.CHECKPOINT}, stepwise=True)
    def sample(
        self,
        inputs: Any,
        sampling_params: SamplingParams | dict[str, Any] | None = None,
        adapter_name: str = "",
        adapter_uri: str | None = None,
        num_samples: int = 1,
    ) -> list[SampleResponse]:
        """Generate from the base model (no ``adapter_name`` or ``adapter_uri``), from the
        checkpoint at ``adapter_uri`` (a folder locally, a ``twinkle://`` path on a server, as
        ``save`` returns it) or from one named with ``add_adapter_to_sampler``.

        ``inputs`` is one conversation (a list of ``{'role', 'content'}`` messages, encoded with
        the template and a generation prompt), one list of token ids, or a list of either.
        Returns one ``SampleResponse`` per input, each with ``num_samples`` sequences: their
        ``tokens``, ``logprobs``, ``decoded`` text and ``stop_reason`` (``'stop'`` or ``'length'``).
        """


_finish(ModelAPI, "model", "MultiLoraTransformersModel")
_finish(DatasetAPI, "dataset", "Dataset")
_finish(DataLoaderAPI, "dataloader", "DataLoader")
_finish(SamplerAPI, "sampler", "TorchSampler")

MODEL: ApiClass = ModelAPI.__twinkle_api__  # type: ignore[attr-defined]
DATASET: ApiClass = DatasetAPI.__twinkle_api__  # type: ignore[attr-defined]
DATALOADER: ApiClass = DataLoaderAPI.__twinkle_api__  # type: ignore[attr-defined]
SAMPLER: ApiClass = SamplerAPI.__twinkle_api__  # type: ignore[attr-defined]
API_BY_KIND: dict[str, ApiClass] = {api.kind: api for api in (MODEL, DATASET, DATALOADER, SAMPLER)}

# A remote dataloader replaces ``__iter__`` by these two calls: an epoch is fetched in chunks.
START_EPOCH = "_twinkle_start_epoch"
"""``(consumed_train_samples)``: move there and start iterating to the end of that epoch."""
NEXT_BATCHES = "_twinkle_next"
"""``(max_batches)``: ``{"batches": [...], "sizes": [samples per batch], "end": bool}``."""
