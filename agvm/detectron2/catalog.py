"""``agvm-pretrained://<name>``: detectron2 paths of agvm's local data assets.

Configs name the mini pretrained backbone without a machine-specific path,
``MODEL.WEIGHTS: "agvm-pretrained://shapes_r18"``. The handler registered here on detectron2's
``PathManager`` (on import of :mod:`agvm.detectron2`) maps the URL to the cached file of
:mod:`agvm.data.pretrained` and verifies it against its manifest (size, sha256, settings). It
never builds anything: a missing or damaged asset raises :class:`PretrainedNotFoundError`
naming the command that builds it (``python -m agvm.data.pretrained``). ``train_net.py`` builds
a missing asset before training, visibly (:func:`agvm.detectron2.cli.prepare_pretrained`).
"""

from __future__ import annotations

import os
from typing import Any, List, Tuple

from detectron2.utils.file_io import PathHandler, PathManager

from ..data import pretrained as _assets

__all__ = ["URL_PREFIX", "PretrainedHandler", "PretrainedNotFoundError", "locate_url", "pretrained_name",
           "register_url_handler", "resolve_pretrained_url"]

#: The prefix of the URLs :class:`PretrainedHandler` resolves.
URL_PREFIX = "agvm-pretrained://"


class PretrainedNotFoundError(FileNotFoundError):
    """An ``agvm-pretrained://`` asset is not built, or fails verification (the message names the
    command that builds it)."""


def pretrained_name(url: str) -> str:
    """The asset name of ``agvm-pretrained://<name>``; ValueError when ``url`` lacks the prefix
    or the name is not in :data:`agvm.data.pretrained.PRETRAINED`."""
    if not url.startswith(URL_PREFIX):
        raise ValueError(f"{url!r} does not start with {URL_PREFIX!r}")
    name = url[len(URL_PREFIX):]
    if name not in _assets.PRETRAINED:
        raise ValueError(f"unknown pretrained model {name!r} in {url!r}; known: "
                         + ", ".join(URL_PREFIX + k for k in sorted(_assets.PRETRAINED)))
    return name


def locate_url(url: str) -> Tuple[str, List[str]]:
    """``(local path, problems)`` of ``url``'s asset under ``agvm.data.shapes.default_root()``
    (``$AGVM_DATASETS``, read now): problems empty = built and intact. Builds nothing."""
    return _assets.locate_pretrained(**_assets.PRETRAINED[pretrained_name(url)])


def resolve_pretrained_url(url: str) -> str:
    """The verified local path of ``agvm-pretrained://<name>``.

    Raises:
        ValueError: ``url`` lacks the prefix, or the name is unknown.
        PretrainedNotFoundError: the asset is missing or fails verification.
    """
    path, problems = locate_url(url)
    if problems:
        folder = os.path.dirname(path)
        state = (f"is not built ({folder} does not exist)" if not os.path.exists(folder)
                 else f"fails verification ({folder}: {'; '.join(problems)})")
        raise PretrainedNotFoundError(
            f"{url}: the mini pretrained backbone {state}. Build it once with "
            f"`{_assets.build_command(pretrained_name(url))}` (or `make pretrained`; about 2 min on one CPU core, "
            "same $AGVM_DATASETS); train_net.py builds it before training.")
    return path


class PretrainedHandler(PathHandler):
    """iopath handler of ``agvm-pretrained://<name>`` (see :func:`resolve_pretrained_url`)."""

    _agvm_pretrained = True  # marks the handler across module reloads

    def _get_supported_prefixes(self) -> List[str]:
        return [URL_PREFIX]

    def _get_local_path(self, path: str, force: bool = False, **kwargs: Any) -> str:
        self._check_kwargs(kwargs)
        return resolve_pretrained_url(path)

    def _open(self, path: str, mode: str = "r", buffering: int = -1, **kwargs: Any):
        self._check_kwargs(kwargs)
        return open(self._get_local_path(path), mode, buffering=buffering)

    def _isfile(self, path: str, **kwargs: Any) -> bool:
        """True when the asset is built and intact (an unknown name raises ValueError)."""
        self._check_kwargs(kwargs)
        return not locate_url(path)[1]

    def _exists(self, path: str, **kwargs: Any) -> bool:
        return self._isfile(path, **kwargs)


def register_url_handler() -> bool:
    """Register :class:`PretrainedHandler` on ``detectron2.utils.file_io.PathManager``.

    Idempotent. Returns True if it registered now, False if an agvm handler already was;
    raises ``KeyError`` if another handler owns the prefix.
    """
    try:
        PathManager.register_handler(PretrainedHandler(), allow_override=False)
        return True
    except KeyError:
        current = getattr(PathManager, "_path_handlers", {}).get(URL_PREFIX)
        if getattr(current, "_agvm_pretrained", False):
            return False
        raise


register_url_handler()
