"""The GPU quota as a Prefect global concurrency limit, shared by every sweep that names it."""

from __future__ import annotations

import logging

from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate, GlobalConcurrencyLimitUpdate
from prefect.exceptions import ObjectNotFound

log = logging.getLogger("hpsweep")


def ensure_quota_limit(name: str, quota: int) -> None:
    """Create the limit, or set it to ``quota`` if it holds another value.

    The limit is the organisation's: two sweeps naming it share its slots. The last
    sweep started sets its size, and that is logged, never silent.
    """
    with get_client(sync_client=True) as client:
        try:
            limit = client.read_global_concurrency_limit_by_name(name)
        except ObjectNotFound:
            client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=name, limit=quota))
            return
        if limit.limit != quota or not limit.active:
            log.warning("setting Prefect concurrency limit %r from %s to the quota %s", name, limit.limit, quota)
            client.update_global_concurrency_limit(name, GlobalConcurrencyLimitUpdate(limit=quota, active=True))
