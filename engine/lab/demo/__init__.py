"""`volley demo`: the whole loop on loopback (lab DNS, sinks, `volley serve`, blast) and a report."""
