"""The sans-I/O protocol core: frames, events, the tunnel connection over a byte stream or QUIC
streams, per-flow credit, the frame reader and the QUIC engine interface. No sockets, no clocks."""
