"""Imported by a test worker (`celery worker -I ...`): registers the hostile steps there."""

from tests.integration.faults.hostile_steps import register_hostile_steps

register_hostile_steps()
