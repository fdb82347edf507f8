"""A node's link to the control plane: the one HTTP client, configuration, heartbeats, renewal,
traffic shipping, registration, request signing and the snapshot cache."""
