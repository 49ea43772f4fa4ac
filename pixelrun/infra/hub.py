"""Where a network named by the user lives: a local folder or a Hugging Face id, and whether the hub
answers. One place for the rule every loader applies (text encoders, teachers, metric networks,
model.init) and for the one quick request that spares half a minute of huggingface_hub retries."""

from __future__ import annotations

import functools
import os


def looks_like_path(s: str) -> bool:
    """Hub ids are "name" or "org/name"; anything else is meant as a filesystem path."""
    return os.path.isabs(s) or s.startswith((".", "~")) or s.count("/") > 1


def is_local(spec: str) -> bool:
    """`spec` names a folder on this machine (whether or not it exists yet, when it reads as a path)."""
    path = os.path.expanduser(spec)
    return looks_like_path(path) or os.path.exists(path)


@functools.cache
def reachable(endpoint: str, timeout: float = 5.0) -> bool:
    """One HEAD request, no retries, once per process and endpoint; any HTTP answer counts (proxies
    from the environment apply)."""
    import urllib.error
    import urllib.request

    try:
        urllib.request.urlopen(urllib.request.Request(endpoint, method="HEAD"), timeout=timeout).close()
        return True
    except urllib.error.HTTPError:
        return True
    except (OSError, ValueError):
        return False
