"""The data plane: edges, connectors and client agents, in layers (see the README's Layout table)."""
