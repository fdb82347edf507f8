"""The edge: admits every flow, picks a connector, makes its grant and splices the two tunnels."""
