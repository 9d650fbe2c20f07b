"""How the gateway reaches a Kubernetes API server: in-cluster service account, or a kubeconfig file.

A gateway that runs outside the cluster whose pods it routes to — the usual case when the fleet spans
three providers, each with its own cluster — authenticates the way ``kubectl`` does: the kubeconfig's
context (its ``current-context`` unless one is named) gives the cluster (``server``, the CA as
``certificate-authority-data`` or a ``certificate-authority`` file, or ``insecure-skip-tls-verify``) and
the user (a bearer ``token`` or ``tokenFile``, or a client certificate and key, as data or files; file
paths are relative to the kubeconfig's folder, as kubectl reads them). Credential plugins (``exec``,
``auth-provider``) are refused with a clear error rather than half-supported: give the gateway a service
account token (``kubectl create token``) or a client certificate instead.

Inside a pod, the service account's token and CA and ``KUBERNETES_SERVICE_HOST``/``PORT`` are used, as
before. Everything is read once, when the pool's source is built — except token files, which are re-read
on every request because bound service-account tokens rotate.
"""

from __future__ import annotations

import base64
import binascii
import os
import ssl
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from skyfabric.core.errors import ConfigError, DiscoveryError
from skyfabric.core.fleet import SERVICE_ACCOUNT_CA, DiscoverySource


@dataclass(frozen=True, slots=True)
class KubeAccess:
    """Where the API server is and how to authenticate to it."""

    api: str  # base URL, e.g. https://10.96.0.1:443
    ssl_context: ssl.SSLContext | None  # None for plain http (tests, kubectl proxy)
    token: str | None = None  # a static bearer token (kubeconfig `token`)
    token_file: str | None = None  # re-read per request

    def bearer(self) -> str | None:
        """The bearer token to send now, if any."""
        if self.token_file:
            try:
                return Path(self.token_file).read_text().strip()
            except OSError as exc:
                raise DiscoveryError(f"cannot read token file {self.token_file}: {exc.strerror}") from None
        return self.token


def _host_port(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def access_for(spec: DiscoverySource, environ: Mapping[str, str] | None = None) -> KubeAccess:
    """The API access a ``kubernetes`` discovery block asks for (kubeconfig, else in-cluster)."""
    env = os.environ if environ is None else environ
    if spec.kubeconfig:
        access = from_kubeconfig(Path(spec.kubeconfig).expanduser(), spec.context, ca_file=spec.ca_file)
        token_file = spec.token_file if "token_file" in spec.model_fields_set else access.token_file
        server = spec.api or access.api
        tls = access.ssl_context if server.startswith("https://") else None
        return KubeAccess(server, tls, access.token, token_file)
    api = spec.api
    if api is None:
        host, port = env.get("KUBERNETES_SERVICE_HOST"), env.get("KUBERNETES_SERVICE_PORT", "443")
        if not host:
            raise ConfigError(
                f"discovery of service {spec.service!r}: not running in a Kubernetes pod "
                "(no KUBERNETES_SERVICE_HOST): set `kubeconfig` or `api`"
            )
        api = f"https://{_host_port(host, int(port))}"
    context = None
    if api.startswith("https://"):
        ca = spec.ca_file or (SERVICE_ACCOUNT_CA if Path(SERVICE_ACCOUNT_CA).exists() else None)
        context = _tls_context(cafile=ca)
    return KubeAccess(api, context, None, spec.token_file)


def _tls_context(*, cafile: str | None = None, cadata: str | None = None) -> ssl.SSLContext:
    try:
        return ssl.create_default_context(cafile=cafile, cadata=cadata)
    except OSError as exc:
        raise ConfigError(f"discovery: cannot read CA file {cafile}: {exc.strerror}") from None
    except ssl.SSLError as exc:
        raise ConfigError(f"discovery: the cluster CA is not a valid certificate: {exc}") from None


def _b64(value: Any, what: str) -> bytes:
    try:
        return base64.b64decode(str(value), validate=True)
    except (binascii.Error, ValueError):
        raise ConfigError(f"kubeconfig: {what} is not base64") from None


def _load_cert_chain(context: ssl.SSLContext, cert: bytes, key: bytes) -> None:
    """``load_cert_chain`` reads files only: write both to a private temporary folder, load, delete."""
    with tempfile.TemporaryDirectory(prefix="skyfabric-kube-") as tmp:
        cert_path, key_path = Path(tmp) / "client.crt", Path(tmp) / "client.key"
        for path, data in ((cert_path, cert), (key_path, key)):
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(data)
        try:
            context.load_cert_chain(str(cert_path), str(key_path))
        except ssl.SSLError as exc:
            raise ConfigError(f"kubeconfig: the client certificate or key is not valid: {exc}") from None


def _named(entries: Any, name: str, kind: str, path: Path) -> dict[str, Any]:
    for entry in entries or []:
        if isinstance(entry, dict) and entry.get("name") == name:
            body = entry.get(kind)
            if isinstance(body, dict):
                return body
            raise ConfigError(f"{path}: {kind} {name!r} has no `{kind}` section")
    raise ConfigError(f"{path}: no {kind} named {name!r}")


def from_kubeconfig(path: Path, context_name: str | None = None, *, ca_file: str | None = None) -> KubeAccess:
    """The access a kubeconfig's context (default: its ``current-context``) describes.

    ``ca_file`` (the pool's own) replaces the cluster's CA.
    """
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise ConfigError(f"cannot read kubeconfig {path}: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"kubeconfig {path} is not YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"kubeconfig {path}: not a mapping")
    name = context_name or data.get("current-context")
    if not name:
        raise ConfigError(f"kubeconfig {path}: no current-context, and the pool names no `context`")
    context = _named(data.get("contexts"), str(name), "context", path)
    cluster = _named(data.get("clusters"), str(context.get("cluster")), "cluster", path)
    user_name = context.get("user")
    user = _named(data.get("users"), str(user_name), "user", path) if user_name else {}
    here = path.parent

    def file(value: Any) -> str:
        return str(here / str(value)) if not Path(str(value)).is_absolute() else str(value)

    server = cluster.get("server")
    if not isinstance(server, str) or not server.startswith(("http://", "https://")):
        raise ConfigError(f"kubeconfig {path}: cluster of context {name!r} has no http(s) `server`")
    ssl_context: ssl.SSLContext | None = None
    if server.startswith("https://"):
        if ca_file:
            ssl_context = _tls_context(cafile=ca_file)
        elif cluster.get("certificate-authority-data"):
            pem = _b64(cluster["certificate-authority-data"], "certificate-authority-data").decode()
            ssl_context = _tls_context(cadata=pem)
        elif cluster.get("certificate-authority"):
            ssl_context = _tls_context(cafile=file(cluster["certificate-authority"]))
        else:
            ssl_context = _tls_context()  # the system's CAs: a cluster with a publicly trusted cert
        if cluster.get("insecure-skip-tls-verify"):
            ssl_context.check_hostname = False
            ssl_context.verify_mode = ssl.CERT_NONE
        if cluster.get("tls-server-name"):
            raise ConfigError(f"kubeconfig {path}: `tls-server-name` is not supported")
    for plugin in ("exec", "auth-provider"):
        if user.get(plugin):
            raise ConfigError(
                f"kubeconfig {path}: user {user_name!r} authenticates through an `{plugin}` plugin, which "
                "the gateway does not run: give it a token (`kubectl create token`) or a client certificate"
            )
    cert: bytes | None = None
    key: bytes | None = None
    try:
        if user.get("client-certificate-data"):
            cert = _b64(user["client-certificate-data"], "client-certificate-data")
        elif user.get("client-certificate"):
            cert = Path(file(user["client-certificate"])).read_bytes()
        if user.get("client-key-data"):
            key = _b64(user["client-key-data"], "client-key-data")
        elif user.get("client-key"):
            key = Path(file(user["client-key"])).read_bytes()
    except OSError as exc:
        raise ConfigError(f"kubeconfig {path}: cannot read {exc.filename}: {exc.strerror}") from None
    if (cert is None) != (key is None):
        raise ConfigError(
            f"kubeconfig {path}: user {user_name!r} needs both a client certificate and its key"
        )
    if cert is not None and key is not None:
        if ssl_context is None:
            raise ConfigError(f"kubeconfig {path}: a client certificate needs an https server")
        _load_cert_chain(ssl_context, cert, key)
    token = user.get("token")
    token_file = file(user["tokenFile"]) if user.get("tokenFile") else None
    return KubeAccess(server, ssl_context, str(token) if token else None, token_file)
