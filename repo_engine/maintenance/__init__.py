"""Maintenance: statistics, retention and forget, garbage collection, verify, scrub and
rebuild-index; each module's docstring states its protocol."""
