"""The `mlops` command line and the library behind the Pulumi program: specs, plans, training, promotion."""
