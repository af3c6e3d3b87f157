"""The wire auditor (`mtls-sidecar audit`): a node agent that classifies the TCP connections
crossing the node from their first bytes and counts their bytes from conntrack.

Pure parts: `classify` (first bytes -> class), `netlink` (NFLOG messages, IP/TCP headers,
conntrack entries), `tracker` (packets and conntrack snapshots in, verdicts out), `workloads`
(IP -> workload attribution, bounded labels). I/O: `agent` (nftables rules, the NFLOG socket,
the conntrack poll, the admin port) and `cli`.
"""
