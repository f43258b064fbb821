"""The interactive API docs at /docs (Swagger UI), with nothing loaded from elsewhere.

FastAPI's own pages load their scripts and styles from a CDN, so offline they are blank. This follows FastAPI's
self-hosting recipe (the app made with docs_url=None, the page built by get_swagger_ui_html with our own URLs):
the files come from the fastapi-offline package, which ships them, and are served under /static beside the web
page's (STATIC_PACKAGE, for StaticFiles' `packages`). The page gets a Content-Security-Policy that allows this
origin and the page's own inline script (by its hash), nothing else. There is no /redoc: ReDoc always fetches
its logo from its makers' CDN.
"""

import base64
import hashlib
import re

from fastapi import APIRouter, Request
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse

STATIC_PACKAGE = ("fastapi_offline", "static")  # swagger-ui-bundle.js, swagger-ui.css, favicon.png (and ReDoc's)
# Swagger UI draws with inline styles and data: images.
DOCS_POLICY = ("default-src 'self'; script-src 'self' {scripts}; style-src 'self' 'unsafe-inline'; "
               "img-src 'self' data:; frame-ancestors 'none'")

router = APIRouter(include_in_schema=False)


@router.get("/docs")
async def swagger_ui(request: Request) -> HTMLResponse:
    """Swagger UI: every operation of /openapi.json, which can be tried from the page with a key."""
    root = request.scope.get("root_path", "").rstrip("/")
    page = get_swagger_ui_html(openapi_url=root + request.app.openapi_url, title=f"{request.app.title} - Swagger UI",
                               swagger_js_url=f"{root}/static/swagger-ui-bundle.js",
                               swagger_css_url=f"{root}/static/swagger-ui.css",
                               swagger_favicon_url=f"{root}/static/favicon.png", oauth2_redirect_url=None,
                               # Swagger UI would fetch a badge from validator.swagger.io for a public spec URL.
                               swagger_ui_parameters={"validatorUrl": None})
    scripts = re.findall(rb"<script>(.*?)</script>", bytes(page.body), re.DOTALL)
    hashes = " ".join(f"'sha256-{base64.b64encode(hashlib.sha256(script).digest()).decode()}'" for script in scripts)
    page.headers["Content-Security-Policy"] = DOCS_POLICY.format(scripts=hashes)
    return page
