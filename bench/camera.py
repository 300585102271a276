"""An open-loop camera for the overload benchmark: a process of its own, a plain paho-mqtt
client (MQTT v5), publishing encoded images at a fixed rate to ``ingest/<source>`` at QoS 1,
each with its frame id as correlation data. It is paced by the clock alone: a slow system does
not slow it down (paho keeps up to ``--inflight`` publishes awaiting their acknowledgement and
queues the rest), which is what a camera does.

With ``--follow-rate`` it reads the pace the admission-controller tells its source
(``control/pace/<source>``) and skips the frames above it, as a camera that follows the pace
does (:class:`offramp.client.PaceFollower`); a skipped frame is never sent.

It writes one JSON line per second to stdout: frames sent that second. At the end, the send
time of every frame (``--sent FILE``, .npy of wall-clock seconds, index = frame number; NaN
for a frame skipped for the pace).

    python -m bench.camera --port 1883 --prefix offramp/v1 --source cam-1 --rate 800 \\
        --seconds 60 --frames frames.npz --sent sent.npy
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np
import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from offramp.bus import Message
from offramp.client import PaceFollower


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.camera", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--host", default="127.0.0.1", help="broker host")
    p.add_argument("--port", type=int, required=True, help="broker port")
    p.add_argument("--prefix", default="offramp/v1", help="topic prefix")
    p.add_argument("--source", default="cam-1", help="source name (ingest/<source>)")
    p.add_argument("--rate", type=float, required=True, help="frames per second")
    p.add_argument("--seconds", type=float, required=True, help="how long to publish")
    p.add_argument("--frames", required=True,
                   help=".npz with 'payloads' (object array of encoded images), cycled")
    p.add_argument("--id-prefix", default="f", help="frame ids are <prefix><n>")
    p.add_argument("--inflight", type=int, default=1000,
                   help="publishes awaiting their acknowledgement before paho queues")
    p.add_argument("--sent", required=True, help="where to write each frame's send time (.npy)")
    p.add_argument("--follow-rate", action="store_true",
                   help="skip the frames above the pace told on control/pace/<source>")
    p.add_argument("--share", type=float, default=1.0,
                   help="with --follow-rate: the part of the source's pace this camera takes "
                        "(1/n where n cameras send for one source)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    payloads = list(np.load(args.frames, allow_pickle=True)["payloads"])
    # a client id of its own: cameras of one source with one id would take each other's
    # connection over, again and again
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2,
                         client_id=f"camera-{args.source}-{args.id_prefix}", protocol=mqtt.MQTTv5)
    client.max_inflight_messages_set(args.inflight)
    pace = PaceFollower(share=args.share) if args.follow_rate else None
    if pace is not None:
        pace_topic = f"{args.prefix}/control/pace/{args.source}"
        client.on_message = lambda _c, _u, msg: pace.read(Message(msg.topic, msg.payload))
        client.on_connect = lambda c, *_: c.subscribe(pace_topic, qos=1)
    client.connect(args.host, args.port)
    client.loop_start()
    topic = f"{args.prefix}/ingest/{args.source}"
    total = int(args.rate * args.seconds)
    sent = np.zeros(total)
    start = time.time() + 0.2
    second, in_second = 0, 0
    for n in range(total):
        due = start + n / args.rate
        wait = due - time.time()
        if wait > 0:
            time.sleep(wait)
        if pace is not None and not pace.take():
            sent[n] = np.nan
            continue
        props = Properties(PacketTypes.PUBLISH)
        props.CorrelationData = f"{args.id_prefix}{n}".encode()
        sent[n] = time.time()
        client.publish(topic, payloads[n % len(payloads)], qos=1, properties=props)
        in_second += 1
        if sent[n] - start >= second + 1:
            print(json.dumps({"second": second, "sent": in_second}), flush=True)
            second, in_second = second + 1, 0
    print(json.dumps({"second": second, "sent": in_second}), flush=True)
    np.save(args.sent, sent)
    time.sleep(1.0)  # the last acknowledgements
    client.loop_stop()
    client.disconnect()
    return 0


if __name__ == "__main__":
    sys.exit(main())
