"""MLflow search filters built from names and ids, quoted so user text can never change the query."""

from __future__ import annotations

from typing import Iterable


def quote(value: str) -> str:
    """``value`` as an MLflow filter string literal.

    MLflow's filter grammar has no escape character: a value is quoted with whichever quote it
    does not contain; one containing both cannot be searched for, and is refused.
    """
    value = str(value)
    if "'" not in value:
        return f"'{value}'"
    if '"' not in value:
        return f'"{value}"'
    raise ValueError(f"cannot search MLflow for {value!r}: it contains both kinds of quote")


def tag_equals(tag: str, value: str) -> str:
    return f"tags.`{tag}` = {quote(value)}"


def all_of(*clauses: str | None) -> str:
    return " and ".join(c for c in clauses if c)


def run_id_in(run_ids: Iterable[str]) -> str:
    return f"attributes.run_id IN ({', '.join(quote(r) for r in run_ids)})"
