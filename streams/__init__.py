"""Stream processing: replay drop, classification, dedup and per-email state (Faust)."""
