"""``offramp publish``: send a dataset's images, a folder of JPEG/PNG files, or a camera's
frames (``--video``, :mod:`offramp.cli.publish_video`) to an ingest topic, as a camera would.

The images are those of the dataset the served model was trained on: the bundle's
(``--bundle``), or the one the running exit-arbiter announces in its retained exit policy. A
``--dataset`` that differs from either is refused: a model answers another dataset's images
with confident nonsense. Each envelope is stamped (time, deadline) when it is sent, not when
the list is built. Files of ``--dir`` go as they are, their frame id as MQTT v5 correlation
data, and the command prints which file got which id. Unless ``--no-follow-rate``, the
command follows the pace the admission-controller tells the source (docs/wire.md, "Pace"):
images wait for it, a camera's frames above it are skipped.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from offramp.bus import Bus, MessageBus, Topics, from_payload
from offramp.cli.args import add_bus_options, bus_settings
from offramp.cli.publish_video import add_video_options, publish_video, video_options
from offramp.client.pace import PaceFollower, follow_pace
from offramp.errors import OfframpError
from offramp.local.client import Outgoing, envelope, publish_frames
from offramp.wire import ExitPolicy

if TYPE_CHECKING:
    from offramp.ml.data import Split

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
DESCRIPTION = ("Send a dataset's images (those the served model was trained on), a folder "
               "of JPEG/PNG files, or a camera's frames (a video file, /dev/videoN, rtsp://) "
               "to ingest/<source>, as a camera would, at the pace the system takes them.")
ANNOUNCE_WAIT_S = 3.0  # how long to wait for the served model's retained exit policy


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("publish", help="send frames to an ingest topic at a rate",
                       description=DESCRIPTION)
    add_bus_options(p)
    p.add_argument("--source", default="cam-1", help="camera (source) id")
    p.add_argument("--count", type=int, default=0,
                   help="stop after this many frames (0: every image once, or for ever with "
                        "--loop)")
    p.add_argument("--loop", action="store_true", help="send the images again and again")
    p.add_argument("--dir", type=Path, default=None,
                   help="a folder of JPEG/PNG files, sent as they are (instead of a dataset)")
    p.add_argument("--bundle", type=Path, default=None,
                   help="send the dataset this bundle was trained on (None: the served one's)")
    p.add_argument("--dataset", default=None,
                   help="send this dataset's images (None: the bundle's or the served one's; "
                        "a different one is refused)")
    p.add_argument("--data-dir", default=None, help="that dataset's folder, where it needs one "
                                                    "(None: the bundle's)")
    p.add_argument("--split", default="test", choices=("train", "val", "test"),
                   help="which split of the dataset")
    p.add_argument("--rate", type=float, default=50.0, help="frames per second (0: at once)")
    p.add_argument("--deadline-ms", type=float, default=0.0,
                   help="each frame's deadline, counted from when it is sent (0: none)")
    p.add_argument("--no-follow-rate", dest="follow_rate", action="store_false",
                   help="send at --rate (or the camera's rate) even above the pace the "
                        "admission-controller tells the source on control/pace/<source>; the "
                        "frames above it are answered 'dropped'")
    add_video_options(p)
    p.set_defaults(handler=cmd_publish)


@dataclass(frozen=True)
class Wanted:
    """The dataset to send and where it comes from (for the messages)."""

    name: str
    data_dir: str | None
    size: int
    said_by: str


def _from_bundle(args: argparse.Namespace) -> Wanted | None:
    if args.bundle is None:
        return None
    from offramp.model.bundle import load_bundle

    m = load_bundle(args.bundle).manifest
    name = m.metrics.get("dataset")
    if not name:
        raise OfframpError(f"bundle {args.bundle} does not say which dataset it was trained "
                           "on: pass --dataset")
    return Wanted(str(name), m.metrics.get("data_dir"), m.input.height, f"bundle {args.bundle}")


async def served_datasets(bus: MessageBus, topics: Topics, wait_s: float) -> dict[str, str]:
    """``{model: dataset}`` from the retained exit policies of the models being served."""
    sub = await bus.subscribe(topics.exit_policy_all(), maxsize=64,
                              decode=from_payload(ExitPolicy.decode))
    found: dict[str, str] = {}
    try:
        end = time.monotonic() + wait_s
        while (left := end - time.monotonic()) > 0:
            try:
                policy = await asyncio.wait_for(sub.get(), left if not found else min(left, 0.3))
            except TimeoutError:
                break
            found[policy.model] = policy.dataset
    finally:
        await sub.close()
    return found


def choose_dataset(args: argparse.Namespace, bundle: Wanted | None,
                   served: dict[str, str]) -> Wanted:
    """The dataset to send, or one clear error: never images the model was not trained on."""
    known = {m: d for m, d in served.items() if d}
    if args.dataset and bundle is not None and args.dataset != bundle.name:
        raise OfframpError(f"--dataset {args.dataset}, but {bundle.said_by} was trained on "
                           f"{bundle.name}")
    for model, dataset in known.items():
        asked = args.dataset or (bundle.name if bundle else None)
        if asked and asked != dataset:
            raise OfframpError(f"the served model {model} was trained on {dataset}, not {asked}: "
                               "its answers to these images would be wrong")
    if bundle is not None:
        return bundle
    if args.dataset:
        return Wanted(args.dataset, args.data_dir, 32, "--dataset")
    if len(set(known.values())) == 1:
        model, dataset = next(iter(known.items()))
        return Wanted(dataset, args.data_dir, 32, f"the served model {model}")
    if known:
        raise OfframpError(f"the served models were trained on different datasets ({known}): "
                           "pass --bundle or --dataset")
    raise OfframpError("no served model said which dataset it was trained on (none answered "
                       f"within {ANNOUNCE_WAIT_S:.0f} s, or its bundle does not say): pass "
                       "--bundle or --dataset")


def _files(folder: Path) -> list[Path]:
    if not folder.is_dir():
        raise OfframpError(f"--dir {folder}: {'not a folder' if folder.exists() else 'no such folder'}")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise OfframpError(f"no {', '.join(IMAGE_SUFFIXES)} files in {folder}")
    return files


def _count(args: argparse.Namespace, available: int, what: str) -> int | None:
    """Frames to send (None: for ever)."""
    if args.count < 0:
        raise OfframpError(f"--count {args.count}: a number of frames, 0 for all")
    if args.loop:
        return args.count or None
    if args.count > available:
        raise OfframpError(f"--count {args.count}, but {what} has {available} images: add --loop "
                           "to send them again")
    return args.count or available


def _run_id() -> str:
    return f"{int(time.time()) % 100000:05d}-{os.getpid() % 1000:03d}"  # ids differ between runs


def file_frames(files: list[Path], count: int | None, run: str) -> Iterator[Outgoing]:
    """Each file's bytes with its frame id (``<file name>@<run>[#<pass>]``) as correlation data;
    the file-to-id line goes to stdout as it is sent."""
    for n, path in zip(itertools.count(), itertools.cycle(files)):
        if count is not None and n >= count:
            return
        rounds = n // len(files)
        frame_id = f"{path.name}@{run}" + (f"#{rounds}" if rounds else "")
        print(json.dumps({"frame_id": frame_id, "file": str(path)}), flush=True)
        yield Outgoing(path.read_bytes(), frame_id.encode())


def dataset_frames(split: Split, split_name: str, count: int | None, deadline_s: float | None,
                   run: str) -> Iterator[bytes]:
    """Envelopes of the split's images with their labels, each stamped when it is sent."""
    for n in itertools.count():
        if count is not None and n >= count:
            return
        i = n % len(split)
        yield envelope(f"{split_name}-{run}-{n}", image=split.images[i],
                       label=int(split.labels[i]), deadline_s=deadline_s)


def _check(args: argparse.Namespace) -> None:
    """One clear error for options that do not go together, before anything connects."""
    if args.deadline_ms < 0:
        raise OfframpError(f"--deadline-ms {args.deadline_ms}: milliseconds, 0 for none")
    if args.dir is not None and (args.bundle or args.dataset):
        raise OfframpError("--dir sends files; --bundle and --dataset choose dataset images")
    if args.video is not None and (args.dir is not None or args.bundle or args.dataset):
        raise OfframpError("--video sends a camera's frames; --dir, --bundle and --dataset "
                           "choose images")
    if args.count < 0:
        raise OfframpError(f"--count {args.count}: a number of frames, 0 for all")


def cmd_publish(args: argparse.Namespace) -> int:
    settings = bus_settings(args)
    _check(args)
    files = _files(args.dir) if args.dir is not None else []
    video = video_options(args) if args.video is not None else None  # checked before connecting
    bundle = _from_bundle(args)
    topics = Topics(args.prefix)
    run = _run_id()
    sent = 0

    def counted(frames: Iterator[bytes] | Iterator[Outgoing]) -> Iterator[bytes | Outgoing]:
        nonlocal sent
        for frame in frames:
            sent += 1
            yield frame

    async def go() -> float:
        async with Bus(settings, f"offramp-publish-{os.getpid()}") as bus:
            await bus.wait_connected(10)
            if not args.follow_rate:
                return await send(bus, None)
            pace, reading, sub = await follow_pace(bus, topics, args.source)
            try:
                return await send(bus, pace)
            finally:
                reading.cancel()
                await sub.close()
                if pace.told:
                    print(f"followed the pace: told {pace.told} times, {pace.skipped} frames "
                          f"skipped, last {pace.rate_hz or 0:.1f} frames/s", file=sys.stderr)

    async def send(bus: Bus, pace: PaceFollower | None) -> float:
        nonlocal sent
        if video is not None:
            summary = await publish_video(
                bus, topics, args.source, video, run=run, count=args.count,
                deadline_s=args.deadline_ms / 1000 or None, pace=pace)
            print(summary.json(), flush=True)
            sent = summary.published
            if not summary.kept and summary.last_error:
                raise OfframpError(f"--video {args.video}: {summary.last_error}")
            return summary.seconds
        frames: Iterator[bytes] | Iterator[Outgoing]
        if files:
            frames = file_frames(files, _count(args, len(files), f"--dir {args.dir}"), run)
        else:
            wanted = choose_dataset(args, bundle,
                                    await served_datasets(bus, topics, ANNOUNCE_WAIT_S))
            from offramp.ml.data import load_dataset

            split = load_dataset(wanted.name, wanted.data_dir, wanted.size,
                                 splits=(args.split,)).split(args.split)
            what = f"the {args.split} split of {wanted.name}"
            print(f"sending {what} ({wanted.said_by})", file=sys.stderr)
            frames = dataset_frames(split, args.split, _count(args, len(split), what),
                                    args.deadline_ms / 1000 or None, run)
        return await publish_frames(bus, topics.ingest(args.source), counted(frames),
                                    args.rate, pace=pace)

    seconds = asyncio.run(go())
    print(f"published {sent} frames to {args.source} in {seconds:.1f} s", file=sys.stderr)
    return 0
