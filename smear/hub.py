"""Where pretrained weights live on this machine, and whether their download server can be reached.

Read at call time from the environment, as the loaders will read it in a trial process: torch hub's cache
(``$TORCH_HOME/hub``, torchvision's weights under ``checkpoints/``) and the Hugging Face hub cache
(``$HF_HUB_CACHE``, else ``$HF_HOME/hub``, else ``~/.cache/huggingface/hub``).
"""
from __future__ import annotations

import os
from pathlib import Path

PROBE_TIMEOUT_S = 3.0


def torch_hub_dir() -> Path:
    import torch.hub

    return Path(torch.hub.get_dir())


def hf_hub_cache() -> Path:
    """The folder ``from_pretrained`` looks in (huggingface_hub.constants, resolved now rather than at import)."""
    home = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "huggingface")
    cache = os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE") or os.path.join(home, "hub")
    return Path(cache).expanduser()


def hf_cached_file(repo_id: str, filenames: tuple[str, ...]) -> str | None:
    """The first of ``filenames`` of ``repo_id`` in the local Hugging Face cache, or None."""
    from huggingface_hub import try_to_load_from_cache

    for name in filenames:
        try:
            hit = try_to_load_from_cache(repo_id, name, cache_dir=hf_hub_cache())
        except ValueError:  # not a valid repo id
            return None
        if isinstance(hit, str):
            return hit
    return None


def url_reachable(url: str, timeout: float = PROBE_TIMEOUT_S) -> bool:
    """Whether ``url``'s server answers (any HTTP status) within ``timeout`` seconds, through the
    environment's proxies as a download would go."""
    import urllib.error
    import urllib.request

    try:
        # a fresh opener: urlopen() would install a process-wide one with this moment's proxies
        urllib.request.build_opener().open(urllib.request.Request(url, method="HEAD"), timeout=timeout).close()
    except urllib.error.HTTPError:
        return True  # it answered
    except (OSError, ValueError):  # URLError, refused, timed out, no DNS
        return False
    return True


def hf_offline() -> bool:
    """HF_HUB_OFFLINE=1: the Hugging Face libraries will not download, whatever the network."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")
