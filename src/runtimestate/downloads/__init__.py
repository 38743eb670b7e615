"""Model downloads: durable pull tasks per (backend, model), and the worker that carries them out.

Two modules, split by who does what:

* :mod:`.tasks` - the bookkeeping: which pairs have a task (the backend cycle adds and removes
  them), what an operator does to them (cancel, retry, list), and the back-off policy;
* :mod:`.worker` - :class:`PullWorker`: claims one task, pulls within explicit bounds,
  heartbeats, and records the outcome on the task.

Both talk to the database only through the :class:`~runtimestate.store.Store`'s task methods,
which hold the invariants (one task per pair, one running pull per backend, fenced writes).
``State.run_download_cycle()`` is one worker cycle.
"""

from runtimestate.downloads.tasks import (
    MODEL_DOWNLOAD,
    QUEUE_CANCEL,
    TASKS_NOTICE,
    Backoff,
    QueueEntry,
    TaskChanges,
    cancel,
    download_of,
    forget,
    list_queue,
    notify_workers,
    queue_download,
    reconcile_tasks,
    refresh_task_metrics,
    remove_pending,
    request_cancel,
    retry,
)
from runtimestate.downloads.worker import DownloadOutcome, DownloadStatus, Puller, PullWorker

__all__ = [
    "MODEL_DOWNLOAD",
    "QUEUE_CANCEL",
    "TASKS_NOTICE",
    "Backoff",
    "DownloadOutcome",
    "DownloadStatus",
    "PullWorker",
    "Puller",
    "QueueEntry",
    "TaskChanges",
    "cancel",
    "download_of",
    "forget",
    "list_queue",
    "notify_workers",
    "queue_download",
    "reconcile_tasks",
    "refresh_task_metrics",
    "remove_pending",
    "request_cancel",
    "retry",
]
