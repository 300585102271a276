"""segment-worker: runs model segments, exits samples early, forwards the rest."""
