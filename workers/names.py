"""The Celery task's name: what the sender (workers/dispatch.py) and the worker
(workers/tasks.py, workers/celery_app.py) share, in a module that imports nothing."""

TASK_NAME = "mcaas.run_step"
