"""The admission-controller's settings (``OFFRAMP_ADMISSION_*``, with the source registry's
``OFFRAMP_SOURCES_*`` and the admission strategy's ``OFFRAMP_CONTROL_*``)."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal

from offramp.bus import check_name
from offramp.errors import SettingsError
from offramp.node.sources import SourceSettings
from offramp.policy.admission import ControlSettings
from offramp.settings import BusSettings, CommonSettings, nested, setting

PREFIX = "OFFRAMP_ADMISSION_"


@dataclass(frozen=True)
class AdmissionSettings:
    common: CommonSettings = nested(CommonSettings, "OFFRAMP_")
    sources: SourceSettings = nested(SourceSettings, "OFFRAMP_SOURCES_")
    control: ControlSettings = nested(ControlSettings, "OFFRAMP_CONTROL_")
    bundle: str = setting("bundles/demo", "Model bundle directory")
    max_in_flight: int = setting(256, "Frames in flight per source; beyond it: 'dropped'",
                                 min=1, max=1_000_000)
    max_sources: int = setting(1024, "Sources tracked at once (gate, metric labels, "
                               "heartbeat); a new one takes the place of one idle for "
                               "OFFRAMP_ADMISSION_SOURCE_IDLE_S, or its frames are answered "
                               "'error' while every tracked source is active", min=1,
                               max=1_000_000)
    source_idle_s: float = setting(60.0, "A source without frames for this long (and none in "
                                   "flight) may give its place to a new one", min=0, max=86400)
    heartbeat_sources: int = setting(64, "Sources whose arrivals the heartbeat reports (the "
                                     "most active; the priority-scheduler plans from them)",
                                     min=1, max=10_000)
    ingest_queue: int = setting(2048, "Bound of the ingest inbox (at least the ingest window); "
                                "QoS 0 frames beyond it: 'dropped'", min=1, max=1_000_000)
    ingest_window: int = setting(1024, "QoS 1 frames the broker sends before some are "
                                 "answered and acknowledged (MQTT v5 receive maximum); more "
                                 "wait at the broker", min=1, max=65535)
    progress_timeout_s: float = setting(5.0, "Dispatch again when no result after this long "
                                        "(plus twice the backlog along the path)",
                                        min=0.05, max=3600)
    max_attempts: int = setting(3, "Dispatches per frame before it is answered 'error'", min=1,
                                max=100)
    deadline_s: float = setting(0.0, "Default deadline per frame after arrival (0: none)", min=0,
                                max=86400)
    dispatch_batch: int = setting(8, "Frames per first-activation packet", min=1, max=1024)
    dispatch_wait_ms: float = setting(1.0, "Longest wait to fill a packet", min=0, max=1000)
    codec: Literal["raw", "fp16", "int8"] = setting(
        "raw", "Codec of the input tensor sent to the first segment when "
        "OFFRAMP_ADMISSION_FIRST_HOP=tensor: raw (exact), fp16 (half "
        "the bytes), int8 (a quarter, one scale per packet: about the resolution an 8-bit "
        "camera image had; 602 KB -> 151 KB per frame at 224x224)")
    results_in_flight: int = setting(256, "Results being published at once (QoS 1)", min=1,
                                     max=100_000)
    refusal_interval_ms: float = setting(100.0, "Frames refused under load ('dropped') are "
                                         "answered together, one refusal per source this "
                                         "often (docs/wire.md)", min=1, max=10_000)
    refusals_pending: int = setting(20_000, "Refused frames waiting for the next refusal; "
                                    "at this many it goes out at once", min=1, max=1_000_000)
    pace_interval_ms: float = setting(500.0, "How often each source is told the rate its "
                                      "frames are taken at, on control/pace/<source> "
                                      "(docs/wire.md, Pace); 0: never", min=0, max=60_000)
    pace_target: float = setting(0.5, "The pace aims to keep this fraction of "
                                 "OFFRAMP_ADMISSION_MAX_IN_FLIGHT of a source in flight",
                                 min=0.05, max=0.95)
    first_hop: Literal["frames", "tensor"] = setting(
        "frames", "What the first worker gets: frames (the camera's bytes as they came, "
        "checked from their headers; the worker decodes them) or tensor (decoded and "
        "preprocessed here, sent as the model input in OFFRAMP_ADMISSION_CODEC)")
    dedup_s: float = setting(10.0, "A frame id seen again from the same source within this "
                             "long is a redelivery: no second result, but the answer it was "
                             "given, again (0: off)", min=0, max=3600)
    answers_kept: int = setting(20_000, "Answers kept for frames sent again within "
                                "OFFRAMP_ADMISSION_DEDUP_S (a result's JSON each, about 400 "
                                "bytes: 2,000 frames/s for 10 s; the oldest go first)", min=0,
                                max=10_000_000)
    group: str = setting("admission", "Admission-controllers sharing one ingest session (a "
                         "primary and its standby): client id offramp-ingest-<group>")
    ingest_username: str = setting("", "Broker user of the ingest session, shared by the "
                                   "group (empty: OFFRAMP_USERNAME). Needed where the broker "
                                   "makes each user one client id (compose, k3s)")
    ingest_password: str = setting("", "Password of OFFRAMP_ADMISSION_INGEST_USERNAME",
                                   secret=True)
    ingest_password_file: str = setting("", "File holding that password (overrides "
                                        "OFFRAMP_ADMISSION_INGEST_PASSWORD)")
    standby: bool = setting(False, "Start as the group's standby: take the ingest session only "
                            "when no member has been active for OFFRAMP_ADMISSION_TAKEOVER_S")
    takeover_s: float = setting(1.0, "A standby takes the ingest session this long after the "
                                "active member was last heard active (its will says it is not)",
                                min=0.05, max=600)
    drain_s: float = setting(5.0, "On SIGTERM, how long frames at the workers may still finish; "
                             "the rest are left to the standby, or answered 'error' without "
                             "one",
                             min=0, max=3600)

    def __post_init__(self) -> None:
        if self.ingest_queue < self.ingest_window:
            raise SettingsError(f"OFFRAMP_ADMISSION_INGEST_QUEUE={self.ingest_queue} is below "
                                f"OFFRAMP_ADMISSION_INGEST_WINDOW={self.ingest_window}: the "
                                "inbox must hold every frame the broker may send")
        check_name(self.group, "OFFRAMP_ADMISSION_GROUP")
        if (self.ingest_password or self.ingest_password_file) and not self.ingest_username:
            raise SettingsError("OFFRAMP_ADMISSION_INGEST_PASSWORD(_FILE) is set but "
                                "OFFRAMP_ADMISSION_INGEST_USERNAME is not")
        self.ingest_bus()  # a missing password file is an error at start

    def ingest_bus(self) -> BusSettings:
        """How the ingest session connects: the service's bus, as the group's ingest user."""
        bus = self.common.bus
        if not self.ingest_username:
            return bus
        return replace(bus, username=self.ingest_username, password=self.ingest_password,
                       password_file=self.ingest_password_file)
