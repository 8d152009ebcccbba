"""`volley blast`: an SMTP load generator (options and report in `run`, the wire in `protocol`)."""
