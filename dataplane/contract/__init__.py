"""What the control plane and the nodes exchange, without I/O: the configuration snapshot and
client profile, applications and segments, connector groups' dial lists, traffic records, node request tokens."""
