"""admission-controller: owns every frame from ingest to its one result."""
