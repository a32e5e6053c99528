"""App: the command line, the service (start/stop, signals), the pipeline of one process and its scheduler."""
