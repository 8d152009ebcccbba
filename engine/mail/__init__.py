"""Message content for the newsletter side: DKIM signing, templates and MIME
composition, feedback reports (ARF, late DSNs) and VERP tokens, bounce classes.

Pure functions and small classes over bytes and the configuration; no sockets, no
queue. The worker, the HTTP API and delivery call them.
"""
