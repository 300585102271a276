"""The kernel's side of a TCP connection: its accounting (Linux ``TCP_INFO``), for link
measurement, and whether Nagle's algorithm is off (:func:`no_delay`).

``struct tcp_info`` only ever grows at its end, so the fields read here sit at fixed offsets:
``tcpi_snd_mss`` and ``tcpi_unacked`` (segments sent and not yet acknowledged), ``tcpi_rtt``
(microseconds, since 2.6), ``tcpi_bytes_acked`` (4.1), ``tcpi_notsent_bytes``
(written by the application, not yet sent, 4.6) and ``tcpi_busy_time`` (microseconds with data
to send, 4.10). Where the system does not give them (another OS, an
older kernel, a socket that is not TCP) :func:`read` returns None and the link stays unknown.
"""

from __future__ import annotations

import contextlib
import socket
import struct
from dataclasses import dataclass

_U32 = struct.Struct("=I")
_SND_MSS, _UNACKED = 16, 24
_RTT = struct.Struct("=I")  # at 68
_BYTES_ACKED = struct.Struct("=Q")  # at 120
_NOTSENT = struct.Struct("=I")  # at 144
_BUSY_TIME = struct.Struct("=Q")  # at 168
_NEEDED = 176


@dataclass(frozen=True)
class TcpInfo:
    bytes_acked: int  # cumulative, of this connection
    busy_us: int  # cumulative time with data to send
    rtt_us: int  # smoothed round trip now
    notsent_bytes: int = 0  # in the socket's send buffer, not yet sent
    unacked_bytes: int = 0  # sent and not acknowledged yet: in queues on the way, or lost
    no_delay: bool = False  # TCP_NODELAY: each packet sent as it is written


def read(sock: socket.socket | None) -> TcpInfo | None:
    """A sample of ``sock``'s counters, or None where the kernel does not give them."""
    option = getattr(socket, "TCP_INFO", None)
    if sock is None or option is None:
        return None
    try:
        raw = sock.getsockopt(socket.IPPROTO_TCP, option, 256)
        nodelay = bool(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
    except (OSError, ValueError):  # closed, not TCP, or not a real socket
        return None
    if len(raw) < _NEEDED:
        return None
    return TcpInfo(bytes_acked=_BYTES_ACKED.unpack_from(raw, 120)[0],
                     busy_us=_BUSY_TIME.unpack_from(raw, 168)[0],
                     rtt_us=_RTT.unpack_from(raw, 68)[0],
                     notsent_bytes=_NOTSENT.unpack_from(raw, 144)[0],
                     unacked_bytes=_U32.unpack_from(raw, _UNACKED)[0]
                     * _U32.unpack_from(raw, _SND_MSS)[0],
                     no_delay=nodelay)


def no_delay(sock: socket.socket | None) -> None:
    """Send each packet as it is written (TCP_NODELAY). paho, like Mosquitto, leaves Nagle's
    algorithm on, under which a small packet written while an earlier one is unacknowledged
    waits for that acknowledgement: up to 40 ms where the receiver has nothing to answer and
    delays it. Offered 1,500 frames/s on a 2-core machine, the system served 1,053-1,104
    frames/s with it on the services' connections against 965-1,016 without. (The broker's
    side, Mosquitto's ``set_tcp_nodelay``, is what would cut the latency at low load; it costs
    capacity, and the README says when to set it.) A socket that is not TCP is left alone."""
    if sock is None:
        return
    with contextlib.suppress(OSError, AttributeError):  # a websocket wrapper, a pipe
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
