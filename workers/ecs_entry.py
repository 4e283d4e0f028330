"""`python -m workers.ecs_entry`: the ECS container's command, configured only by env vars.

With STEP_INDEX set (the EcsDispatcher sets it) the step belongs to a stored job: it runs
like the Celery task, through the job engine, and queues the next step as another ECS task.
Without it, it is the seed service's standalone contract (modules/pipeline/ecs.py).
"""

from __future__ import annotations

import os
import sys

from modules.errors import BadInputError, McaasError
from modules.pipeline.ecs import ecs_main, read_ecs_env


def run_job_step(env: dict[str, str]) -> int:
    """Run step STEP_INDEX of the stored job JOB_ID; queue the next through ECS."""
    from modules.pipeline.engine import advance, hand_off
    from modules.pipeline.settings import build_services, get_settings
    from workers.dispatch import EcsDispatcher

    task = read_ecs_env(env, model_required=False)
    try:
        index = int(env["STEP_INDEX"])
    except ValueError:
        raise BadInputError(f"STEP_INDEX must be an int, got {env['STEP_INDEX']!r}") from None
    settings = get_settings().require("worker")
    services = build_services(settings)
    job = services.jobs.get(task.job_id)
    if job is None or job.user_id != task.user_id:
        raise BadInputError(f"JOB_ID {task.job_id!r} is not a job of USER_ID {task.user_id!r}")
    if not 0 <= index < job.n_steps or job.step_name(index) != task.step:
        raise BadInputError(f"job {task.job_id} has no step {index} named {task.step!r}")
    next_index = advance(
        task.job_id, index, services, trust_pickle=settings.trust_pickle
    ).next_index
    if next_index is not None:
        dispatcher = EcsDispatcher(settings, services)
        hand_off(task.job_id, next_index, jobs=services.jobs, enqueue=dispatcher.enqueue)
    return 0


def main() -> int:
    """Job mode when STEP_INDEX is set, else standalone ECS mode."""
    env = dict(os.environ)
    if not env.get("STEP_INDEX"):
        return ecs_main(None, env)
    try:
        return run_job_step(env)
    except McaasError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
