"""The Adapters (admin) service: thin async wrappers over the registry, whose work runs off the event loop.

Registrations and uploads run on a thread; when the client goes away (cancel, deadline) the thread
is told to stop (`should_stop`), so a copy never runs on for nobody and its staging goes at once.
"""
from __future__ import annotations

import asyncio
import contextlib
import threading
import time

from loraplex.v1 import adapters_pb2 as apb
from loraplex.v1 import adapters_pb2_grpc

from ..adapters.registry import UPLOAD_SOURCE
from ..adapters.sources import check_name
from ..errors import InvalidArgument
from . import convert
from .runtime import Runtime


class AdaptersServicer(adapters_pb2_grpc.AdaptersServicer):
    def __init__(self, runtime: Runtime):
        self.runtime = runtime

    async def _info(self, name: str) -> apb.AdapterInfo:
        registry = self.runtime.require_registry()
        return convert.adapter_info(await asyncio.to_thread(registry.status, name))

    async def RegisterAdapter(self, request, context):
        registry = self.runtime.require_registry()
        async with _stopper(context) as should_stop:
            await asyncio.to_thread(registry.register, request.name, request.source, request.pin, request.preload,
                                    should_stop)
        return apb.RegisterAdapterResponse(adapter=await self._info(request.name))

    async def UploadAdapter(self, request_iterator, context):
        registry = self.runtime.require_registry()
        writer = await asyncio.to_thread(registry.upload_writer)
        name, pin, preload = None, False, False
        try:
            async for message in request_iterator:
                if name is None:
                    name, pin, preload = check_name(message.name), message.pin, message.preload
                elif message.name and message.name != name:
                    raise InvalidArgument(f"name: the upload started as {name!r} and cannot change to "
                                          f"{message.name!r}", field="name")
                if message.data or message.file_name:
                    if not message.file_name:
                        raise InvalidArgument("file_name: a message carries data but no file_name", field="file_name")
                    await asyncio.to_thread(writer.write, message.file_name, message.data)
            if name is None:
                raise InvalidArgument("name: the upload was empty; its first message must name the adapter",
                                      field="name")
            folder = await asyncio.to_thread(writer.finish)
        except BaseException:
            writer.abort()  # staging goes at once, whatever ended the stream (the client too)
            raise
        async with _stopper(context) as should_stop:
            await asyncio.to_thread(registry.register_staged, name, folder, UPLOAD_SOURCE, pin, preload, should_stop)
        return apb.UploadAdapterResponse(adapter=await self._info(name))

    async def LoadAdapter(self, request, context):
        engine = self.runtime.require_engine()
        await asyncio.to_thread(engine.load_adapter, request.name)
        return apb.LoadAdapterResponse(adapter=await self._info(request.name))

    async def UnloadAdapter(self, request, context):
        engine = self.runtime.require_engine()
        await asyncio.to_thread(engine.unload_adapter, request.name)
        return apb.UnloadAdapterResponse(adapter=await self._info(request.name))

    async def DeleteAdapter(self, request, context):
        registry = self.runtime.require_registry()
        entry = await asyncio.to_thread(registry.delete, request.name)
        return apb.DeleteAdapterResponse(adapter=convert.entry_info(entry))

    async def ListAdapters(self, request, context):
        registry = self.runtime.require_registry()
        statuses = await asyncio.to_thread(registry.list)
        return apb.ListAdaptersResponse(adapters=[convert.adapter_info(s) for s in statuses])

    async def GetAdapter(self, request, context):
        return apb.GetAdapterResponse(adapter=await self._info(request.name))

    async def PinAdapter(self, request, context):
        registry = self.runtime.require_registry()
        await asyncio.to_thread(registry.set_pinned, request.name, True)
        return apb.PinAdapterResponse(adapter=await self._info(request.name))

    async def UnpinAdapter(self, request, context):
        registry = self.runtime.require_registry()
        await asyncio.to_thread(registry.set_pinned, request.name, False)
        return apb.UnpinAdapterResponse(adapter=await self._info(request.name))


@contextlib.asynccontextmanager
async def _stopper(context):
    """`should_stop()` for a worker thread: true once this RPC is cancelled or past its deadline."""
    stop = threading.Event()
    remaining = context.time_remaining()
    deadline = time.monotonic() + remaining if remaining is not None else None

    def should_stop() -> bool:
        return stop.is_set() or (deadline is not None and time.monotonic() > deadline)
    try:
        yield should_stop
    except asyncio.CancelledError:
        stop.set()
        raise
