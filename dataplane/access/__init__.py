"""The access decision, pure: application tables, access tokens, conditional access, flow grants,
the addresses a connector may dial, and ``admission.admit``, which every OPEN and every re-check
of a live flow goes through."""
