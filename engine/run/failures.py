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
# themselves (see engine.stages.loop.apply_stages).
_MAP_WORKER = re.compile(r"MapWorker\((?:MapBatches\()?([A-Za-z0-9_.-]+)\)?\)")


class RunFailed(RuntimeError):
    """The run gave up: a stage kept losing its Ray workers after every attempt."""


class ConfigError(ValueError):
    """A configuration that cannot run on this cluster, found once Ray is up (before anything is written)."""


# Exceptions that, raised while a stage loads, mean the configuration asks for something that cannot work
# (a bad size, a missing file or package, a model setting above the model's limits): exit 2, not 1.
_CONFIG_MISTAKES = (
    "ValueError",
    "TypeError",
    "KeyError",
    "FileNotFoundError",
    "ImportError",
    "ModuleNotFoundError",
    "NotImplementedError",
    "ValidationError",  # pydantic: a vLLM engine argument its model refuses (max_model_len, ...)
)
_SETUP_MARK = re.compile(r"StageSetupError: \[(config|error)\] (stage '[^']+' could not start: [^\n]*)")
_LAST_EXCEPTION = re.compile(r"^(?:[A-Za-z_][\w.]*\.)?([A-Z]\w*(?:Error|Exception)): (.+)$", re.MULTILINE)


class StageSetupError(RuntimeError):
    """A stage failed while it was being built (its model loading, its config checks): the stage's own
    error, never retried as a lost worker. `config_mistake`: the exception says the config is wrong."""

    def __init__(self, stage: str, detail: str, config_mistake: bool) -> None:
        self.stage, self.detail, self.config_mistake = stage, detail, config_mistake
        kind = "config" if config_mistake else "error"
        super().__init__(f"[{kind}] stage {stage!r} could not start: {detail}")

    def __reduce__(self):  # Ray pickles it from the actor to the driver
        return type(self), (self.stage, self.detail, self.config_mistake)

    @classmethod
    def from_exception(cls, stage: str, err: BaseException) -> StageSetupError:
        first_line = (str(err).strip().splitlines() or [""])[0]
        return cls(stage, f"{type(err).__name__}: {first_line[:500]}", type(err).__name__ in _CONFIG_MISTAKES)

    def summary(self) -> str:
        """One line for the user: the stage and the original error."""
        return f"stage {self.stage!r} could not start: {self.detail}"


def setup_failure(err: BaseException, stage_names: dict[str, str] | None = None) -> StageSetupError | None:
    """The StageSetupError behind a Ray error, when an actor died in its constructor; else None.

    Ray reports it as ActorDiedError(actor_init_failed) whose text holds the remote traceback: our stages
    raise StageSetupError there (engine.stages.loop.StageRunner); other actors (ray.data.llm's vLLM engine) are
    named from the actor's class, through `stage_names` (operator name -> our stage), and their last
    exception.
    """
    text = str(err)
    marked = _SETUP_MARK.search(text)
    if not marked and not getattr(err, "actor_init_failed", False):
        return None
    if marked:
        stage, _, detail = marked.group(2).partition(" could not start: ")
        return StageSetupError(stage[len("stage '") : -1], detail, marked.group(1) == "config")
    kind, message = _last_exception(text)
    operator = failed_stage(err) or "?"
    stage = (stage_names or {}).get(operator, operator)
    return StageSetupError(stage, f"{kind}: {message[:500]}", kind in _CONFIG_MISTAKES)


def _last_exception(text: str) -> tuple[str, str]:
    """The type and message of the last exception in a traceback text. A pydantic ValidationError's first
    line only counts the errors ("1 validation error for ModelConfig"): the reason is on the next lines."""
    found = list(_LAST_EXCEPTION.finditer(text))
    if not found:
        return "Error", (text.strip().splitlines() or [""])[0][:300]
    last = found[-1]
    kind, message = last.group(1), last.group(2).strip()
    if re.match(r"\d+ validation errors? for ", message):
        following = [line.strip() for line in text[last.end() :].splitlines() if line.strip()]
        reasons = [line for line in following if not line.startswith("For further information")][:2]
        message = " ".join([message, *reasons])
    return kind, message


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
