"""Many nodes: a registry of nodes and of which node holds which call, the node-to-node proxy,
and the supervisor of worker processes (README "Many nodes").

A call lives on the node that holds its peer connection and never moves; any node answers any
request by passing session-scoped ones to the owner. Imports nothing from the server package.
"""
