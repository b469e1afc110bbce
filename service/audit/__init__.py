"""The membership audit's persistent side: each model lineage's reference set, and requests to build one."""
