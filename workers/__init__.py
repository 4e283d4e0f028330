"""Workers: the Celery app and task, the dispatchers, and the ECS env-var entrypoint."""
