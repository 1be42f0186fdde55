"""Loading checkpoints and datasets by name without minutes of silent retries.

Without a network, huggingface_hub retries each file request five times with backoff: a
from_pretrained of a name that is not cached takes about 25 seconds (a dataset as long), then
fails with a message that names no scenario field. So :func:`local_first` runs the load in
offline mode first (a local folder, or the Hugging Face cache), and goes online only when that
finds nothing and the Hub answers a connection within :data:`PROBE_SECONDS`. Every failure is a
ScenarioError naming the field and the fix.
"""

from __future__ import annotations

import contextlib
import os
import socket
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar
from urllib.parse import urlparse

from .bounded_yaml import value_excerpt
from .errors import ScenarioError, excerpt

T = TypeVar("T")
PROBE_SECONDS = 3.0
"""How long the Hub (or the HTTPS proxy) may take to accept a connection before it counts as unreachable."""


@contextlib.contextmanager
def offline() -> Iterator[None]:
    """huggingface_hub, transformers and datasets in offline mode for the duration: cache and local files only."""
    import huggingface_hub.constants as hub

    datasets_config = sys.modules.get("datasets.config")
    saved = hub.HF_HUB_OFFLINE, getattr(datasets_config, "HF_HUB_OFFLINE", None)
    hub.HF_HUB_OFFLINE = True
    if datasets_config is not None:
        datasets_config.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        hub.HF_HUB_OFFLINE = saved[0]
        if datasets_config is not None:
            datasets_config.HF_HUB_OFFLINE = saved[1]


def hub_endpoint() -> str:
    import huggingface_hub.constants as hub

    return hub.ENDPOINT


def hub_reachable() -> bool:
    """Whether the Hub (or the HTTPS proxy in between) accepts a TCP connection soon; False when the user
    set HF_HUB_OFFLINE."""
    import huggingface_hub.constants as hub

    if hub.HF_HUB_OFFLINE:
        return False
    proxy = os.environ.get("HTTPS_PROXY") or os.environ.get("https_proxy")
    url = urlparse(proxy or hub.ENDPOINT)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname or "", port), timeout=PROBE_SECONDS):
            return True
    except (OSError, ValueError):
        return False


def looks_local(name: str) -> bool:
    """A file-system path rather than a Hub id (``name`` or ``org/name``)."""
    return name.startswith(("/", "./", "../", "~", ".\\")) or name.count("/") > 1 or "\\" in name or (
        _exists(name)
    )


def _exists(name: str) -> bool:
    try:
        return Path(name).expanduser().exists()
    except (OSError, ValueError, RuntimeError):
        return False


def local_first(load: Callable[[], T], name: str, field: str, what: str) -> T:
    """``load()`` from a local folder or the cache; else from the Hub, if it can be reached. ``field`` and
    ``what`` (e.g. "model.name_or_path", "a checkpoint (save_pretrained's folder)") name it in the errors."""
    shown = value_excerpt(name)
    if _exists(name):
        try:
            with offline():  # a local folder needs nothing from the Hub (PEFT's adapter lookup would retry)
                return load()
        except Exception as exc:  # noqa: BLE001 - transformers, safetensors, json: a folder that is no checkpoint
            raise ScenarioError(f"{field}: {shown} could not be loaded as {what} ({describe_error(exc)}); give a folder "
                                f"that holds {what}") from None
    if looks_local(name):
        raise ScenarioError(f"{field}: {shown} does not exist; give the folder of {what}, or its Hugging Face Hub name")
    try:
        with offline():
            return load()
    except Exception:  # noqa: BLE001 - not in the cache (or an invalid name): the Hub decides
        pass
    if not hub_reachable():
        raise ScenarioError(
            f"{field}: {shown} is neither a local folder nor in the Hugging Face cache, and the Hub "
            f"({hub_endpoint()}) cannot be reached from here; download it where there is a network "
            "(huggingface-cli download NAME) and give its folder, or set HTTPS_PROXY or HF_ENDPOINT")
    try:
        return load()
    except Exception as exc:  # noqa: BLE001 - an unknown name, a gated repository, a broken download
        raise ScenarioError(f"{field}: {shown} could not be loaded from the Hub as {what} ({describe_error(exc)}); "
                            "check the name (and your access to it), or give a local folder") from None


def describe_error(exc: BaseException) -> str:
    """A library's exception on one bounded line, with its cause when it only wraps one (datasets'
    DatasetGenerationError says nothing of the malformed line that raised it)."""
    text = f"{type(exc).__name__}: {' '.join(str(exc).split())}"
    cause = exc.__cause__ or exc.__context__
    if cause is not None and str(cause) and str(cause) not in text:
        text += f" ({type(cause).__name__}: {' '.join(str(cause).split())})"
    return excerpt(text, 300)
