"""Latency-bandwidth cost of each collective (seconds), per link type.

A transfer costs a per-message latency plus its bytes over an achieved bandwidth
(:class:`cpjax.perfmodel.calibration.Constants`): SendRecv and All2All on the inter-node link
(RDMA or TCP), the tensor-parallel all-reduce on NVLink inside a node and over the inter-node
link between nodes.
"""

from __future__ import annotations

from cpjax.errors import require
from cpjax.hardware import Hardware
from cpjax.perfmodel.calibration import Constants


def sendrecv_time(nbytes: float, constants: Constants) -> float:
    """One ring SendRecv of ``nbytes`` per rank (each rank sends and receives that much)."""
    require(nbytes >= 0, f"nbytes={nbytes}: must be >= 0")
    if nbytes == 0:
        return 0.0
    return constants.sendrecv_latency_s + nbytes / constants.sendrecv_bandwidth


def all_to_all_time(bytes_sent: float, ranks: int, constants: Constants) -> float:
    """One All2All in which each of ``ranks`` ranks sends ``bytes_sent`` bytes in all (none,
    and no latency, when nothing is sent: pass-KV has no All2All)."""
    require(ranks >= 1, f"ranks={ranks}: must be >= 1")
    require(bytes_sent >= 0, f"bytes_sent={bytes_sent}: must be >= 0")
    if ranks == 1 or bytes_sent == 0:
        return 0.0
    return constants.all_to_all_latency_s + bytes_sent / constants.all_to_all_bandwidth


def all_gather_time(bytes_per_rank: float, ranks: int, constants: Constants) -> float:
    """A ring all-gather: ``ranks - 1`` SendRecvs of each rank's ``bytes_per_rank``."""
    require(ranks >= 1, f"ranks={ranks}: must be >= 1")
    return (ranks - 1) * sendrecv_time(bytes_per_rank, constants)


def all_reduce_time(
    nbytes: float, gpus: int, gpus_per_node: int, hardware: Hardware, constants: Constants
) -> float:
    """An all-reduce of ``nbytes`` over ``gpus`` GPUs, hierarchical across nodes.

    Inside a node (``g = min(gpus, gpus_per_node)`` GPUs) a ring reduce-scatter + all-gather
    moves ``2 (g-1)/g`` of the bytes over NVLink after one NVLink latency. Across
    ``m = gpus / g`` nodes each GPU all-reduces its ``1/g`` slice over the inter-node link:
    ``m - 1`` link latencies and ``2 (m-1)/m`` of the slice. ``gpus`` must be a multiple of
    ``gpus_per_node`` when it exceeds it.
    """
    require(gpus >= 1 and gpus_per_node >= 1, f"gpus={gpus}, gpus_per_node={gpus_per_node}")
    require(
        gpus <= gpus_per_node or gpus % gpus_per_node == 0,
        f"gpus={gpus}: a group spanning nodes must be a multiple of gpus_per_node={gpus_per_node}",
    )
    if gpus == 1:
        return 0.0
    inside = min(gpus, gpus_per_node)
    nodes = gpus // inside
    time = 0.0
    if inside > 1:
        time += constants.nvlink_allreduce_latency_s
        time += 2 * (inside - 1) / inside * nbytes / hardware.nvlink_bandwidth
    if nodes > 1:
        time += (nodes - 1) * constants.sendrecv_latency_s
        time += 2 * (nodes - 1) / nodes * nbytes / inside / constants.sendrecv_bandwidth
    return time
