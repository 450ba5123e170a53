"""The PromQL of the deployment: every expression in the Grafana dashboards and Prometheus rules.

Shared by tests/test_deploy.py (syntax via `promtool check rules`, metric names against the
code) and by tests that run the expressions against a live Prometheus. Import it from a test
as `from promql import ...` (pytest puts tests/ on sys.path) or from elsewhere after adding
tests/ to sys.path (scripts/metrics_catalog.py does).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
DASHBOARDS_DIR = DEPLOY / "grafana" / "dashboards"
ALERTS_FILE = DEPLOY / "prometheus" / "alerts.yml"

# Grafana's built-in variables, and the dashboards' own, replaced by values a plain Prometheus
# accepts: a query Grafana would send looks like this one.
GRAFANA_VARIABLES = {
    "__rate_interval": "1m",
    "__interval": "15s",
    "__range": "30m",
    "__range_s": "1800",
    "__range_ms": "1800000",
    "worker": ".*",
}
_VARIABLE = re.compile(r"\$\{(\w+)(?::\w+)?\}|\$(\w+)")
# Our metric names, as written in an expression (series suffixes such as _bucket included).
_LLAMAFLEET_NAME = re.compile(r"\bllamafleet_[a-zA-Z0-9_]*[a-zA-Z0-9]")
# A __name__ regex matcher, e.g. {__name__=~"llamafleet_[a-z]+_grpc_requests_total"}.
_NAME_MATCHER = re.compile(r'__name__\s*=~?\s*"([^"]+)"')


def substitute_grafana_variables(expr: str) -> str:
    """`expr` with $var / ${var} replaced as Grafana would (unknown variables fail loudly)."""

    def replace(match: re.Match[str]) -> str:
        name = match.group(1) or match.group(2)
        if name not in GRAFANA_VARIABLES:
            raise KeyError(f"unknown Grafana variable ${name} in {expr!r}: add it to GRAFANA_VARIABLES")
        return GRAFANA_VARIABLES[name]

    return _VARIABLE.sub(replace, expr)


def dashboard_files() -> list[Path]:
    return sorted(DASHBOARDS_DIR.glob("*.json"))


def _panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """Every panel, those nested in collapsed rows included."""
    for panel in panels:
        yield panel
        yield from _panels(panel.get("panels", []))


def _is_prometheus(datasource: Any) -> bool:
    # A target without its own datasource inherits the panel's; our dashboards always set both.
    return isinstance(datasource, dict) and datasource.get("type") == "prometheus"


def dashboard_expressions(substitute: bool = True) -> list[tuple[str, str]]:
    """(where, expr) for every Prometheus query of every dashboard panel and template variable.

    `where` reads like "overview.json: Time to first token (TTFT) [A]". With `substitute`, Grafana
    variables are replaced (see GRAFANA_VARIABLES) so that the expression is plain PromQL.
    """
    found: list[tuple[str, str]] = []
    for path in dashboard_files():
        board = json.loads(path.read_text())
        for panel in _panels(board.get("panels", [])):
            for target in panel.get("targets", []):
                if not _is_prometheus(target.get("datasource", panel.get("datasource"))):
                    continue
                expr = target.get("expr", "")
                if expr:
                    where = f"{path.name}: {panel.get('title', '?')} [{target.get('refId', '?')}]"
                    found.append((where, substitute_grafana_variables(expr) if substitute else expr))
        for variable in board.get("templating", {}).get("list", []):
            query = variable.get("query")
            text = query.get("query", "") if isinstance(query, dict) else str(query or "")
            # label_values(metric, label) is Grafana's, not PromQL: its metric selector is.
            match = re.fullmatch(r"\s*label_values\((.+),\s*\w+\)\s*", text)
            if _is_prometheus(variable.get("datasource")) and match:
                found.append((f"{path.name}: variable ${variable['name']}", match.group(1)))
    return found


def _rules(path: Path = ALERTS_FILE) -> Iterator[tuple[str, dict[str, Any]]]:
    for group in yaml.safe_load(path.read_text())["groups"]:
        for rule in group["rules"]:
            yield group["name"], rule


def alert_expressions(path: Path = ALERTS_FILE) -> list[tuple[str, str]]:
    """(where, expr) for every alerting and recording rule, e.g. ("alerts.yml: llamafleet-errors/X", "...")."""
    return [
        (f"{path.name}: {group}/{rule.get('alert') or rule.get('record')}", str(rule["expr"]))
        for group, rule in _rules(path)
    ]


# A comparison operator (longest first), unless it already has the bool modifier.
_COMPARISON = re.compile(r"(==|!=|>=|<=|>|<)(?!\s*bool\b)")


def comparisons_as_bool(expr: str) -> str:
    """`expr` with the `bool` modifier on every comparison: `up == 0` then returns 0 or 1 for each
    series of `up` instead of keeping only those that compare true, so an alert's expression has
    data whenever the series it watches exist, firing or not. Label matchers (`{code!="OK"}`),
    range selectors and strings are left alone."""
    out: list[str] = []
    depth = 0
    quote = ""
    i = 0
    while i < len(expr):
        char = expr[i]
        if quote:
            if char == "\\":
                out.append(expr[i : i + 2])
                i += 2
                continue
            if char == quote:
                quote = ""
        elif char in "\"'`":
            quote = char
        elif char in "{[":
            depth += 1
        elif char in "}]":
            depth -= 1
        elif depth == 0 and (match := _COMPARISON.match(expr, i)):
            out.append(f"{match.group(1)} bool")
            i = match.end()
            continue
        out.append(char)
        i += 1
    return "".join(out)


def alert_names(path: Path = ALERTS_FILE) -> list[str]:
    return [rule["alert"] for _group, rule in _rules(path) if "alert" in rule]


def as_rules_file(expressions: list[tuple[str, str]]) -> dict[str, Any]:
    """A Prometheus rules document recording each expression, for `promtool check rules`
    (which parses every `expr`, so this is a PromQL syntax check of each one)."""
    return {
        "groups": [
            {
                "name": "expressions-under-test",
                "rules": [
                    {"record": f"llamafleet_test:expression_{i:04d}", "expr": expr, "labels": {"where": where[:200]}}
                    for i, (where, expr) in enumerate(expressions)
                ],
            }
        ]
    }


def metric_names(expr: str) -> set[str]:
    """The llamafleet_* names an expression reads: plain names, and the patterns of __name__
    matchers (as written: match them with `re.fullmatch` against exported names)."""
    names = set(_LLAMAFLEET_NAME.findall(_NAME_MATCHER.sub("", expr)))
    names |= {pattern for pattern in _NAME_MATCHER.findall(expr) if pattern.startswith("llamafleet_")}
    return names


def referenced_metrics() -> dict[str, list[str]]:
    """Each llamafleet_* name (or __name__ pattern) -> where it is used, dashboards and alerts."""
    uses: dict[str, list[str]] = {}
    for where, expr in [*dashboard_expressions(), *alert_expressions()]:
        for name in metric_names(expr):
            uses.setdefault(name, []).append(where)
    return uses
