"""Who may talk to a pipeline: the sink's query token and CURVE keys for the data plane.

Two independent locks, both off unless the definition's ``security`` section asks:

- **Query token.** The sink's query port answers only requests that carry the
  pipeline's token. The token lives in a file readable by its owner alone
  (mode 600); the sink gets the file's *path* as a device property, never the
  token, because every Tango client can read device properties. Tokens are
  compared in constant time (:func:`token_matches`).
- **CURVE.** ZeroMQ's CURVE encrypts and authenticates the data plane. A key
  folder (``tangopipe keys FOLDER``) holds the pipeline's key pair and, in
  ``authorized/``, the public keys of further clients (e.g. a user's
  ``SinkClient``). :func:`use_curve` attaches the keys to a ZeroMQ context:
  every socket :mod:`pipelines.transport` binds on that context becomes a CURVE
  server, every socket it connects a CURVE client, and a ZAP handler admits only
  the pipeline's own key and the authorised ones (refusals counted and logged).
"""

from __future__ import annotations

import hmac
import logging
import os
import secrets
import shutil
import stat
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import zmq
from zmq.auth import create_certificates, load_certificate, load_certificates
from zmq.auth.thread import ThreadAuthenticator
from zmq.utils.monitor import recv_monitor_message

TOKEN_ENV = "TANGOPIPE_QUERY_TOKEN"
TOKEN_FILE_ENV = "TANGOPIPE_QUERY_TOKEN_FILE"
MIN_TOKEN_CHARS = 16
PIPELINE_KEY = "pipeline"  # FOLDER/pipeline.key, FOLDER/pipeline.key_secret
AUTHORIZED = "authorized"  # FOLDER/authorized/*.key: further clients let in
CLIENTS = "clients"  # FOLDER/clients/NAME.key(_secret): client pairs made by `tangopipe keys --client`

HANDSHAKE_FAILED = zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL  # not AUTH: ZAP counts it

log = logging.getLogger("tangopipe.security")


class SecurityError(ValueError):
    """A token or key file that cannot be used; the message says how to fix it."""


# -- files only their owner may read ------------------------------------------------------
def check_private(path: str | os.PathLike, what: str) -> Path:
    """``path`` as a Path if it is a regular file that group and others cannot read or write."""
    path = Path(path)
    try:
        info = path.stat()
    except FileNotFoundError:
        raise SecurityError(f"{what} {path}: no such file") from None
    except OSError as exc:
        raise SecurityError(f"{what} {path}: cannot be read ({exc.strerror})") from None
    if not stat.S_ISREG(info.st_mode):
        raise SecurityError(f"{what} {path}: not a regular file")
    if info.st_mode & 0o077:
        raise SecurityError(
            f"{what} {path} is open to group or others (mode {stat.S_IMODE(info.st_mode):03o}); "
            f"make it private: chmod 600 {path}"
        )
    return path


def _write_private(path: Path, text: str) -> None:
    """Create ``path`` with mode 600 from the start (never readable by others, not even briefly)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write(text)


# -- query token --------------------------------------------------------------------------
def read_token_file(path: str | os.PathLike) -> str:
    """The token in ``path`` (its first non-empty line); SecurityError if the file is not
    private or the token is too short to resist guessing."""
    if not os.path.exists(path):
        raise SecurityError(f"query token file {path}: no such file; make one with: tangopipe token {path}")
    path = check_private(path, "query token file")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise SecurityError(f"query token file {path}: cannot be read ({exc})") from None
    token = next((line.strip() for line in lines if line.strip()), "")
    if len(token) < MIN_TOKEN_CHARS:
        raise SecurityError(
            f"query token file {path}: the token has {len(token)} characters, at least {MIN_TOKEN_CHARS} "
            f"are needed; make a new one with: tangopipe token --force {path}"
        )
    return token


def write_token_file(path: str | os.PathLike, force: bool = False) -> bool:
    """Put a new random token in ``path`` (mode 600); False if the file exists and not ``force``."""
    path = Path(path)
    if path.exists() and not force:
        return False
    path.parent.mkdir(parents=True, exist_ok=True)
    path.unlink(missing_ok=True)
    _write_private(path, secrets.token_urlsafe(32) + "\n")
    return True


def client_token(token: str | None = None, token_file: str | os.PathLike | None = None) -> str | None:
    """The token a client sends: ``token``, else the file ``token_file``, else the environment
    (``TANGOPIPE_QUERY_TOKEN``, then the file named by ``TANGOPIPE_QUERY_TOKEN_FILE``); None: no token."""
    if token:
        return token
    if token_file:
        return read_token_file(token_file)
    if os.environ.get(TOKEN_ENV):
        return os.environ[TOKEN_ENV].strip()
    if os.environ.get(TOKEN_FILE_ENV):
        return read_token_file(os.environ[TOKEN_FILE_ENV])
    return None


def token_matches(given: Any, token: str) -> bool:
    """True if ``given`` is ``token``, compared in constant time (no timing hints for guessing)."""
    if not isinstance(given, str) or not given:
        return False
    return hmac.compare_digest(given.encode("utf-8"), token.encode("utf-8"))


class RefusalLog:
    """Counts refused requests per reason and logs each reason at most every ``period_s``,
    so a client hammering with a wrong key or token cannot flood the log."""

    def __init__(self, logger: logging.Logger, where: str, period_s: float = 10.0):
        self.logger = logger
        self.where = where
        self.period_s = period_s
        self.by_reason: dict[str, int] = {}
        self.last = ""
        self._last_logged: dict[str, float] = {}
        self._lock = threading.Lock()

    @property
    def total(self) -> int:
        return sum(self.by_reason.values())

    def record(self, reason: str, detail: str) -> None:
        with self._lock:
            count = self.by_reason[reason] = self.by_reason.get(reason, 0) + 1
            self.last = f"{reason}: {detail}"
            now = time.monotonic()
            due = now - self._last_logged.get(reason, -1e9) >= self.period_s
            if due:
                self._last_logged[reason] = now
        if due:
            self.logger.warning("%s: refused (%s, %d so far): %s", self.where, reason, count, detail)


# -- CURVE keys ---------------------------------------------------------------------------
@dataclass(frozen=True)
class CurveKeys:
    """A key pair and the server key it trusts, as z85 bytes; applied to sockets before bind/connect."""

    public: bytes
    secret: bytes
    server_public: bytes

    def make_server(self, sock: zmq.Socket) -> None:
        sock.curve_secretkey = self.secret
        sock.curve_publickey = self.public
        sock.curve_server = True

    def make_client(self, sock: zmq.Socket) -> None:
        sock.curve_serverkey = self.server_public
        sock.curve_publickey = self.public
        sock.curve_secretkey = self.secret


def _load_pair(secret_file: Path) -> tuple[bytes, bytes]:
    check_private(secret_file, "CURVE secret key")
    try:
        public, secret = load_certificate(secret_file)
    except (OSError, ValueError) as exc:
        raise SecurityError(f"CURVE secret key {secret_file}: not a key file ({exc})") from None
    if not secret:
        raise SecurityError(f"CURVE secret key {secret_file}: holds no secret key; make keys with tangopipe keys")
    return public, secret


def load_keys(folder: str | os.PathLike, client: str | None = None) -> CurveKeys:
    """The keys in ``folder`` (see :func:`create_keys`): the pipeline's own pair, or with
    ``client`` the pair ``clients/CLIENT.key_secret``; the server key is the pipeline's public key."""
    folder = Path(folder)
    if not folder.is_dir():
        raise SecurityError(f"CURVE key folder {folder}: no such folder; make one with: tangopipe keys {folder}")
    public_file = folder / f"{PIPELINE_KEY}.key"
    try:
        server_public, _ = load_certificate(public_file)
    except (OSError, ValueError):
        raise SecurityError(
            f"CURVE key folder {folder}: no pipeline key {public_file.name}; make one with: tangopipe keys {folder}"
        ) from None
    if client:
        public, secret = _load_pair(folder / CLIENTS / f"{client}.key_secret")
    else:
        public, secret = _load_pair(folder / f"{PIPELINE_KEY}.key_secret")
        if public != server_public:
            raise SecurityError(f"CURVE key folder {folder}: {PIPELINE_KEY}.key and {PIPELINE_KEY}.key_secret "
                                "are not one pair; make new keys with: tangopipe keys --force " + str(folder))
    return CurveKeys(public, secret, server_public)


def check_key_folder(folder: str | os.PathLike) -> None:
    """SecurityError naming what is wrong with a pipeline's key folder (missing, open to others...)."""
    load_keys(folder)
    authorized = Path(folder) / AUTHORIZED
    if authorized.exists() and not authorized.is_dir():
        raise SecurityError(f"CURVE key folder {folder}: {authorized} must be a folder of public keys (*.key)")


def _new_pair(folder: Path, name: str) -> None:
    """Make NAME.key and NAME.key_secret in ``folder`` (secret mode 600), replacing old ones."""
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    staging = Path(tempfile.mkdtemp(dir=folder, prefix=".new-keys-"))  # mode 700: private while written
    try:
        public, secret = create_certificates(staging, name)
        os.chmod(secret, 0o600)
        os.chmod(public, 0o644)
        os.replace(secret, folder / f"{name}.key_secret")
        os.replace(public, folder / f"{name}.key")
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def create_keys(folder: str | os.PathLike, client: str | None = None, force: bool = False) -> list[Path]:
    """Make a pipeline's key folder, or with ``client`` a client pair authorised to connect.

    Layout: ``pipeline.key`` / ``pipeline.key_secret`` (the pipeline's pair, used by every
    server and every internal link), ``authorized/`` (public keys of further clients),
    ``clients/NAME.key`` / ``NAME.key_secret`` (pairs made here for clients). Returns the
    files written; an existing pair is kept unless ``force``.
    """
    folder = Path(folder)
    written: list[Path] = []
    if client:
        if not client.replace("-", "").replace("_", "").isalnum():
            raise SecurityError(f"client name {client!r}: use letters, digits, - and _")
        load_keys(folder)  # the pipeline's keys first: a client needs its public key
        target = folder / CLIENTS
        if force or not (target / f"{client}.key_secret").exists():
            _new_pair(target, client)
        (folder / AUTHORIZED).mkdir(exist_ok=True)
        staged = folder / AUTHORIZED / f".{client}.key.new"  # not *.key: never read half written
        shutil.copyfile(target / f"{client}.key", staged)
        os.replace(staged, folder / AUTHORIZED / f"{client}.key")
        written += [target / f"{client}.key", target / f"{client}.key_secret", folder / AUTHORIZED / f"{client}.key"]
        return written
    if force or not (folder / f"{PIPELINE_KEY}.key_secret").exists():
        _new_pair(folder, PIPELINE_KEY)
        written += [folder / f"{PIPELINE_KEY}.key", folder / f"{PIPELINE_KEY}.key_secret"]
    (folder / AUTHORIZED).mkdir(exist_ok=True)
    return written


class CurveGuard:
    """The CURVE keys of one ZeroMQ context and its ZAP handler: only the pipeline's own key
    and the keys in ``authorized/`` get in. Refusals are counted (``CurveRefused``) and logged."""

    RELOAD_S = 1.0  # an unknown key rereads authorized/ when it changed, else at most this often

    def __init__(self, context: zmq.Context, folder: Path):
        self.context = context
        self.folder = folder
        self.keys = load_keys(folder)
        self.allowed: frozenset[bytes] = frozenset()
        self._reloaded = 0.0
        self._seen_mtime = 0
        self.reload()
        self.refusals = RefusalLog(log, f"CURVE ({folder})")
        self.authenticator = ThreadAuthenticator(context, log=logging.getLogger("tangopipe.security.zap"))
        self.authenticator.configure_curve_callback("*", self)
        self.authenticator.start()
        self._new_monitors: list[tuple[zmq.Socket, str]] = []
        self._monitor_lock = threading.Lock()
        self._stopping = threading.Event()
        self._watcher: threading.Thread | None = None

    def watch(self, sock: zmq.Socket, where: str) -> None:
        """Count the clients that fail the handshake on server socket ``sock`` (at ``where``).

        ZAP hears only from clients that speak CURVE; one without CURVE (plain ZeroMQ) or
        with a wrong server key fails earlier, seen only by a socket monitor. Call in the
        thread that owns ``sock``; the monitor is read in this guard's own thread.
        """
        monitor = sock.get_monitor_socket(HANDSHAKE_FAILED | zmq.EVENT_MONITOR_STOPPED)
        with self._monitor_lock:
            self._new_monitors.append((monitor, where))
            if self._watcher is None:
                self._watcher = threading.Thread(target=self._watch_loop, name="curve-watch", daemon=True)
                self._watcher.start()

    def _watch_loop(self) -> None:
        poller = zmq.Poller()
        watched: dict[zmq.Socket, str] = {}
        while not self._stopping.is_set():
            with self._monitor_lock:
                new, self._new_monitors = self._new_monitors, []
            for monitor, where in new:
                poller.register(monitor, zmq.POLLIN)
                watched[monitor] = where
            for monitor, _ in poller.poll(200):
                event = recv_monitor_message(monitor)
                if event["event"] == zmq.EVENT_MONITOR_STOPPED:  # the socket was closed
                    poller.unregister(monitor)
                    monitor.close(0)
                    del watched[monitor]
                else:  # which event libzmq reports for a plain client depends on timing
                    self.refusals.record(
                        "handshake_failed",
                        f"a client failed the CURVE handshake on {watched[monitor]}: it speaks plain ZeroMQ "
                        f"or has a wrong server key; give it keys (tangopipe keys {self.folder} --client NAME)",
                    )
        with self._monitor_lock:
            new, self._new_monitors = self._new_monitors, []
        for monitor in [*watched, *(mon for mon, _ in new)]:
            monitor.close(0)

    def reload(self) -> None:
        """Read the authorised public keys again (removing a key takes effect here)."""
        allowed = {self.keys.public}
        authorized = self.folder / AUTHORIZED
        self._seen_mtime = self._mtime()
        if authorized.is_dir():
            try:
                allowed.update(load_certificates(authorized))
            except (OSError, ValueError) as exc:
                log.error("CURVE: cannot read the authorised keys in %s: %s", authorized, exc)
        self.allowed = frozenset(allowed)
        self._reloaded = time.monotonic()

    def _mtime(self) -> int:
        try:
            return os.stat(self.folder / AUTHORIZED).st_mtime_ns
        except OSError:
            return 0

    def callback(self, domain: str, key: bytes) -> bool:
        """ZAP: may the client with public key ``key`` (z85) connect? Runs in the ZAP thread."""
        if key in self.allowed:
            return True
        if self._mtime() != self._seen_mtime or time.monotonic() - self._reloaded >= self.RELOAD_S:
            self.reload()
            if key in self.allowed:
                return True
        self.refusals.record(
            "unauthorised_key",
            f"a client with public key {key.decode('ascii', 'replace')} is not authorised; to let it in, "
            f"put its public key file (NAME.key) in {self.folder / AUTHORIZED}",
        )
        return False

    def stop(self) -> None:
        self._stopping.set()
        if self._watcher is not None:
            self._watcher.join(2.0)
        self.authenticator.stop()


_GUARDS: dict[zmq.Context, CurveGuard] = {}
_LOCK = threading.Lock()


def use_curve(
    folder: str | os.PathLike | None, context: zmq.Context | None = None, source: str = "property CurveKeys"
) -> CurveGuard | None:
    """Make the sockets :mod:`pipelines.transport` binds and connects on ``context`` (default:
    the process's shared one) use CURVE with the keys in ``folder``; empty/None turns it off.

    Call before the engines bind. Calling again rereads the keys (a device's Init).
    SecurityError (naming ``source``) if the folder cannot be used.
    """
    context = context or zmq.Context.instance()
    with _LOCK:
        guard = _GUARDS.get(context)
        if not folder:
            if guard is not None:
                guard.stop()
                del _GUARDS[context]
            return None
        folder = Path(folder)
        try:
            check_key_folder(folder)
        except SecurityError as exc:
            raise SecurityError(f"{source}: {exc}") from None
        if guard is None:
            guard = _GUARDS[context] = CurveGuard(context, folder)
        else:
            guard.folder, guard.keys = folder, load_keys(folder)
            guard.reload()
        return guard


def curve_guard(context: zmq.Context) -> CurveGuard | None:
    """The guard of a context using CURVE (None: plain ZeroMQ)."""
    return _GUARDS.get(context)


def curve_of(context: zmq.Context) -> CurveKeys | None:
    """The CURVE keys sockets of ``context`` use (None: plain ZeroMQ)."""
    guard = curve_guard(context)
    return guard.keys if guard is not None else None


def curve_counters(context: zmq.Context | None = None) -> dict[str, int]:
    """``{"CurveRefused": n}`` for a context using CURVE, else nothing."""
    guard = curve_guard(context or zmq.Context.instance())
    return {"CurveRefused": guard.refusals.total} if guard is not None else {}
