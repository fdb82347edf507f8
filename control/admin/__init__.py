"""``ferryman admin``: the control plane's admin REST API from the command line.

Every command is one or a few calls to ``/v1/...`` (``control.api``) over HTTP; nothing here
touches the database. Output is an aligned table for people, or with ``--json`` the API's
own JSON for scripts. ``main(argv)`` is the entry point (``dataplane.cli`` calls it for
``ferryman admin ...``).

- ``client``: where it connects (``--control``), with which key (``--key-file`` / ``--key``),
  and the HTTP client; every failure is an ``AdminError`` with one clear message.
- ``output``: tables, ``key: value`` lines, times, sizes; ``Ctx.show`` prints the human form
  or the JSON.
- ``args``: argument types (segments, durations, times).
- ``commands``: commands as data (``Command``, ``Group``) and the parsers built from them.
- Commands per resource group: ``apps`` (apps, segments, dns, profile), ``nodes`` (groups,
  connectors, edges, certs, tokens, keys), ``access`` (assignments, locations, policies),
  ``identity`` (users, user-groups, devices, sessions), ``logs`` (logs, discovery, audit),
  ``apply`` (make the applications match a file; the planner).
- ``cli``: the global options, the parser (``build_parser``) and ``main``.

Exit status: 0 done, 1 refused (by the API or by local validation), 2 usage error (bad
flags, no admin key, unusable settings).
"""

from .cli import main

__all__ = ["main"]
