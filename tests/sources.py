"""Requests to a test's control plane from a chosen local source address (``127.0.0.2``,
``127.0.0.3``, ...: the whole 127/8 reaches a listener on 127.0.0.1), so the control plane
sees distinct clients, as its per-source limits count them.

``call_from(control, source, method, path, body)`` → (status, decoded JSON body or None, headers).
"""

from __future__ import annotations

import http.client
import json
import ssl
import urllib.parse
from typing import Any

from controlplane import Control


def call_from(control: Control, source: str, method: str, path: str, body: Any = None,
              timeout: float = 60) -> tuple[int, Any, http.client.HTTPMessage]:
    url = urllib.parse.urlsplit(control.url)
    if url.scheme == "https":
        context = getattr(control, "ssl_context", None) or ssl.create_default_context(
            cafile=str(control.data_dir / "ca" / "ca.pem"))
        conn: http.client.HTTPConnection = http.client.HTTPSConnection(
            url.hostname, url.port, timeout=timeout, source_address=(source, 0), context=context)
    else:
        conn = http.client.HTTPConnection(url.hostname, url.port, timeout=timeout, source_address=(source, 0))
    try:
        data = None if body is None else json.dumps(body).encode()
        conn.request(method, path, body=data, headers={"Content-Type": "application/json"} if data else {})
        response = conn.getresponse()
        payload = response.read()
        return response.status, json.loads(payload) if payload else None, response.headers
    finally:
        conn.close()
