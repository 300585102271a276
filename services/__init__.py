"""offramp's services, one folder each under services/ (folder ``segment-worker`` is
``offramp.services.segment_worker``); each runs with ``python -m offramp.services.<name>``."""
