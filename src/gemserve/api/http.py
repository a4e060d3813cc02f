"""uvicorn's HTTP/1.1 protocol, answering the requests it rejects itself as the API answers everything else.

A request line or header block that h11 cannot parse never reaches the application: uvicorn answers it with a
plain-text 400. Clients of the Gemini API expect a `google.rpc.Status` JSON body on every error, so this
protocol sends one, with the same status and connection handling.
"""

from __future__ import annotations

import json

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from gemserve.errors import ApiError


class StatusH11Protocol(H11Protocol):
    def send_400_response(self, msg: str) -> None:
        body = json.dumps(ApiError("INVALID_ARGUMENT", f"{msg} The request is not valid HTTP/1.1.").to_json())
        data = body.encode()
        headers = [(b"content-type", b"application/json; charset=UTF-8"),
                   (b"content-length", str(len(data)).encode()), (b"connection", b"close")]
        for event in (h11.Response(status_code=400, headers=headers, reason=b"Bad Request"), h11.Data(data=data),
                      h11.EndOfMessage()):
            self.transport.write(self.conn.send(event))
        self.transport.close()
