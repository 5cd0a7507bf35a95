"""OpenTrack: email open tracking as an event-streaming pipeline (shared settings, events, CLI)."""
