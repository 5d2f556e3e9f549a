"""Example nodes to run and to copy: ring, PHOLD, pipeline, bench."""
