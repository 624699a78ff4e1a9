"""cuepipe orchestrator: pipelines, jobs, supervised workers, event relay and the CLI."""
