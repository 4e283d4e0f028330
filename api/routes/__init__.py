"""One router per resource: models, jobs, catalog (steps, profiles), health."""
