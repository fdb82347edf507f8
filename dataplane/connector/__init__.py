"""The connector: dials edges outbound, checks each flow's grant and dials the backend,
only at addresses its checks allow."""
