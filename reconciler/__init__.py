"""reconciler: keeps a Bacalhau network in line with a folder of job manifests."""
