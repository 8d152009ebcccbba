#!/bin/sh
# Installs the peers of bench/run.py (called by `make bench-peers`; safe to run again):
#  - Postfix, Debian's package, preseeded "No configuration" so the system instance has
#    no main.cf and stays stopped; bench/peers/postfix.py runs a private instance with
#    `postfix -c DIR`. The package also brings smtp-source and smtp-sink, the load
#    generator and sink every system is measured with.
#  - aiosmtpd in the project's venv (the plain-Python peer, bench/peers/aiosmtpd_lmdb.py).
# apt-get needs root: without it the Postfix step is skipped with a message, and
# bench/run.py then falls back to engine.lab.blast and the Python sink with no Postfix rows.
set -eu
PIP="${1:-.venv/bin/pip}"

if [ -x /usr/sbin/postfix ] && [ -x /usr/sbin/smtp-source ] && [ -x /usr/sbin/smtp-sink ]; then
    echo "bench-peers: postfix already installed ($(/usr/sbin/postconf -d -h mail_version 2>/dev/null))"
elif [ "$(id -u)" != 0 ]; then
    echo "bench-peers: not root, so apt-get cannot install postfix; run 'sudo make bench-peers'," \
         "or bench/run.py will skip the Postfix rows and use engine.lab.blast and the Python sink" >&2
elif ! command -v apt-get >/dev/null 2>&1; then
    echo "bench-peers: no apt-get on this machine; install postfix (with smtp-source/smtp-sink) by hand" >&2
else
    echo "postfix postfix/main_mailer_type select No configuration" | debconf-set-selections
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postfix >/dev/null
    echo "bench-peers: installed postfix $(/usr/sbin/postconf -d -h mail_version 2>/dev/null)"
fi
# The system instance must not run beside ours (same binaries, different config dir):
# with "No configuration" it has no main.cf, so this is a no-op unless it was configured.
if [ -x /usr/sbin/postfix ] && [ -f /etc/postfix/main.cf ] && [ "$(id -u)" = 0 ]; then
    /usr/sbin/postfix status >/dev/null 2>&1 && /usr/sbin/postfix stop || true
fi

"$PIP" install --quiet aiosmtpd
echo "bench-peers: aiosmtpd $("$PIP" show aiosmtpd 2>/dev/null | sed -n 's/^Version: //p') in $(dirname "$PIP")"
