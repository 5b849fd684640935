"""`make hardening`: reliability figures against real processes, rendered into RELIABILITY.md."""
