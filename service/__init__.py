"""backdoor-scan's service side: HTTP API, job table, queue, configuration and the command line."""
