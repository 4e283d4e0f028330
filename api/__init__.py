"""The MCaaS HTTP gateway (FastAPI). It never imports torch at module level."""
