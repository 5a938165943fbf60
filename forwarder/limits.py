"""Process limits the daemon needs: enough file descriptors for its sockets.

systemd (and most shells) start services with a soft RLIMIT_NOFILE of 1024, far below what
10,000 subscriptions need, while the hard limit is usually much higher (524288 under systemd).
A process may raise its own soft limit up to the hard limit without privileges, so forwarder
does that at start, and refuses to start when even the hard limit is too small: better one
clear error than "Too many open files" on hundreds of reconnects.
"""

from __future__ import annotations

import logging
import resource

from forwarder.errors import ConfigError

log = logging.getLogger(__name__)

# Spool segments, the spool lock, Redis connections, HTTP clients, the selectors, journald.
RESERVED_FDS = 64


def fds_needed(subscriptions: int, handshake_threads: int) -> int:
    """Descriptors for `subscriptions`: one socket each, a second one for the few in a
    make-before-break re-subscribe, one per handshake in flight, and the daemon's own."""
    return subscriptions + subscriptions // 20 + handshake_threads + RESERVED_FDS


def raise_fd_limit(needed: int) -> int:
    """Raise the soft RLIMIT_NOFILE to the hard limit; return the new soft limit.

    Raises ConfigError (exit 2) if the limit cannot reach `needed`.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else max(soft, needed, 1 << 20)
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError) as exc:
            log.warning("cannot raise the open-file limit from %d to %d: %s", soft, target, exc)
        else:
            log.debug("open-file limit raised from %d to %d", soft, target)
            soft = target
    if soft != resource.RLIM_INFINITY and soft < needed:
        raise ConfigError(
            f"the configuration needs about {needed} open files (one socket per subscription, "
            f"plus handshakes and the daemon's own), but the hard limit (RLIMIT_NOFILE) is "
            f"{hard}: raise it (systemd: LimitNOFILE= in the unit; a shell: ulimit -Hn) or "
            "split the sources over several forwarder processes"
        )
    return soft
