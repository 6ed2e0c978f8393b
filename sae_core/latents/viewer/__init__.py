"""The latent viewer: a static site over a latent statistics dataset (sae_core.latents.pages),
served on loopback by the standard library's http.server or exported as files.

- `LatentSite(ref)`: the site's files by URL path (`get`), every path (`paths`), `export(dir)`.
- `make_server(site, port)` / `serving(site, port)`: a threaded HTTP server on 127.0.0.1.
"""

from sae_core.latents.viewer.server import make_server, serving
from sae_core.latents.viewer.site import LatentSite

__all__ = ["LatentSite", "make_server", "serving"]
