"""The desk staff's login / consent page and message pages (HTML, no JavaScript).

Every value is HTML-escaped before it reaches a template (``string.Template``; no template
engine needed for two pages). Responses carry strict security headers: a CSP that allows
only our inline stylesheet (by hash) and form posts to ourselves and to the client's
redirect origin (a browser checks the redirect after the POST against ``form-action``),
no framing, no sniffing, no referrer, no caching.
"""

from __future__ import annotations

import base64
import hashlib
import re
from functools import cache
from html import escape
from importlib.resources import files
from string import Template
from urllib.parse import urlsplit

from starlette.responses import HTMLResponse

from service.security.scopes import (
    LAUNCH_PATIENT,
    ResourceScope,
    ScopeError,
    parse_scope,
)

_VERBS = {"c": "创建 create", "r": "读取 read", "u": "修改 update", "d": "删除 delete", "s": "检索 search"}
_CONTEXTS = {"patient": "所选患者的 of the selected patient", "user": "您有权访问的 you may access",
             "system": "系统 system-wide"}
_OTHER = {LAUNCH_PATIENT: "选择一位患者 pick a patient for the app",
          "offline_access": "长期访问 (刷新令牌) stay connected (refresh token)",
          "online_access": "在线期间访问 stay connected while you are logged in"}


@cache
def _template(name: str) -> tuple[Template, str]:
    text = files("service.security").joinpath("templates", name).read_text(encoding="utf-8")
    styles = re.findall(r"<style>(.*?)</style>", text, flags=re.DOTALL)
    hashes = " ".join("'sha256-" + base64.b64encode(hashlib.sha256(s.encode()).digest()).decode() + "'"
                      for s in styles)
    return Template(text), hashes


def security_headers(style_hashes: str = "", form_targets: tuple[str, ...] = ()) -> dict[str, str]:
    form_action = " ".join(("'self'", *form_targets))
    return {
        "Content-Security-Policy": (f"default-src 'none'; style-src {style_hashes or chr(39) + 'none' + chr(39)}; "
                                    f"form-action {form_action}; frame-ancestors 'none'; base-uri 'none'"),
        "X-Frame-Options": "DENY",
        "X-Content-Type-Options": "nosniff",
        "Referrer-Policy": "no-referrer",
        "Cache-Control": "no-store",
        "Pragma": "no-cache",
    }


def describe_scope(text: str) -> str:
    try:
        scope = parse_scope(text)
    except ScopeError:
        return escape(text)
    if isinstance(scope, str):
        return escape(_OTHER.get(scope, scope))
    assert isinstance(scope, ResourceScope)
    verbs = "、".join(_VERBS[letter] for letter in "cruds" if letter in scope.permissions)
    what = "全部资源 all resources" if scope.resource_type == "*" else scope.resource_type
    limit = ""
    if scope.restrictions:
        limit = " (" + ", ".join(f"{r.param}={','.join((s + '|' if s else '') + (c or '') for s, c in r.values)}"
                                 for r in scope.restrictions) + ")"
    return f"{escape(verbs)}: {escape(_CONTEXTS[scope.context])} {escape(what)}{escape(limit)} <code>{escape(text)}</code>"


def consent_page(*, action: str, client_name: str, scopes: list[str], hidden: dict[str, str], logged_in_as: str | None,
                 ask_patient: bool, patient: str = "", error: str | None = None, redirect_origin: str | None = None,
                 status: int = 200) -> HTMLResponse:
    template, hashes = _template("authorize.html")
    hidden_fields = "\n".join(f'<input type="hidden" name="{escape(k)}" value="{escape(v)}">'
                              for k, v in hidden.items())
    if logged_in_as:
        login_block = f'<p class="who">已登录 Logged in as <strong>{escape(logged_in_as)}</strong></p>'
    else:
        login_block = ('<label for="username">用户名 Username</label>'
                       '<input type="text" id="username" name="username" autocomplete="username" required>'
                       '<label for="password">密码 Password</label>'
                       '<input type="password" id="password" name="password" autocomplete="current-password" required>')
    patient_block = ""
    if ask_patient:
        patient_block = ('<label for="patient">患者 ID / Patient id</label>'
                         f'<input type="text" id="patient" name="patient" value="{escape(patient)}" required>')
    body = template.substitute(
        client_name=escape(client_name), action=escape(action),
        scope_items="".join(f"<li>{describe_scope(s)}</li>" for s in scopes),
        error_block=f'<p class="error" role="alert">{escape(error)}</p>' if error else "",
        hidden_fields=hidden_fields, login_block=login_block, patient_block=patient_block)
    targets = (redirect_origin,) if redirect_origin else ()
    return HTMLResponse(body, status_code=status, headers=security_headers(hashes, targets))


def message_page(title: str, message: str, *, status: int, error: bool = True) -> HTMLResponse:
    template, hashes = _template("message.html")
    body = template.substitute(title=escape(title), message=escape(message), css_class="error" if error else "")
    return HTMLResponse(body, status_code=status, headers=security_headers(hashes))


def origin_of(uri: str) -> str | None:
    parts = urlsplit(uri)
    if parts.scheme in ("http", "https") and parts.netloc:
        return f"{parts.scheme}://{parts.netloc}"
    return None
