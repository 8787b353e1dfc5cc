#!/usr/bin/env python3
"""A real SMTP server (aiosmtpd) for the integration tests.

Every accepted message is stored in --dir as NNNNNN.eml (the DATA, as received) with
NNNNNN.json beside it ({"mail_from", "rcpt_tos", "auth"}). The reply to DATA can be changed
while it runs: when --dir/reply exists, its first line is sent instead of accepting (for
example "451 4.3.0 Try again later" or "550 5.1.1 No such user"), and the message is not stored.

When --dir/delay exists, its number of seconds passes before DATA is answered.
A recipient whose address starts with "refused" is refused with "550 5.1.1 No such user", a
sender whose address does with "550 5.7.1 Sender rejected".
The server offers PIPELINING (RFC 2920) unless --no-pipelining is given; with --no-ehlo it
answers EHLO with 502 (an old server: HELO only, no extensions).
Every DATA answer is appended to --dir/attempts.log as "<unix time> <reply>".
A message whose final dot came in the same read as the next MAIL FROM (a client joining the
next envelope to the end of a message, RFC 2920 3.1) adds a line to --dir/joined.log.

Connection faults: when --dir/fault exists, its first line is one of
  drop-mid-data [N]   after DATA the server answers 354, reads the first line of the message,
                      then closes the TCP connection without a reply (nothing is stored);
  drop-after-dot [N]  the server reads the whole message up to and including the final "."
                      line, then closes the connection without a reply (nothing is stored).
N (optional) is how many transactions to drop: each drop rewrites the file with N-1 and the
file is deleted when that reaches 0; without N every transaction is dropped while the file
exists. A fault comes before --dir/reply; --dir/delay still passes before a drop-after-dot.
Each drop is appended to attempts.log as "<unix time> DROP mid-data" / "DROP after-dot".
The close is transport.abort(): a FIN when the server has read all the client sent (a client
sees EOF), an RST when unread bytes remain in the socket (a client may see a reset instead).
Options: --port, --dir, --blackhole (accept connections and never answer), --tls-cert/--tls-key (offers STARTTLS; with --implicit-tls the
whole session is TLS), --auth USER:PASS (AUTH PLAIN/LOGIN required; XOAUTH2 with PASS as the
bearer token is accepted too, and a wrong token gets the error challenge real servers send),
--oauth-introspect URL (with --auth USER:...: an XOAUTH2 token for USER is accepted when the RFC 7662
introspection endpoint URL answers {"active": true} for it; tokens are not compared with PASS). Prints READY when
listening, then runs until killed. Started again on a folder with messages, it numbers new
ones after them.
"""
import argparse
import asyncio
import base64
import json
import os
import signal
import ssl
import sys
import socket
import threading
import time

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, AuthResult, LoginPassword


class Dropped(Exception):
    """Raised by handle_DATA after it closed the connection: no reply must follow."""


class Store:
    def __init__(self, directory, pipelining=True, oauth=None, ehlo=True, introspect=None):
        self.introspect = introspect
        self.dir = directory
        self.ehlo = ehlo
        self.pipelining = pipelining
        self.oauth = oauth
        self.lock = threading.Lock()
        os.makedirs(directory, exist_ok=True)
        # Go on after the messages of an earlier run in the same folder (a restart).
        numbers = [int(n[:6]) for n in os.listdir(directory) if n[:6].isdigit()]
        self.count = max(numbers, default=0)

    def take_fault(self, kind):
        """If --dir/fault asks for `kind`, counts one use (rewriting or deleting the file) and
        returns True. No await inside: connections share one event loop, so this is atomic."""
        path = os.path.join(self.dir, "fault")
        with self.lock:
            try:
                with open(path) as f:
                    words = f.readline().split()
            except FileNotFoundError:
                return False
            if not words or words[0] != kind:
                return False
            if len(words) > 1:
                left = int(words[1]) - 1
                if left < 0:
                    os.remove(path)
                    return False
                if left == 0:
                    os.remove(path)
                else:
                    with open(path + ".tmp", "w") as f:
                        f.write("%s %d\n" % (kind, left))
                    os.rename(path + ".tmp", path)
            return True

    def log_attempt(self, reply):
        with self.lock:
            with open(os.path.join(self.dir, "attempts.log"), "a") as f:
                f.write("%.3f %s\n" % (time.time(), reply))

    async def handle_EHLO(self, server, session, envelope, hostname, responses):
        if not self.ehlo:
            return ["502 5.5.1 EHLO not implemented"]
        session.host_name = hostname
        if self.pipelining:
            # aiosmtpd reads commands one by one, so it serves pipelined clients as they are.
            responses.insert(len(responses) - 1, "250-PIPELINING")
        return responses

    async def auth_XOAUTH2(self, server, args):
        """RFC-less but documented by Google and Microsoft: one base64 initial response
        "user=U\\x01auth=Bearer T\\x01\\x01"; on failure a 334 challenge with a JSON error,
        answered by an empty line, then 535."""
        try:
            given = base64.b64decode(args[1]).decode() if len(args) > 1 else ""
        except Exception:
            given = ""
        if self.oauth and given == "user=%s\x01auth=Bearer %s\x01\x01" % self.oauth:
            return AuthResult(success=True, auth_data=LoginPassword(self.oauth[0].encode(), b""))
        if self.oauth and self.introspect:
            prefix = "user=%s\x01auth=Bearer " % self.oauth[0]
            if given.startswith(prefix) and given.endswith("\x01\x01"):
                token = given[len(prefix):-2]
                loop = asyncio.get_running_loop()
                if await loop.run_in_executor(None, self.active, token):
                    return AuthResult(
                        success=True, auth_data=LoginPassword(self.oauth[0].encode(), b"")
                    )
        error = base64.b64encode(b'{"status":"401","schemes":"bearer"}').decode()
        await server.push("334 " + error)
        await server._reader.readline()
        return AuthResult(
            success=False, handled=False, message="535 5.7.8 Authentication credentials invalid"
        )

    def active(self, token):
        """RFC 7662: POST token=... to the introspection endpoint; active when it says so."""
        import urllib.parse
        import urllib.request

        body = urllib.parse.urlencode({"token": token}).encode()
        try:
            with urllib.request.urlopen(self.introspect, data=body, timeout=5) as r:
                return json.loads(r.read()).get("active") is True
        except Exception:
            return False

    async def handle_MAIL(self, server, session, envelope, address, mail_options):
        if address.lower().startswith("refused"):
            return "550 5.7.1 Sender rejected"
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return "250 OK"

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        if address.lower().startswith("refused"):
            return "550 5.1.1 No such user"
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server, session, envelope):
        # Before any await: what the client sent after the final dot, read with it.
        if bytes(server._reader._buffer).startswith(b"MAIL FROM"):
            with self.lock:
                with open(os.path.join(self.dir, "joined.log"), "a") as f:
                    f.write("%.3f\n" % time.time())
        delay_file = os.path.join(self.dir, "delay")
        if os.path.exists(delay_file):
            with open(delay_file) as f:
                await asyncio.sleep(float(f.read().strip() or "0"))
        if self.take_fault("drop-after-dot"):
            # The whole message and its final dot are read: close without a word.
            server.transport.abort()
            self.log_attempt("DROP after-dot")
            raise Dropped()
        reply_file = os.path.join(self.dir, "reply")
        if os.path.exists(reply_file):
            with open(reply_file) as f:
                line = f.readline().strip()
            if line:
                self.log_attempt(line)
                return line
        with self.lock:
            self.count += 1
            n = self.count
        base = os.path.join(self.dir, "%06d" % n)
        meta = {
            "mail_from": envelope.mail_from,
            "rcpt_tos": list(envelope.rcpt_tos),
            "auth": session.authenticated,
        }
        with open(base + ".eml.tmp", "wb") as f:
            f.write(envelope.original_content or envelope.content)
        with open(base + ".json", "w") as f:
            json.dump(meta, f)
        os.rename(base + ".eml.tmp", base + ".eml")
        reply = "250 2.0.0 Ok: queued as TEST%06d" % n
        self.log_attempt(reply)
        return reply


class FaultySMTP(SMTP):
    """aiosmtpd's SMTP, able to drop the connection in the middle of DATA (see the module
    docstring). Pipelined input is fine: everything is read line by line from one buffer."""

    async def smtp_DATA(self, arg):
        ready = (
            self.session.host_name
            and not (self._auth_required and not self.session.authenticated)
            and self.envelope.rcpt_tos
            and not arg
        )
        if ready and self.event_handler.take_fault("drop-mid-data"):
            await self.push("354 End data with <CR><LF>.<CR><LF>")
            try:
                await self._reader.readuntil(b"\r\n")
            except (asyncio.IncompleteReadError, asyncio.LimitOverrunError):
                pass
            self.transport.abort()
            self.event_handler.log_attempt("DROP mid-data")
            return
        try:
            await super().smtp_DATA(arg)
        except Dropped:
            pass


class FaultyController(Controller):
    def factory(self):
        return FaultySMTP(self.handler, **self.SMTP_kwargs)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--dir", required=True)
    p.add_argument("--tls-cert")
    p.add_argument("--tls-key")
    p.add_argument("--implicit-tls", action="store_true")
    p.add_argument("--auth")
    p.add_argument("--oauth-introspect")
    p.add_argument("--no-pipelining", action="store_true")
    p.add_argument("--no-ehlo", action="store_true")
    p.add_argument("--blackhole", action="store_true", help="accept TCP connections, never answer")
    a = p.parse_args()

    if a.blackhole:
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", a.port))
        sock.listen(128)
        print("READY", flush=True)
        held = []
        while True:
            conn, _ = sock.accept()
            held.append(conn)

    kwargs = {}
    context = None
    if a.tls_cert:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(a.tls_cert, a.tls_key)
    if context and a.implicit_tls:
        kwargs["ssl_context"] = context
    elif context:
        kwargs["tls_context"] = context
        kwargs["require_starttls"] = True
    if a.auth:
        user, password = a.auth.split(":", 1)

        def authenticator(server, session, envelope, mechanism, auth_data):
            ok = (
                isinstance(auth_data, LoginPassword)
                and auth_data.login.decode() == user
                and auth_data.password.decode() == password
            )
            if ok:
                return AuthResult(success=True)
            return AuthResult(
                success=False, handled=False, message="535 5.7.8 Authentication credentials invalid"
            )

        kwargs["authenticator"] = authenticator
        kwargs["auth_required"] = True
        # Implicit TLS is encrypted from the start, but aiosmtpd only counts STARTTLS.
        kwargs["auth_require_tls"] = bool(context) and not a.implicit_tls

    controller = FaultyController(
        Store(
            a.dir,
            pipelining=not a.no_pipelining,
            oauth=tuple(a.auth.split(":", 1)) if a.auth else None,
            ehlo=not a.no_ehlo,
            introspect=a.oauth_introspect,
        ),
        hostname="127.0.0.1", port=a.port, server_hostname="localhost", **kwargs
    )
    controller.start()
    print("READY", flush=True)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    stop.wait()
    controller.stop()


if __name__ == "__main__":
    main()
