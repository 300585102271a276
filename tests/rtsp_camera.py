"""An RTSP camera on loopback for the tests: GStreamer's RTSP server (gst-rtsp-server) serving
a live H.264 test pattern at rtsp://127.0.0.1:<port>/cam. Run with the system Python, which
has GStreamer's introspection bindings (python3-gi): ``/usr/bin/python3 rtsp_camera.py PORT``.
Prints ``ready`` once it listens."""

import sys

import gi

gi.require_version("Gst", "1.0")
gi.require_version("GstRtspServer", "1.0")
from gi.repository import GLib, Gst, GstRtspServer  # noqa: E402

PIPELINE = ("( videotestsrc is-live=true pattern=ball ! video/x-raw,width=320,height=240,"
            "framerate=15/1 ! x264enc tune=zerolatency speed-preset=ultrafast key-int-max=15 ! "
            "rtph264pay name=pay0 pt=96 config-interval=1 )")

Gst.init(None)
server = GstRtspServer.RTSPServer()
server.set_address("127.0.0.1")
server.set_service(sys.argv[1])
factory = GstRtspServer.RTSPMediaFactory()
factory.set_launch(PIPELINE)
factory.set_shared(True)
server.get_mount_points().add_factory("/cam", factory)
server.attach(None)
print("ready", flush=True)
GLib.MainLoop().run()
