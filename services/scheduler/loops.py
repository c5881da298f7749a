"""Background loops of the scheduler process that are not a domain object's own (the
load tracker and the autoscaler run their loops themselves)."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging

import grpc

from sage.common.exceptions import InvalidRequestError
from sage.common.grpc import create_channel
from sage.rpc.lifecycle.v1 import lifecycle_pb2, lifecycle_pb2_grpc

from .convert import node_report_from_pb
from .nodes import NodeTable

log = logging.getLogger("sage.scheduler")


class NodeWatcher:
    """Background work of the node table: sweep silent nodes, poll static ones."""

    def __init__(self, table: NodeTable, interval_s: float, rpc_timeout_s: float) -> None:
        self.table = table
        self.interval_s = interval_s
        self.rpc_timeout_s = rpc_timeout_s
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Run until `aclose`."""
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        while True:
            for node_id in self.table.sweep():
                log.warning("node down; its engines are drained", extra={"node_id": node_id})
            statics = self.table.static_nodes()
            if statics:
                await asyncio.gather(*(self.poll(s.node_id, s.lifecycle_addr) for s in statics))
            await asyncio.sleep(self.interval_s)

    async def poll(self, node_id: str, addr: str) -> None:
        """Ask a static node's lifecycle to describe itself; silence marks it down."""
        channel = self._channels.get(addr)
        if channel is None:
            channel = self._channels[addr] = create_channel(
                addr, default_timeout=self.rpc_timeout_s
            )
        stub = lifecycle_pb2_grpc.LifecycleServiceStub(channel)
        try:
            reply = await stub.DescribeNode(
                lifecycle_pb2.DescribeNodeRequest(),
                timeout=min(self.rpc_timeout_s, max(self.interval_s * 2, 1.0)),
            )
        except grpc.RpcError as err:
            self.table.mark_unreachable(
                node_id, f"lifecycle at {addr} unreachable: {err.code().name} {err.details()}"
            )
            return
        report = node_report_from_pb(reply.report)
        if report.node_id != node_id:
            self.table.mark_unreachable(
                node_id, f"the agent at {addr} says it is node {report.node_id!r}"
            )
            return
        with contextlib.suppress(InvalidRequestError):
            # The address we polled is the one to use, whatever the agent thinks it is.
            self.table.report(
                dataclasses.replace(report, lifecycle_addr=addr), register=True, static=True
            )

    async def aclose(self) -> None:
        """Stop the loop and close the poll channels."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        for channel in self._channels.values():
            await channel.close(None)
