"""Result images: signed, expiring URLs and the download endpoint behind them.

An image is rendered at its first download, not at submit, because most load tests only
ever fetch each image once and many never poll to the end; a bounded LRU (by total bytes)
keeps recent images so a retried or truncated download costs a memcpy, not a render.
The simulators of one process share that cache (``shared_cache``); with ``image_dir`` set,
simulators in other processes share the images on disk too (``ImageFolder``). The URL
carries its expiry and an HMAC of (task, extension, expiry), so a client cannot extend the
lifetime by editing the query string.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import hmac
import logging
import threading
from collections import OrderedDict
from collections.abc import Callable
from email.utils import formatdate
from pathlib import Path

from aiohttp import web

from pipeline.contract import FORMAT_EXT, FORMAT_MIME, KleinStatus
from pipeline.sim import images
from pipeline.sim.responses import cut, json_response
from pipeline.sim.state import SimState, Task
from pipeline.whole_file import write_whole

log = logging.getLogger(__name__)

RESULTS_PREFIX = "/_sim/results/"
_EXT_FORMAT = {ext: fmt for fmt, ext in FORMAT_EXT.items()}
_SLOW_TICKS_PER_S = 20


class ImageCache:
    """Recently rendered images, evicted oldest-first once ``max_bytes`` is exceeded.

    Thread-safe: the simulators of one process share one (``shared_cache``), each on its
    own thread's event loop when started with ``SimServer.in_thread``.
    """

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.bytes = 0
        self._items: OrderedDict[tuple[object, ...], bytes] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: tuple[object, ...]) -> bytes | None:
        with self._lock:
            data = self._items.get(key)
            if data is not None:
                self._items.move_to_end(key)
            return data

    def put(self, key: tuple[object, ...], data: bytes) -> None:
        with self._lock:
            if len(data) > self.max_bytes or key in self._items:
                return
            self._items[key] = data
            self.bytes += len(data)
            while self.bytes > self.max_bytes:
                _, old = self._items.popitem(last=False)
                self.bytes -= len(old)

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
            self.bytes = 0


_shared: ImageCache | None = None
_shared_lock = threading.Lock()


def shared_cache(max_bytes: int) -> ImageCache:
    """The process's image cache, holding at least ``max_bytes`` (0: a cache of nothing,
    for this simulator alone).

    An image depends only on its key (the same bytes in any process), and the simulators
    one process starts, one after another or side by side (a test suite's, a notebook's),
    are asked for the same prompts again: the in-process simulators of the suite's
    pipeline tests rendered 9,192 images where a shared cache rendered 2,595 (74 of their
    471 CPU-seconds; benchmarks/notes.md, session 24). Bounded by the largest size any of
    them asked for.
    """
    global _shared
    if max_bytes == 0:
        return ImageCache(0)
    with _shared_lock:
        if _shared is None:
            _shared = ImageCache(max_bytes)
        _shared.max_bytes = max(_shared.max_bytes, max_bytes)
        return _shared


class ImageFolder:
    """Rendered images kept on disk, for simulators in other processes to read back.

    A test suite starts a simulator process per scenario, and each rendered the same
    catalog's images again: the chaos matrix's eleven 600-row runs spent most of their
    simulators' CPU rendering (benchmarks/notes.md, session 25). Written whole or not at
    all (a temporary file renamed), so a reader never sees half an image; any error of the
    disk only costs a render.
    """

    def __init__(self, folder: str) -> None:
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)

    def get_or_render(
        self, key: tuple[object, ...], ext: str, render: Callable[[], bytes]
    ) -> bytes:
        path = self.folder / f"{hashlib.sha256(repr(key).encode()).hexdigest()}.{ext}"
        try:
            return path.read_bytes()
        except OSError:
            pass
        data = render()
        try:
            write_whole(path, data)
        except OSError as exc:
            log.debug("image not kept in %s: %s", self.folder, exc)
        return data


class Results:
    """Builds result URLs and serves them."""

    def __init__(self, state: SimState, secret: bytes) -> None:
        self._state = state
        self._secret = secret
        self.cache = shared_cache(state.config.image_cache_bytes)
        self.folder: ImageFolder | None = None
        if state.config.image_dir:
            try:
                self.folder = ImageFolder(state.config.image_dir)
            except OSError as exc:  # rendered each time instead, as without the setting
                log.warning(
                    "image_dir %s is not usable (%s): images are not kept on disk",
                    state.config.image_dir,
                    exc.strerror or exc,
                )
        self._rendering: dict[tuple[object, ...], asyncio.Future[bytes]] = {}

    def _sig(self, task_id: str, ext: str, expires: int) -> str:
        message = f"{task_id}.{ext}.{expires}".encode()
        return hmac.new(self._secret, message, hashlib.sha256).hexdigest()[:32]

    def url(self, task: Task, base_url: str) -> str:
        ext = FORMAT_EXT[task.fmt]
        sig = self._sig(task.task_id, ext, task.expires)
        return f"{base_url}{RESULTS_PREFIX}{task.task_id}.{ext}?expires={task.expires}&sig={sig}"

    async def image(self, task: Task) -> bytes:
        """The task's image bytes, rendered once and shared by concurrent downloads.

        Rendering runs in a worker thread (Pillow and numpy release the GIL while they
        work) so a 2k PNG never stalls the polls and submits of every other client.
        """
        key = (task.prompt, task.seed, task.width, task.height, task.fmt, task.ref_digests)
        data = self.cache.get(key)
        if data is not None:
            return data
        pending = self._rendering.get(key)
        if pending is None:
            render = functools.partial(
                images.render_image,
                prompt=task.prompt,
                seed=task.seed,
                width=task.width,
                height=task.height,
                fmt=task.fmt,
                references=list(self._state.reference_bytes(task)),
            )
            if self.folder is not None:
                render = functools.partial(
                    self.folder.get_or_render, key, FORMAT_EXT[task.fmt], render
                )
            pending = asyncio.get_running_loop().run_in_executor(None, render)
            self._rendering[key] = pending
            pending.add_done_callback(lambda _: self._rendering.pop(key, None))
        data = await asyncio.shield(pending)
        self.cache.put(key, data)
        return data

    async def handle(self, request: web.Request) -> web.StreamResponse:
        state = self._state
        now = state.clock()
        task_id, _, ext = request.match_info["name"].rpartition(".")
        expires_raw = request.query.get("expires", "")
        sig = request.query.get("sig", "")
        if not expires_raw.isdigit() or not hmac.compare_digest(
            sig.encode(), self._sig(task_id, ext, int(expires_raw)).encode()
        ):
            return json_response(
                {"message": "Result URL signature is missing or invalid; use the URL as given"},
                status=403,
            )
        expires = int(expires_raw)
        task = state.tasks.get(task_id)
        if now >= expires:
            if task is not None:
                task.key.counters.downloads_expired += 1
            return json_response(
                {
                    "message": "Result URL expired at "
                    f"{formatdate(expires, usegmt=True)}; poll the task for a fresh one"
                },
                status=403,
            )
        if task is None or _EXT_FORMAT.get(ext) != task.fmt:
            return json_response({"message": "Result not found"}, status=404)
        state.advance(task.key, now)
        if task.status(now) != KleinStatus.COMPLETED:
            return json_response({"message": "Result not found"}, status=404)
        n = task.downloads
        task.downloads += 1
        faults = state.config.faults
        key = task.key
        if state.fault(key, "download_503", task.identity, n, faults.download.error_503):
            return json_response({"message": "Service unavailable"}, status=503)
        if state.fault(key, "download_500", task.identity, n, faults.download.error_500):
            return json_response({"message": "Internal server error"}, status=500)
        data = await self.image(task)
        key.counters.downloads += 1
        mime = FORMAT_MIME[task.fmt]
        if state.fault(key, "download_drop", task.identity, n, faults.download.drop):
            return await cut(request, data, send=0, content_type=mime)
        if state.fault(key, "download_truncate", task.identity, n, faults.truncate):
            return await cut(request, data, send=len(data) // 2, content_type=mime)
        if state.fault(key, "download_slow", task.identity, n, faults.slow):
            return await self._slow(request, data, mime, faults.slow_bytes_per_s)
        return web.Response(body=data, content_type=mime)

    async def _slow(
        self, request: web.Request, data: bytes, mime: str, rate: int
    ) -> web.StreamResponse:
        resp = web.StreamResponse()
        resp.content_type = mime
        resp.content_length = len(data)
        await resp.prepare(request)
        chunk = max(1, rate // _SLOW_TICKS_PER_S)
        for start in range(0, len(data), chunk):
            await resp.write(data[start : start + chunk])
            await asyncio.sleep(chunk / rate)
        await resp.write_eof()
        return resp
