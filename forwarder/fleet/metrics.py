"""FleetCollector: the fleet's Prometheus families, read from FleetStats at scrape time.

Registered next to the daemon's own collector (phase 2: `registry.register(FleetCollector(
member))`). Every labelled counter has all its label values from the start (value 0).
The alert rules in deploy/prometheus/forwarder-fleet-rules.yml compare these across members
(e.g. `forwarder_fleet_members` must be the same everywhere).
"""

from __future__ import annotations

from collections.abc import Iterable

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily, Metric
from prometheus_client.registry import Collector

from forwarder.fleet.member import FleetMember
from forwarder.fleet.stats import ACQUISITION_KINDS, HANDOVER_REASONS, LOSS_REASONS


class FleetCollector(Collector):
    """Thread-safe: reads plain fields only."""

    def __init__(self, member: FleetMember) -> None:
        self._member = member

    def collect(self) -> Iterable[Metric]:
        s = self._member.stats
        yield InfoMetricFamily(
            "forwarder_fleet_member",
            "This process's name in the fleet and its group.",
            value={"member": self._member.name, "group": self._member.config.group},
        )

        def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
            return GaugeMetricFamily(name, doc, value=value)

        yield gauge(
            "forwarder_fleet_members",
            "Live members of the group as this member last saw them (itself included).",
            s.members,
        )
        yield gauge(
            "forwarder_fleet_eligible_members",
            "Live members that take subscriptions (not draining).",
            s.eligible,
        )
        yield gauge(
            "forwarder_fleet_subscriptions",
            "Subscriptions this member was given to share with the group.",
            s.candidates,
        )
        yield gauge(
            "forwarder_owned_subscriptions", "Subscriptions whose lease this member holds.", s.owned
        )
        yield gauge(
            "forwarder_fleet_incoming_handovers",
            "Planned moves to this member under way (it connects as successor).",
            s.successor,
        )
        yield gauge(
            "forwarder_fleet_outgoing_handovers",
            "Planned moves away from this member under way.",
            s.moving,
        )
        yield gauge(
            "forwarder_fleet_disagreeing_members",
            "Live members that were given a different set of subscriptions than this one.",
            s.disagreeing,
        )
        yield gauge(
            "forwarder_fleet_draining", "1 while this member hands everything over.", s.draining
        )
        yield gauge(
            "forwarder_fleet_redis_ok",
            "1 when the last fleet round trip to Redis worked.",
            s.redis_ok,
        )

        def labelled(
            name: str, doc: str, label: str, values: dict[str, int], known: Iterable[str]
        ) -> CounterMetricFamily:
            family = CounterMetricFamily(name, doc, labels=(label,))
            for value in sorted(set(known) | set(values)):
                family.add_metric((value,), values.get(value, 0))
            return family

        yield labelled(
            "forwarder_handovers",
            "Planned moves completed (the successor connected before this member closed).",
            "reason",
            dict(s.handovers),
            HANDOVER_REASONS,
        )
        yield CounterMetricFamily(
            "forwarder_handovers_aborted",
            "Planned moves called off (the successor did not connect in time, or vanished).",
            value=s.handovers_aborted,
        )
        yield labelled(
            "forwarder_lease_losses",
            "Leases given up without a handover: 'deadline' (no renewal in time: Redis "
            "unreachable or the process paused), 'lost' (another member holds it, or Redis "
            "lost it).",
            "reason",
            dict(s.lease_losses),
            LOSS_REASONS,
        )
        yield labelled(
            "forwarder_lease_acquisitions",
            "Leases acquired, by what came before: 'new', 'failover' (the holder's lease ran "
            "out), 'released', 'reset' (Redis lost the fleet's state), 'handover'.",
            "kind",
            dict(s.acquisitions),
            ACQUISITION_KINDS,
        )
        yield CounterMetricFamily(
            "forwarder_fleet_epoch_changes",
            "Times this member saw Redis lose the fleet's state (restart without persistence).",
            value=s.epoch_changes,
        )
        yield labelled(
            "forwarder_fleet_round_failures",
            "Fleet round trips to Redis that failed, by error kind.",
            "kind",
            dict(s.round_failures),
            (),
        )
