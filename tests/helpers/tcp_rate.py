"""A TCP transfer for the rehearsal network's shaping test, run inside a namespace.

    tcp_rate.py serve HOST PORT SECONDS   receive; print the goodput in Mbit/s measured from
                                          0.5 s after the first byte for SECONDS
    tcp_rate.py send HOST PORT SECONDS    send zeros as fast as the link takes them
"""

from __future__ import annotations

import socket
import sys
import time

CHUNK = 256 * 1024


def serve(host: str, port: int, seconds: float) -> None:
    with socket.create_server((host, port)) as server:
        print("listening", flush=True)
        conn, _ = server.accept()
        with conn:
            first = None
            counted = 0
            while True:
                data = conn.recv(CHUNK)
                if not data:
                    break
                now = time.monotonic()
                first = first or now
                if first + 0.5 <= now <= first + 0.5 + seconds:
                    counted += len(data)
                if now > first + 0.5 + seconds:
                    break
    print(f"{counted * 8 / seconds / 1e6:.3f}", flush=True)


def send(host: str, port: int, seconds: float) -> None:
    buf = bytes(CHUNK)
    end = time.monotonic() + seconds + 1.5
    with socket.create_connection((host, port), timeout=10) as conn:
        try:
            while time.monotonic() < end:
                conn.sendall(buf)
        except (BrokenPipeError, ConnectionResetError):
            pass


if __name__ == "__main__":
    role, host, port, seconds = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
    (serve if role == "serve" else send)(host, port, seconds)
