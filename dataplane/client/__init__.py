"""The client agent: signs the user in, follows the forwarding profile, captures local traffic
and carries it over one tunnel (the front ends see the agent as a ``FlowOpener``)."""
