"""`volley doctor DOMAIN`: sender readiness, checked the way receivers check it.

Pure checks over DNS answers (checks_auth.py: SPF, DKIM, DMARC; checks_host.py: MX,
PTR and forward-confirmed reverse DNS, MTA-STS, TLS-RPT; spf.py: a small RFC 7208
evaluator), one small fetcher that looks up what they ask for (fetch.py), the
sending addresses from the config (sources.py), the report (report.py), the command
(cli.py). Nothing here is imported by `volley --help`: the package's modules load
when the command runs.
"""
