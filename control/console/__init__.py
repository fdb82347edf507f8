"""The operator web console, served by the control plane under ``/console``.

- ``routes``: the pages (GET) and the changes (POST), server-rendered Jinja2 templates
  (``templates/``) with htmx (vendored in ``static/``, no CDN) for partial updates; every
  page reads without JavaScript.
- ``security``: console sessions (cookie), the Origin / CSRF / role checks on every change,
  and the security headers.
- ``views``: what each page shows, read from the store; ``charts``: SVG charts drawn on the
  server; ``testaccess``: "test access", decided by the edges' own admission code.

People sign in with their user account (password + TOTP) and a console role (``admin``:
everything; ``reader``: sees everything, changes nothing: ``control.store.console``).
"""
