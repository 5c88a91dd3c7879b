"""Maintenance: statistics now; retention, garbage collection, verify and scrub build on it."""
