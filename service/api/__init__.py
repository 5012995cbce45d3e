"""HTTP and FHIR wire details. Handlers call the store or a domain package, nothing else."""
