"""The edge: admits every flow, picks a connector, signs its grant and splices the two tunnels."""
