"""Asyncio adapters that carry tunnels (TLS/TCP, QUIC, through HTTP CONNECT proxies), the tunnel
supervisor of the nodes that dial edges, and local sockets bridged to tunnel flows."""
