"""Volley's lab: the load and drill tools that stand beside the engine.

`blast` (an SMTP load generator), `sink` (a fast SMTP receiver with injected faults),
`demo` (the whole loop on loopback) and `dns` (a loopback DNS server for lab zones).
Each runs as `python -m engine.lab.NAME` or `volley NAME`. The engine never imports
the lab; the lab uses the engine's pure SMTP pieces, its config units and its control
client.
"""
