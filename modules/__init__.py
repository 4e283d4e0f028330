"""MCaaS core: compression techniques, evaluation, deployment, pipeline and storage."""
