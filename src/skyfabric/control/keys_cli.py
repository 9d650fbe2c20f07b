"""``skyfabric keys``: create, list, show, rotate and revoke managed API keys through a gateway's admin API.

The admin credential is read from an environment variable (``$SKYFABRIC_ADMIN_KEY`` unless
``--admin-key-env`` names another), never from the command line, where it would land in shell history and
in ``ps``. A new secret is printed once, on its own line, for a script to capture.
"""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.request
from typing import Any

import click


class _Api:
    def __init__(self, url: str, env: str) -> None:
        credential = os.environ.get(env)
        if not credential:
            raise click.ClickException(f"set ${env} to the gateway's admin credential")
        self.url = url.rstrip("/")
        self.credential = credential

    def call(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(self.url + path, data=data, method=method)
        request.add_header("authorization", f"Bearer {self.credential}")
        if data is not None:
            request.add_header("content-type", "application/json")
        try:
            with urllib.request.urlopen(request, timeout=30) as answer:
                return json.loads(answer.read())
        except urllib.error.HTTPError as exc:
            try:
                message = json.loads(exc.read())["error"]["message"]
            except (ValueError, KeyError, TypeError):
                message = exc.reason
            raise click.ClickException(f"{exc.code}: {message}") from None
        except urllib.error.URLError as exc:
            raise click.ClickException(f"cannot reach {self.url}: {exc.reason}") from None


def _limits(**options: Any) -> dict[str, Any]:
    body = {k: v for k, v in options.items() if v is not None and v != ()}
    if "models" in body:
        body["models"] = list(body["models"])
    return body


def _table(keys: list[dict[str, Any]]) -> None:
    columns = [
        "id",
        "name",
        "team",
        "hint",
        "rpm",
        "tpm",
        "max_concurrent",
        "budget",
        "budget_period",
        "state",
    ]
    rows = []
    for key in keys:
        state = "revoked" if key.get("revoked") else "active"
        rows.append([str(key.get(c) if c != "state" else state) for c in columns])
    widths = [max(len(c), *(len(r[i]) for r in rows)) if rows else len(c) for i, c in enumerate(columns)]
    click.echo("  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True)))
    for row in rows:
        click.echo("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)))


@click.group("keys")
@click.option(
    "--url", envvar="SKYFABRIC_URL", default="http://127.0.0.1:8080", show_default=True, help="the gateway"
)
@click.option(
    "--admin-key-env",
    default="SKYFABRIC_ADMIN_KEY",
    show_default=True,
    help="variable holding the admin credential",
)
@click.pass_context
def keys_command(ctx: click.Context, url: str, admin_key_env: str) -> None:
    """Managed API keys: create, list, show, rotate, revoke (through the gateway's admin API)."""
    ctx.obj = (url, admin_key_env)


def _api(ctx: click.Context) -> _Api:
    url, env = ctx.obj
    return _Api(url, env)


_LIMIT_OPTIONS = [
    click.option("--team", default=None),
    click.option("--model", "models", multiple=True, help="allowed model (glob); repeat; none: all"),
    click.option("--rpm", type=int, default=None, help="requests per minute"),
    click.option("--tpm", type=int, default=None, help="tokens per minute (input + output)"),
    click.option("--max-concurrent", type=int, default=None, help="requests in flight"),
    click.option("--budget", type=float, default=None, help="USD per budget period"),
    click.option("--budget-period", type=click.Choice(["day", "month"]), default=None),
    click.option("--expires-in", type=float, default=None, help="seconds until the key expires"),
    click.option(
        "--failure-policy", type=click.Choice(["open", "closed"]), default=None, help="while Redis is down"
    ),
]


def _with_limits(fn: Any) -> Any:
    for option in reversed(_LIMIT_OPTIONS):
        fn = option(fn)
    return fn


@keys_command.command("create")
@click.argument("name")
@_with_limits
@click.option("--json", "as_json", is_flag=True, help="print the whole answer as JSON")
@click.pass_context
def create(ctx: click.Context, name: str, as_json: bool, **options: Any) -> None:
    """Create a key; prints its secret (shown this once)."""
    made = _api(ctx).call("POST", "/admin/keys", {"name": name, **_limits(**options)})
    if as_json:
        click.echo(json.dumps(made, indent=2))
        return
    click.echo(f"created {made['id']} ({made['name']}); its secret, shown once:", err=True)
    click.echo(made["key"])


@keys_command.command("list")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def list_keys(ctx: click.Context, as_json: bool) -> None:
    """List the keys (never their secrets)."""
    data = _api(ctx).call("GET", "/admin/keys")["data"]
    if as_json:
        click.echo(json.dumps(data, indent=2))
    else:
        _table(data)


@keys_command.command("show")
@click.argument("key_id")
@click.pass_context
def show(ctx: click.Context, key_id: str) -> None:
    """One key, as JSON."""
    click.echo(json.dumps(_api(ctx).call("GET", f"/admin/keys/{key_id}"), indent=2))


@keys_command.command("update")
@click.argument("key_id")
@click.option("--name", default=None)
@_with_limits
@click.pass_context
def update(ctx: click.Context, key_id: str, **options: Any) -> None:
    """Change a key's name, team, models or limits."""
    click.echo(json.dumps(_api(ctx).call("PATCH", f"/admin/keys/{key_id}", _limits(**options)), indent=2))


@keys_command.command("rotate")
@click.argument("key_id")
@click.option(
    "--overlap", type=float, default=86400.0, show_default=True, help="seconds the old secret stays valid"
)
@click.pass_context
def rotate(ctx: click.Context, key_id: str, overlap: float) -> None:
    """Give a key a new secret (printed once); the old one works for --overlap seconds more."""
    made = _api(ctx).call("POST", f"/admin/keys/{key_id}/rotate", {"overlap_seconds": overlap})
    click.echo(
        f"rotated {made['id']}; the previous secret is valid for {overlap:g}s more; new secret:", err=True
    )
    click.echo(made["key"])


@keys_command.command("revoke")
@click.argument("key_id")
@click.pass_context
def revoke(ctx: click.Context, key_id: str) -> None:
    """Revoke a key, at once and for good."""
    made = _api(ctx).call("POST", f"/admin/keys/{key_id}/revoke")
    click.echo(f"revoked {made['id']} ({made['name']})")
