"""The control plane: what the supervisor serves on its control socket, and `volley ctl`.

Server side, run by the supervisor: `server` (the socket) decodes `protocol` requests
and hands them to `commands` (ControlPlane), which reads the queue through the views
(`queue_view`, `message_view`), changes it through `bulk`, serves the suppression list
and the campaign counters through `lists`, keeps the workers' pushed state in `fleet`
and answers with `replies`. It reaches the supervisor only through the Protocols of
`supervisor_api`, and the workers through the typed pipe messages of `wire`.
`metrics_http` serves the same figures to Prometheus.

Client side, in the short-lived `volley ctl` process: `cli_ctl` (arguments → request),
`cli_lists` (`ctl suppress`: import in chunks, export in pages), `client` (one blocking
request and reply), `render`, `render_lists` and `formats` (the human text).
"""
