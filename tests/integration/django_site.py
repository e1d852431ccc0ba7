"""A small Django project for the framework tests: its settings, its URLconf (this module) and its views.

Django reads settings once per process, so ``django_asgi_app()`` configures them on first use only. Django
speaks no ASGI lifespan (its handler refuses the scope), so "started" here is Django's own start-up: its
app registry being ready.
"""

from __future__ import annotations

import json
from typing import Any

from django.apps import apps
from django.http import HttpRequest, JsonResponse
from django.urls import path
from django.views.decorators.csrf import csrf_exempt
from django.views.decorators.http import require_GET, require_POST


@require_GET
def items(request: HttpRequest) -> JsonResponse:
    root_path = getattr(request, "scope", {}).get("root_path")
    return JsonResponse({"items": [1, 2, 3], "started": apps.ready, "root_path": root_path})


@require_GET
def item(request: HttpRequest, item_id: int) -> JsonResponse:
    return JsonResponse({"item_id": item_id}, headers={"x-item": str(item_id)})


@csrf_exempt
@require_POST
def echo(request: HttpRequest) -> JsonResponse:
    return JsonResponse({"echo": json.loads(request.body)}, status=201)


urlpatterns = [path("items", items), path("items/<int:item_id>", item), path("echo", echo)]


def django_asgi_app() -> Any:
    from django.conf import settings
    from django.core.asgi import get_asgi_application

    if not settings.configured:
        settings.configure(
            DEBUG=False,
            SECRET_KEY="django-test-key-only-for-these-tests-0123456789",
            ROOT_URLCONF=__name__,
            ALLOWED_HOSTS=["127.0.0.1", "localhost"],
            INSTALLED_APPS=[],
            MIDDLEWARE=["django.middleware.common.CommonMiddleware"],
            APPEND_SLASH=False,
            USE_TZ=True,
        )
    return get_asgi_application()
