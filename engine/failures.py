"""Which failures a run survives by starting over from its shards, and which stage a failure came from.

Ray retries a batch on a restarted actor (`max_restarts`, `max_task_retries`), but some losses reach the
driver anyway: when a node dies, the actors on it stay "temporarily unavailable" until the GCS notices
(seconds), the task retries can run out before then, and Ray Data aborts the dataset. Shards are exactly-once
and resumable, so the run starts the dataset again (`ray.max_run_attempts`) and only the unwritten rows are
generated. Errors in user code are not retried here: the stage loop already gave each row its own try.
"""

from __future__ import annotations

import re

# Losses of Ray processes, nodes or objects: the work itself may well succeed on a second try.
_INFRASTRUCTURE = (
    "RayActorError",  # ActorDiedError, ActorUnavailableError
    "WorkerCrashedError",
    "LocalRayletDiedError",
    "NodeDiedError",
    "ObjectLostError",  # ObjectReconstructionFailedError, OwnerDiedError, ObjectFetchTimedOutError, ...
)
# Ray Data names an actor pool's workers `MapWorker(MapBatches(<stage>))`; stages are named after
# themselves (see engine.stages.apply_stages).
_MAP_WORKER = re.compile(r"MapWorker\((?:MapBatches\()?([A-Za-z0-9_.-]+)\)?\)")


class RunFailed(RuntimeError):
    """The run gave up: a stage kept losing its Ray workers after every attempt."""


def is_infrastructure_failure(err: BaseException) -> bool:
    import ray.exceptions

    kinds = tuple(getattr(ray.exceptions, name) for name in _INFRASTRUCTURE)
    return isinstance(err, kinds)


def failed_stage(err: BaseException) -> str | None:
    """The stage whose workers were lost, from the error text or (for an actor) Ray's actor table."""
    match = _MAP_WORKER.search(str(err))
    if match:
        return match.group(1)
    actor_id = getattr(err, "actor_id", None)
    if not actor_id:
        return None
    try:
        # A debugging API, and the only one that reads the actor table without the dashboard.
        from ray._private.state import actors

        info = actors(actor_id=actor_id)
    except Exception:  # noqa: BLE001 - naming the stage is best effort; the error itself is re-raised
        return None
    match = _MAP_WORKER.search(str(info.get("ActorClassName", "")) if info else "")
    return match.group(1) if match else None


def describe(err: BaseException) -> str:
    stage = failed_stage(err)
    first_line = str(err).strip().splitlines()[0] if str(err).strip() else ""
    return f"stage {stage or '?'}: {type(err).__name__}: {first_line[:300]}"
