"""kopf registrations. The handlers only feed the cache and schedule reconciles.

Only watch-event handlers are used: kopf's create/update handlers persist progress in
annotations of the LLMDeployment, and the operator wants a steady cluster to see no writes.
"""

from __future__ import annotations

import logging
from typing import Any

import kopf

from llm_operator.api import GROUP, PLURAL, VERSION
from llm_operator.constants import LABEL_MANAGED_BY, MANAGED_BY, MANAGED_BY_SELECTOR
from llm_operator.controller.reconciler import Controller
from llm_operator.kube.resources import CHILD_KINDS

log = logging.getLogger("llm_operator.controller")


def register(
    registry: kopf.OperatorRegistry,
    controller: Controller,
    namespaces: list[str],
    child_kinds: list[str],
) -> None:
    @kopf.on.login(registry=registry)
    def login(**kwargs: Any) -> kopf.ConnectionInfo | None:
        # The same credentials as the `kubernetes` client: in-cluster, else KUBECONFIG.
        info: kopf.ConnectionInfo | None = kopf.login_with_service_account(
            **kwargs
        ) or kopf.login_with_kubeconfig(**kwargs)
        return info

    @kopf.on.startup(registry=registry)
    async def prime_cache(settings: kopf.OperatorSettings, **_: Any) -> None:
        # Children must be known before the first LLMDeployment event, or a restart would
        # re-apply everything. kopf starts its watches only after startup handlers finish.
        settings.posting.enabled = False
        settings.watching.server_timeout = 300
        settings.watching.client_timeout = 330
        settings.networking.error_backoffs = [1, 2, 5, 10, 30]
        settings.batching.batch_window = 0.1
        import asyncio

        for namespace in namespaces or [None]:  # type: ignore[list-item]
            for kind in CHILD_KINDS:
                if kind.kind not in child_kinds:
                    continue
                token: str | None = None
                while True:  # a page at a time: only one page is ever parsed at once
                    page, token = await asyncio.to_thread(
                        controller.client.list_page, kind, namespace, MANAGED_BY_SELECTOR, token
                    )
                    for child in page:
                        controller.remember_child(child)
                    if not token:
                        break
        if controller.routes is not None:
            await asyncio.to_thread(controller.routes.prime)
        log.info("cache primed with %d owners' children", len(controller.children))

    @kopf.on.event(GROUP, VERSION, PLURAL, id="llmdeployment", registry=registry)
    async def llmdeployment_event(event: kopf.RawEvent, **_: Any) -> None:
        body = dict(event["object"])
        deleted = event["type"] == "DELETED"
        owner_key = controller.remember_owner(body, deleted=deleted)
        if not deleted:
            await controller.reconcile(owner_key)

    for kind in CHILD_KINDS:
        if kind.kind not in child_kinds:
            continue
        selector = (
            (kind.group, kind.version, kind.plural) if kind.group else (kind.version, kind.plural)
        )

        @kopf.on.event(
            *selector,
            id=f"child-{kind.plural}",
            labels={LABEL_MANAGED_BY: MANAGED_BY},
            registry=registry,
        )
        async def child_event(event: kopf.RawEvent, **_: Any) -> None:
            owner_key = controller.remember_child(
                dict(event["object"]), deleted=event["type"] == "DELETED"
            )
            if owner_key is not None and owner_key in controller.bodies:
                await controller.reconcile(owner_key)
