"""A client that knows only API.md: it imports nothing of loraplex and learns every message type from
the server's reflection service (ProtoReflectionDescriptorDatabase + message_factory).

    client = ReflectionClient(channel)
    reply = client.call("Generation", "Generate", {"adapter": "caps", "prompt": "Hi"})   # -> dict
    for message in client.stream("Generation", "GenerateStream", {...}): ...
"""
from __future__ import annotations

import grpc
from google.protobuf import descriptor_pool, json_format, message_factory
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

PACKAGE = "loraplex.v1"


class ReflectionClient:
    def __init__(self, channel: grpc.Channel, token: str | None = None):
        self.channel = channel
        self.database = ProtoReflectionDescriptorDatabase(channel)
        self.pool = descriptor_pool.DescriptorPool(self.database)
        self.metadata = (("authorization", f"Bearer {token}"),) if token else None

    def services(self) -> list[str]:
        return list(self.database.get_services())

    def method(self, service: str, name: str):
        return self.pool.FindServiceByName(f"{PACKAGE}.{service}").FindMethodByName(name)

    def message_class(self, full_name: str):
        return message_factory.GetMessageClass(self.pool.FindMessageTypeByName(full_name))

    def enum_value(self, enum: str, name: str) -> int:
        return self.pool.FindEnumTypeByName(f"{PACKAGE}.{enum}").values_by_name[name].number

    def _callable(self, service: str, name: str, kind: str):
        method = self.method(service, name)
        request_class = self.message_class(method.input_type.full_name)
        response_class = self.message_class(method.output_type.full_name)
        make = getattr(self.channel, kind)
        rpc = make(f"/{PACKAGE}.{service}/{name}", request_serializer=lambda m: m.SerializeToString(),
                   response_deserializer=response_class.FromString)
        return rpc, request_class

    def build(self, service: str, name: str, fields: dict):
        _, request_class = self._callable(service, name, "unary_unary")
        return json_format.ParseDict(fields, request_class())

    def call(self, service: str, name: str, fields: dict, token: str | None = None, timeout: float = 60) -> dict:
        rpc, request_class = self._callable(service, name, "unary_unary")
        reply = rpc(json_format.ParseDict(fields, request_class()), timeout=timeout,
                    metadata=self._metadata(token))
        return _as_dict(reply)

    def stream(self, service: str, name: str, fields: dict, token: str | None = None, timeout: float = 120):
        """The response iterator (a grpc call: .cancel() works); messages are turned into dicts."""
        rpc, request_class = self._callable(service, name, "unary_stream")
        call = rpc(json_format.ParseDict(fields, request_class()), timeout=timeout, metadata=self._metadata(token))
        return _DictStream(call)

    def upload(self, service: str, name: str, messages: list[dict], token: str | None = None) -> dict:
        rpc, request_class = self._callable(service, name, "stream_unary")
        reply = rpc(iter([json_format.ParseDict(m, request_class()) for m in messages]), timeout=60,
                    metadata=self._metadata(token))
        return _as_dict(reply)

    def _metadata(self, token):
        return (("authorization", f"Bearer {token}"),) if token else self.metadata


class _DictStream:
    def __init__(self, call):
        self.call = call

    def __iter__(self):
        for message in self.call:
            yield _as_dict(message)

    def cancel(self):
        self.call.cancel()


def _as_dict(message) -> dict:
    return json_format.MessageToDict(message, preserving_proto_field_name=True,
                                     always_print_fields_with_no_presence=True)
