"""`volley sink`: a fast SMTP receiver for load tests and drills, with injected faults."""
