"""The dashboard: server-rendered pages of jobs, progress and reports (Jinja2)."""
