"""The `repo-engine` command: thin click commands, one engine call each, imports made lazily so
`repo-engine --help` stays instant."""
