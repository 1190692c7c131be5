"""The protobuf messages the Tinker SDK exchanges with a server, built from our own description.

The SDK sends ``forward_backward`` bodies as ``tinker_public.ForwardBackwardRequest`` and reads
``ForwardBackwardOutput`` and ``SampleResponse`` results as protobuf. The server does not import
the SDK: the few messages it needs are described here (package, message names, field numbers
and types as the SDK's schema has them; fields the server never reads or writes are left out,
and arrive as unknown fields that are skipped) and made into classes in a private descriptor
pool, so they never clash with the SDK's own classes in a process that has both.
``tests/test_tinker_api.py`` checks their fields and enum values against the SDK's own schema
and round-trips them through the SDK's converters.
"""

from __future__ import annotations

from typing import Any

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

PACKAGE = "tinker_public"
F = descriptor_pb2.FieldDescriptorProto

_TYPES = {
    "string": F.TYPE_STRING, "bytes": F.TYPE_BYTES, "bool": F.TYPE_BOOL, "double": F.TYPE_DOUBLE,
    "float": F.TYPE_FLOAT, "int32": F.TYPE_INT32, "int64": F.TYPE_INT64, "uint32": F.TYPE_UINT32,
    "uint64": F.TYPE_UINT64,
}

# (message, [(number, name, type, flags)]): type is a scalar name, a message or enum name of the
# package, or "map<string, X>"; flags: "repeated", "optional" (proto3 optional), "oneof:NAME".
_ENUMS = {
    "DType": ["DTYPE_UNSPECIFIED", "DTYPE_FLOAT32", "DTYPE_INT64", "DTYPE_INT32", "DTYPE_BFLOAT16"],
    "StopReason": ["STOP_REASON_STOP", "STOP_REASON_LENGTH"],
}
_MESSAGES: list[tuple[str, list[tuple[int, str, str, str]]]] = [
    ("SparseCsr", [(1, "values", "bytes", ""), (2, "crow_indices", "bytes", ""), (3, "col_indices", "bytes", "")]),
    ("Tensor", [(1, "dense", "bytes", "oneof:encoding"), (2, "sparse_csr", "SparseCsr", "oneof:encoding"),
                (3, "dtype", "DType", ""), (4, "shape", "int64", "repeated")]),
    ("BatchedTensor", [(1, "data", "bytes", ""), (2, "offsets", "bytes", ""), (3, "dtype", "DType", ""),
                       (4, "trailing_shape", "int64", "repeated")]),
    ("ArrayRecord", [(1, "type_tag", "string", ""), (2, "fields", "map<string, BatchedTensor>", ""),
                     (3, "num_datums", "int64", "")]),
    ("ForwardBackwardOutput", [(1, "loss_fn_output_type", "string", ""),
                               (2, "loss_fn_outputs", "ArrayRecord", "repeated"),
                               (3, "metrics", "map<string, double>", "")]),
    ("LossConfigValue", [(1, "number", "double", "oneof:value"), (2, "text", "string", "oneof:value")]),
    ("EncodedTextChunk", [(1, "tokens", "bytes", "")]),
    ("ImageChunk", [(1, "data", "bytes", ""), (2, "format", "string", "")]),
    ("DmelChunk", [(1, "dmel", "bytes", "")]),
    ("Chunk", [(1, "encoded_text", "EncodedTextChunk", "oneof:chunk"), (2, "image", "ImageChunk", "oneof:chunk"),
               (3, "dmel", "DmelChunk", "oneof:chunk")]),
    ("Datum", [(1, "model_input", "Chunk", "repeated"), (2, "loss_fn_inputs", "map<string, Tensor>", "")]),
    ("ForwardBackwardRequest", [(1, "model_id", "string", ""), (2, "seq_id", "int32", ""),
                                (3, "data", "Datum", "repeated"), (4, "loss_fn", "string", ""),
                                (5, "loss_fn_config", "map<string, double>", ""), (6, "forward_only", "bool", ""),
                                (7, "loss_fn_config_v2", "map<string, LossConfigValue>", "")]),
    ("SampledSequence", [(1, "stop_reason", "StopReason", ""), (2, "tokens", "bytes", ""),
                         (3, "logprobs", "bytes", "optional")]),
    ("SampleResponse", [(1, "sequences", "SampledSequence", "repeated"), (2, "prompt_logprobs", "bytes", "optional")]),
]


def _set_type(field: F, kind: str) -> None:
    if kind in _TYPES:
        field.type = _TYPES[kind]
    elif kind in _ENUMS:
        field.type = F.TYPE_ENUM
        field.type_name = f".{PACKAGE}.{kind}"
    else:
        field.type = F.TYPE_MESSAGE
        field.type_name = f".{PACKAGE}.{kind}"


def _entry_name(field_name: str) -> str:
    return "".join(part.capitalize() for part in field_name.split("_")) + "Entry"


def _file() -> descriptor_pb2.FileDescriptorProto:
    fd = descriptor_pb2.FileDescriptorProto(name="tinker_public.proto", package=PACKAGE, syntax="proto3")
    for name, values in _ENUMS.items():
        enum = fd.enum_type.add(name=name)
        for number, value in enumerate(values):
            enum.value.add(name=value, number=number)
    for name, fields in _MESSAGES:
        msg = fd.message_type.add(name=name)
        oneofs: dict[str, int] = {}
        for number, field_name, kind, flags in fields:
            field = msg.field.add(name=field_name, number=number, label=F.LABEL_OPTIONAL)
            if kind.startswith("map<"):
                key, value = (part.strip() for part in kind[4:-1].split(","))
                entry = msg.nested_type.add(name=_entry_name(field_name))
                entry.options.map_entry = True
                _set_type(entry.field.add(name="key", number=1, label=F.LABEL_OPTIONAL), key)
                _set_type(entry.field.add(name="value", number=2, label=F.LABEL_OPTIONAL), value)
                field.label = F.LABEL_REPEATED
                field.type = F.TYPE_MESSAGE
                field.type_name = f".{PACKAGE}.{name}.{entry.name}"
                continue
            _set_type(field, kind)
            if flags == "repeated":
                field.label = F.LABEL_REPEATED
            elif flags == "optional":
                oneofs[f"_{field_name}"] = len(msg.oneof_decl)
                msg.oneof_decl.add(name=f"_{field_name}")
                field.oneof_index = oneofs[f"_{field_name}"]
                field.proto3_optional = True
            elif flags.startswith("oneof:"):
                group = flags.split(":", 1)[1]
                if group not in oneofs:
                    oneofs[group] = len(msg.oneof_decl)
                    msg.oneof_decl.add(name=group)
                field.oneof_index = oneofs[group]
    return fd


_POOL = descriptor_pool.DescriptorPool()
_POOL.Add(_file())


def message(name: str) -> type[Any]:
    """The class of message ``tinker_public.<name>`` (in this module's own pool)."""
    return message_factory.GetMessageClass(_POOL.FindMessageTypeByName(f"{PACKAGE}.{name}"))


ForwardBackwardRequest = message("ForwardBackwardRequest")
ForwardBackwardOutput = message("ForwardBackwardOutput")
SampleResponse = message("SampleResponse")
Tensor = message("Tensor")

DTYPE_FLOAT32, DTYPE_INT64, DTYPE_INT32 = 1, 2, 3
STOP_REASON_STOP, STOP_REASON_LENGTH = 0, 1
