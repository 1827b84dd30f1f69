"""``cellwatch predict`` over Dask: hand a list of images to the workers of a
:class:`~cellwatch.service.cluster.Pool` and give each batch of results, as it arrives, to
the caller, which records them."""

from __future__ import annotations

__all__ = ["run_images"]

import contextlib
import logging
import time
import uuid
from collections import deque
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cellwatch.config import Config
from cellwatch.errors import ClusterError
from cellwatch.service.cluster import MAX_CHECKED_FOLDERS, Pool, describe_start
from cellwatch.storage.ledger import scene_key

if TYPE_CHECKING:
    from cellwatch.pipeline import ImageResult

log = logging.getLogger("cellwatch.cluster")
_UNLISTED = object()  # a file whose scenes are not listed yet


def run_images(
    images: Sequence[Path],
    config: Config,
    out_dir: Path,
    *,
    on_results: Callable[[list[ImageResult]], None],
    pool: Pool | None = None,
    job_ids: Sequence[str] | None = None,
) -> None:
    """Process ``images`` on Dask workers; hand each batch of results, as they arrive, to
    ``on_results`` (which records them: the caller is the driver). ``pool`` is an open
    :class:`Pool` to use (and leave open); by default one is opened for ``config.compute``.
    ``job_ids`` are the images' jobs (``cellwatch predict``'s, see
    :mod:`cellwatch.service.rerun`); by default each image gets a new one.

    At most :attr:`Pool.window` images are in flight, so any number of images takes
    bounded memory. An image whose worker died is tried again on another, up to
    ``watch.max_attempts`` times, then gets a ``failed`` row; so does an image that raised
    an error a retry would not mend here (a command has no later to retry in).

    Raises
    ------
    ClusterError
        The scheduler is unreachable, no worker joins within ``compute.worker_timeout_s``,
        a worker cannot see the folders, or the scheduler or every worker goes away
        midway (the results so far have been handed on).
    """
    from cellwatch.errors import BadInputError, describe
    from cellwatch.model import model_label
    from cellwatch.pipeline import failed_result, scenes_of
    from cellwatch.service.worker import Task

    label, max_attempts = model_label(config.model.path), config.watch.max_attempts
    out = str(Path(out_dir).absolute())
    try:
        Path(out).mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ClusterError(f"cannot create the output folder {out}: {exc.strerror or exc}") from exc
    # (image index, job id, attempt, scene): a file's scenes are listed when it comes up
    ids = list(job_ids) if job_ids is not None else [uuid.uuid4().hex for _ in images]
    todo: deque[tuple[int, str, int, Any]] = deque(
        (i, ids[i], 1, _UNLISTED) for i in range(len(images))
    )
    held: dict[str, tuple[int, str, int, int | None]] = {}
    with contextlib.nullcontext(pool) if pool is not None else Pool(config.compute) as pool:
        pool.wait_for_workers(config.compute.worker_timeout_s)
        folders = {Path(p).absolute().parent for p in images[:MAX_CHECKED_FOLDERS]}
        found = pool.warm_up(
            config, [*((f, False) for f in sorted(folders)), (Path(out), True)], label
        )
        log.info("%s", describe_start(pool, found))
        alone_since: float | None = None
        while todo or pool.futures:
            room = pool.window - len(pool.futures)
            while room > 0 and todo:
                i, job_id, attempt, scene = todo.popleft()
                if scene is _UNLISTED:
                    listed = scenes_of(Path(images[i]))
                    todo.extendleft(reversed([(i, job_id, attempt, s) for s in listed]))
                    continue
                key = f"cellwatch-{job_id}-{scene_key(scene)}-{attempt}"
                held[key] = (i, job_id, attempt, scene)
                path = str(Path(images[i]).absolute())
                pool.submit(key, Task(path, job_id, out, config, label, scene))
                room -= 1
            results = []
            for fin in pool.finished(timeout=0.2):
                i, job_id, attempt, scene = held.pop(fin.key)
                if fin.result is not None:
                    results.append(fin.result.result)
                    continue
                if fin.lost:
                    raise ClusterError(
                        f"lost the Dask scheduler at {pool.address} with {len(held) + 1} "
                        "image(s) in flight; the rows of the images done are in the ledger, and running "
                        "the same command again counts only the rest"
                    )
                error = fin.error or RuntimeError("the task ended with neither result nor error")
                again = type(error).__name__ == "KilledWorker" or isinstance(error, ClusterError)
                if again and attempt < max_attempts:
                    log.warning("%s: %s; trying again", images[i], describe(error))
                    todo.appendleft((i, job_id, attempt + 1, scene))
                    continue
                message = describe(error)
                if attempt > 1:
                    message = f"gave up after {attempt} attempts; last error: {message}"
                results.append(
                    failed_result(
                        Path(images[i]),
                        BadInputError(message),
                        model=label,
                        config=config,
                        job_id=job_id,
                        scene=scene,
                    )
                )
            if results:
                on_results(results)
            if pool.threads():
                alone_since = None
            elif alone_since is None:
                alone_since = time.monotonic()
            elif time.monotonic() - alone_since > config.compute.worker_timeout_s:
                raise ClusterError(
                    f"every Dask worker of {pool.address} has been gone for "
                    f"{config.compute.worker_timeout_s:.0f} s; the rows of the images done "
                    "are in the ledger, and running the same command again counts only the rest"
                )
