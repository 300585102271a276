"""Frames for `make test-deploy`, and the check of what came back.

``frames.py make DIR``: digits test images as msgpack envelopes (with frame ids and labels),
a few bare PNG files (as a camera would send them) and files that are no frame at all, each
one file for ``mosquitto_pub -f``, plus ``expected.json``.
``frames.py one FILE FRAME_ID``: one more envelope (a frame id not used by ``make``).
``frames.py check DIR RESULTS``: RESULTS holds the JSON lines ``mosquitto_sub`` printed; exits
non-zero, saying why, unless every frame got exactly one result with the status it should.
"""

from __future__ import annotations

import json
import sys
from collections import Counter
from pathlib import Path

from offramp.local.client import envelope, png_bytes
from offramp.ml.data import load_digits

ENVELOPES = 120
PNGS = 10
GARBAGE = {"garbage-1.bin": b"\x00not a frame\xff", "garbage-2.bin": b"GIF89a" + bytes(40)}
MIN_ACCURACY = 0.85


def make(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    test = load_digits().test
    labels = {}
    for i in range(ENVELOPES):
        frame = f"deploy-{i}"
        labels[frame] = int(test.labels[i])
        (folder / f"{frame}.msgpack").write_bytes(
            envelope(frame, image=test.images[i], label=labels[frame]))
    for j in range(PNGS):
        (folder / f"png-{j}.png").write_bytes(png_bytes(test.images[ENVELOPES + j]))
    for name, data in GARBAGE.items():
        (folder / name).write_bytes(data)
    (folder / "expected.json").write_text(json.dumps(
        {"labels": labels, "pngs": PNGS, "garbage": len(GARBAGE)}))


def check(folder: Path, results_file: Path) -> list[str]:
    expected = json.loads((folder / "expected.json").read_text())
    labels: dict[str, int] = expected["labels"]
    total = len(labels) + expected["pngs"] + expected["garbage"]
    results = [json.loads(line) for line in results_file.read_text().splitlines() if line.strip()]
    problems = []
    if len(results) != total:
        problems.append(f"{len(results)} results for {total} frames")
    per_frame = Counter(r["frame_id"] for r in results)
    twice = [f for f, n in per_frame.items() if n > 1]
    if twice:
        problems.append(f"answered more than once: {twice[:5]}")
    missing = sorted(set(labels) - set(per_frame))
    if missing:
        problems.append(f"no result for {len(missing)} envelopes, e.g. {missing[:5]}")
    envs = [r for r in results if r["frame_id"] in labels]
    others = [r for r in results if r["frame_id"] not in labels]
    status = Counter(r["status"] for r in envs)
    if status != Counter(ok=len(labels)):
        problems.append(f"envelopes: {dict(status)}, expected all ok")
    other = Counter(r["status"] for r in others)
    if other != Counter(ok=expected["pngs"], error=expected["garbage"]):
        problems.append(f"bare PNGs and garbage: {dict(other)}, expected "
                        f"{expected['pngs']} ok and {expected['garbage']} error")
    correct = sum(1 for r in envs if r["status"] == "ok" and r["label"] == labels[r["frame_id"]])
    accuracy = correct / max(1, len(labels))
    if accuracy < MIN_ACCURACY:
        problems.append(f"accuracy {accuracy:.3f} < {MIN_ACCURACY}")
    exits = Counter(r["exit_index"] for r in envs if r["status"] == "ok")
    print(f"test-deploy: {len(results)} results for {total} frames, envelopes {dict(status)}, "
          f"others {dict(other)}, accuracy {accuracy:.3f}, exits {dict(sorted(exits.items()))}")
    return problems


def main(argv: list[str]) -> int:
    if len(argv) == 2 and argv[0] == "make":
        make(Path(argv[1]))
        return 0
    if len(argv) == 3 and argv[0] == "one":
        test = load_digits().test
        Path(argv[1]).write_bytes(envelope(argv[2], image=test.images[-1],
                                           label=int(test.labels[-1])))
        return 0
    if len(argv) == 3 and argv[0] == "check":
        problems = check(Path(argv[1]), Path(argv[2]))
        for p in problems:
            print(f"test-deploy: {p}", file=sys.stderr)
        return 1 if problems else 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
