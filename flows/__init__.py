"""recflow's Prefect flows: thin orchestration of recflow library calls (see flows/README.md)."""
