"""Fleet mode: several forwarder processes share the subscriptions through Redis.

Modules, in the order the data flows (design and the reasons: docs/fleet.md):

    config      [fleet] settings (FleetConfig), parsed by forwarder.config
    keys        the Redis key names and the lease token format
    assignment  rendezvous hashing of subscriptions over the eligible members (pure)
    protocol    the requests a member makes and the replies the store gives (plain data)
    scripts     the Lua scripts: heartbeat, renew, acquire-or-claim, handover, release
    store       RedisFleetStore: runs the scripts, translates redis-py errors to FleetError
    member      FleetMember: the sans-I/O rules (leases, handover, deadlines) of one member
    runner      FleetThread: the one thread doing the Redis round trips on an interval
    metrics     FleetCollector: forwarder_fleet_* Prometheus families
    cli         `forwarder fleet status` and `forwarder fleet drain`

Nothing here imports the daemon or the subscriber: the daemon wires a FleetMember in (see
docs/fleet.md, "What phase 2 wires").
"""
